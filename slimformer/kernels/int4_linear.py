"""W4A16 linear on ONNX Runtime's MatMulNBits packing: y = x @ dequant(W).T + bias.

(Many tokens, M >= DEQUANT_MIN_M: the weight is dequantized to fp16 and cuBLAS runs the GEMM,
see int4_dequant.py; what follows is the fused kernel for the rest.)

Motivation
----------
Decoding a language model multiplies one token (M = 1) or a handful (M <= 16) by every weight
matrix: the time is the time to read the weights. Four-bit weights are a quarter of fp16's
bytes, so a kernel that reads each packed byte once and dequantizes in registers can be close
to 4x faster than cuBLAS fp16 there. The packed layout is ORT's `MatMulNBits` (see
packing.py), so the same bytes run on the CPU in ONNX Runtime.

One kernel, two regimes picked by the autotuner's row bucket:
  * M <= 16 (GEMV-like): 16-row tiles, narrow column tiles for many programs, deep
    pipelining, and split-K: SPLIT_K programs share a tile's K range, write fp32 partials,
    and the last to finish (an atomic counter) sums them and writes y. No extra launches:
    the counters reset themselves, the partials live in a scratch buffer.
  * larger M (GEMM): wide tiles with grouped program order, as in the int8 kernel.

Each loop step covers one quantization block (block_size columns of K) for a (BLOCK_N,)
slice of rows of W: load the (BLOCK_N, block_size // 2) packed bytes once, split the nibbles
into the even-k and odd-k halves, subtract the zero point (exact in fp16/bf16 via the
"magic number" bit trick), and run two `tl.dot`s against the even and odd columns of x. The
block's scale is applied to the fp32 partial product, once per (row, block), not per weight.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from slimformer.kernels._triton import interpret_requested, m_bucket
from slimformer.kernels.int8_linear import cdiv
from slimformer.kernels.tiles import bucket_autotune, grouped_tile

INTERPRET = interpret_requested()
SUPPORTED_BLOCK_SIZES = (32, 64, 128, 256)  # tl.dot needs >= 16 columns in each nibble half


@triton.jit
def _nibble_minus_zp(nib, zp, DT: tl.constexpr):
    """(q - zp) in the dot dtype, exactly. nib (BN, H) and zp (BN, 1) uint8 in [0, 15].

    fp16: the bits 0x6400 | q are the half 1024 + q; bf16: 0x4300 | q is 128 + q. One OR and
    a subtract replace an int->float conversion, which the GPU does at a fraction of the rate.
    """
    if DT == tl.float16:
        v = (nib.to(tl.int16) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        z = (zp.to(tl.int16) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        return v - z
    elif DT == tl.bfloat16:
        v = (nib.to(tl.int16) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        z = (zp.to(tl.int16) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return v - z
    else:
        return nib.to(tl.float32) - zp.to(tl.float32)


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, zp_ptr, bias_ptr, y_ptr,  # x (M, K), packed W, scales, zp, bias, y (M, N)
    ws_ptr, lock_ptr,  # split-K: fp32 partials (SPLIT_K, M, N), int32 counters (one per tile)
    M, N, K, M_BUCKET, N_BLOCKS, ZP_STRIDE,  # N_BLOCKS = ceil(K / GROUP), ZP_STRIDE = ceil(N_BLOCKS / 2)
    stride_xm, stride_ym,
    HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    GROUP: tl.constexpr,  # the quantization block size
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,  # dot in fp32: fp32 x, or bf16 x under the interpreter (numpy has no bf16)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2  # packed bytes per row and block
    DT: tl.constexpr = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty  # dot operand dtype
    pid = tl.program_id(0)  # output tile
    pid_k = tl.program_id(1)  # K slice
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # (BM,) wrapped: loads in bounds
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # (BN,)
    offs_g = tl.arange(0, GROUP)  # (G,) columns of x in one block
    offs_h = tl.arange(0, HALF)  # (H,) bytes of a packed row in one block
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # (BM, 1)
    w_rows = qw_ptr + offs_n[:, None].to(tl.int64) * (N_BLOCKS * HALF)  # (BN, 1)

    blocks_per_split = tl.cdiv(N_BLOCKS, SPLIT_K)
    b_start = pid_k * blocks_per_split
    b_end = min(b_start + blocks_per_split, N_BLOCKS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(b_start, b_end):
        k0 = b * GROUP
        if EVEN_K:
            x = tl.load(x_rows + k0 + offs_g[None, :])  # (BM, G)
        else:
            x = tl.load(x_rows + k0 + offs_g[None, :], mask=k0 + offs_g[None, :] < K, other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x.to(DT), (BLOCK_M, HALF, 2)))  # (BM, H) each
        packed = tl.load(w_rows + b * HALF + offs_h[None, :])  # (BN, H) uint8, read once
        if HAS_ZP:
            zp = tl.load(zp_ptr + offs_n[:, None] * ZP_STRIDE + b // 2)  # (BN, 1)
            zp = (zp >> ((b % 2) * 4)) & 0xF
        else:
            zp = tl.full((BLOCK_N, 1), 8, dtype=tl.uint8)
        w_even = _nibble_minus_zp(packed & 0xF, zp, DT)  # (BN, H), low nibble = even k
        w_odd = _nibble_minus_zp(packed >> 4, zp, DT)
        p = tl.dot(x_even, tl.trans(w_even), input_precision=PRECISION)  # (BM, BN) fp32
        p = tl.dot(x_odd, tl.trans(w_odd), p, input_precision=PRECISION)
        scale = tl.load(s_ptr + offs_n * N_BLOCKS + b).to(tl.float32)  # (BN,)
        acc += p * scale[None, :]

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K > 1:
        mn = rm[:, None].to(tl.int64) * N + rn[None, :]  # (BM, BN) index into one (M, N) slice
        tl.store(ws_ptr + pid_k * M * N + mn, acc, mask=y_mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # last of the tile's K slices: reduce, write y, reset
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(ws_ptr + s * M * N + mn, mask=y_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
            y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(lock_ptr + pid, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _cfg(bm, bn, split, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group, "SPLIT_K": split},
                         num_stages=stages, num_warps=warps)


# Chosen to compile without register spills for sm_90 (ptxas -v): two fp32 accumulators (the
# block's partial product and the running sum) make big GEMM tiles spill, so none here.
CONFIGS_SMALL_M = [  # M <= 16: bandwidth bound; enough programs to keep every SM loading
    _cfg(16, 32, 1, 6, 2), _cfg(16, 64, 1, 4, 4), _cfg(16, 32, 2, 6, 2),
    _cfg(16, 64, 2, 4, 4), _cfg(16, 32, 4, 5, 2), _cfg(16, 64, 4, 4, 4),
]
CONFIGS_MID_M = [_cfg(32, 64, 1, 4, 4), _cfg(64, 64, 1, 4, 4), _cfg(64, 128, 1, 4, 4)]
CONFIGS_LARGE_M = [_cfg(64, 128, 1, 4, 4), _cfg(128, 64, 1, 3, 8), _cfg(64, 64, 1, 4, 4)]
CONFIGS_INTERPRET = [_cfg(32, 128, 1, 1, 4)]
MAX_SPLIT_K = 4
# From this many rows on, dequantize to fp16 and run cuBLAS (int4_dequant.py) instead of the
# fused kernel, which is a decoding kernel: on the H200 it lost to cuBLAS fp16 by 3-12x at
# M = 128 and 2048 with the GPU, not the host, the bottleneck. SLIMFORMER_INT4_DEQUANT_MIN_M
# overrides it (bench/kernels.py measures both paths at every M).
DEQUANT_MIN_M = int(os.environ.get("SLIMFORMER_INT4_DEQUANT_MIN_M", "128"))


_int4_tuned = bucket_autotune(_int4_matmul_kernel, ["M_BUCKET", "N", "K", "GROUP"], INTERPRET, CONFIGS_INTERPRET,
                              CONFIGS_SMALL_M, CONFIGS_MID_M, CONFIGS_LARGE_M)

_LOCKS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown lock buffers, kept alive (see _locks)


def _locks(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 split-K counters, one per output tile; kernels leave them zeroed again.
    (Two split-K launches running concurrently on different streams would share them.)
    An outgrown buffer is never freed: a captured CUDA graph may still point at it."""
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _LOCKS[device] = buf
    return buf


def int4_linear(
    x: torch.Tensor,  # (..., K) fp16 / bf16 / fp32
    qweight: torch.Tensor,  # (N, n_blocks, block_size // 2) uint8
    scales: torch.Tensor,  # (N, n_blocks) or (N * n_blocks,), any float dtype
    zero_points: torch.Tensor | None,  # (N, ceil(n_blocks / 2)) or flat, uint8; None = 8
    bias: torch.Tensor | None,  # (N,) or None
    K: int,
    block_size: int,
    config: dict | None = None,  # fixed meta-parameters instead of autotuning (tests)
    dequant: bool | None = None,  # fp16 weight + cuBLAS (int4_dequant.py); None: M >= DEQUANT_MIN_M
) -> torch.Tensor:
    """`slimformer::int4_linear` on Triton. Output (..., N) in x's dtype."""
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"int4_linear: block_size {block_size} not in {SUPPORTED_BLOCK_SIZES}")
    if x.shape[-1] != K:
        raise ValueError(f"int4_linear: x has {x.shape[-1]} features, K={K}")
    nb = cdiv(K, block_size)
    N = qweight.shape[0]
    x2 = x.reshape(-1, K)  # (M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    qweight, scales = qweight.contiguous(), scales.contiguous()
    if qweight.numel() != N * nb * (block_size // 2) or scales.numel() != N * nb:
        raise ValueError(f"int4_linear: qweight {tuple(qweight.shape)} / scales "
                         f"{tuple(scales.shape)} do not fit N={N}, K={K}, block_size={block_size}")
    if M == 0:
        return x.new_empty((*x.shape[:-1], N))
    if config is None and (M >= DEQUANT_MIN_M if dequant is None else dequant):
        from slimformer.kernels.int4_dequant import int4_linear_dequant

        y = int4_linear_dequant(x2, qweight, scales, zero_points, bias, K, block_size)
        return y.reshape(*x.shape[:-1], N)
    dot_f32 = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    zp = zero_points.contiguous() if zero_points is not None else qweight  # dummy if absent
    b = bias.contiguous() if bias is not None else scales
    max_split = (config or {}).get("SPLIT_K", MAX_SPLIT_K if M <= 16 else 1)
    ws = torch.empty((max_split, M, N), dtype=torch.float32, device=x.device) if max_split > 1 else y
    # counters only where split-K may run (M <= 16): big M must not grow the buffer
    locks = _locks(x.device, cdiv(M, 16) * cdiv(N, 16) if max_split > 1 else 1)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    args = (x2, qweight, scales, zp, b, y, ws, locks,
            M, N, K, m_bucket(M), nb, cdiv(nb, 2), x2.stride(0), y.stride(0))
    meta = dict(HAS_ZP=zero_points is not None, HAS_BIAS=bias is not None,
                EVEN_K=K % block_size == 0, GROUP=block_size,
                PRECISION="ieee" if dot_f32 else "tf32", DOT_F32=dot_f32)
    if config is None:
        _int4_tuned[grid](*args, **meta)
    else:
        config = {"GROUP_M": 8, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1, **config}
        _int4_matmul_kernel[grid(config)](*args, **meta, **config)
    return y.reshape(*x.shape[:-1], N)
