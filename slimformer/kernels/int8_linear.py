"""W8A8 linear: y = (quant(x) @ w_q.T) * s_x * s_w + bias, with int8 tensor cores.

Motivation
----------
Hopper's int8 tensor cores do twice the operations per second of its fp16 ones, and an int8
weight is half the bytes. A linear layer with int8 weights (symmetric, one scale per output
channel) and int8 activations (symmetric, one scale per token, quantized on the fly) can
therefore beat cuBLAS fp16 both where it is compute bound (many tokens) and where it is
bandwidth bound (few tokens, large weights).

Two kernels:
  1. `_quant_rows_kernel`, the prologue: per-row absmax of x (M, K), then int8 codes and
     one fp32 scale per row. One read of x, one write of a half-size copy.
  2. `_int8_matmul_kernel`: int8 x int8 -> int32 `tl.dot` (exact), epilogue in fp32:
     acc * s_x[m] * s_w[n] + bias[n], stored in x's dtype.

Weight layout: the op keeps `w_q` as (N, K), K contiguous. That already is the layout int8
tensor cores want for the B operand (K-major: Hopper's wgmma and Ampere's mma.sync take 8-bit
operands only K-major, cuBLAS' int8 GEMM only as "TN"), so no pre-transpose is stored.

The arithmetic is exactly `naive.int8_linear_ref(..., act_mode=ACT_PER_TOKEN_I8)`: the same
round-half-to-even quantization with IEEE division, an exact integer product, and the same
order of fp32 multiplies (a GPU may fuse the bias add into an FMA: an ulp, no more).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from slimformer.kernels._triton import interpret_requested, m_bucket, next_pow2
from slimformer.kernels.tiles import bucket_autotune, grouped_tile

INTERPRET = interpret_requested()  # kernels below were built for the interpreter
# Quantization fused into the GEMM (one launch, int8_fused.py) instead of the two launches
# below, for every int8_linear call; the default stays two launches until measured on a GPU.
FUSED_QUANT = os.environ.get("SLIMFORMER_INT8_FUSED", "0") == "1"

# ---------------------------------------------------------------------------------------------
# 1. Prologue: per-token int8 quantization
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rint(v):
    """Round half to even, as torch.round, for |v| < 2**22: adding 1.5 * 2**23 leaves no
    fraction bits in fp32, so the add rounds (to nearest even); the subtract is exact. Works on
    the GPU and in the interpreter alike (which lacks libdevice.rint)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _smoothed(x, c_ptr, cols, mask, HAS_SMOOTH: tl.constexpr):
    """x (BM, BK) fp32 from x's dtype; with HAS_SMOOTH x * c[cols], rounded back to x's dtype:
    the SmoothQuant multiply the graph would run before the op, bit for bit (a product of two
    fp16 / bf16 values is exact in fp32, so one rounding gives the same value as torch.mul)."""
    if HAS_SMOOTH:
        c = tl.load(c_ptr + cols, mask=mask, other=0.0)  # (BK,) in x's dtype
        x = (x * c.to(tl.float32)[None, :]).to(c_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _quant_rows_kernel(
    x_ptr, q_ptr, s_ptr, c_ptr,  # x (M, K) float, q (M, K) int8, s (M,) fp32, c (K,) x's dtype
    M, K, stride_xm, stride_qm,
    HAS_SMOOTH: tl.constexpr,  # x * c before quantizing (a folded SmoothQuant multiply)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)  # (BK,)
    x_rows = x_ptr + rows[:, None] * stride_xm  # (BM, 1)
    q_rows = q_ptr + rows[:, None] * stride_qm
    if ONE_TILE:  # the whole row fits: one read of x
        mask = row_ok[:, None] & (cols[None, :] < K)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (BM, BK)
        x = _smoothed(x, c_ptr, cols, cols < K, HAS_SMOOTH)
        amax = tl.max(tl.abs(x), axis=1)  # (BM,)
        scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
        q = _rint(tl.math.div_rn(x, scale[:, None]))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_rows + cols[None, :], q.to(tl.int8), mask=mask)
    else:  # two passes over K: absmax, then quantize
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (k + cols[None, :] < K)
            x = tl.load(x_rows + k + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = _smoothed(x, c_ptr, k + cols, k + cols < K, HAS_SMOOTH)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
        for k in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (k + cols[None, :] < K)
            x = tl.load(x_rows + k + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = _smoothed(x, c_ptr, k + cols, k + cols < K, HAS_SMOOTH)
            q = _rint(tl.math.div_rn(x, scale[:, None]))
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)
            tl.store(q_rows + k + cols[None, :], q.to(tl.int8), mask=mask)
    tl.store(s_ptr + rows, scale, mask=row_ok)


def quant_launch_params(K: int, max_block_k: int = 16384) -> dict:
    """Meta-parameters of `_quant_rows_kernel` for rows of K: a whole row per tile up to
    16384 columns (Llama's 11008 included), several short rows per program."""
    return dict(_quant_params(K, max_block_k))


@functools.cache  # on the per-call host path
def _quant_params(K: int, max_block_k: int) -> tuple:
    block_k = min(next_pow2(K), max_block_k)
    return tuple(dict(
        BLOCK_M=max(1, min(16, 2048 // block_k)), BLOCK_K=block_k, ONE_TILE=block_k >= K,
        num_warps=4 if block_k <= 2048 else 8 if block_k <= 4096 else 16,
    ).items())


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (newer Tritons make `triton.cdiv` a constexpr function, several
    microseconds a call on the per-call path)."""
    return -(-a // b)


def quantize_rows(x: torch.Tensor, max_block_k: int = 16384,
                  smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> q (M, K) int8, scale (M,) fp32; `naive.quantize_per_token_i8`.
    smooth (K,) in x's dtype: quantize (x * smooth) instead, as if the graph had multiplied."""
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    if smooth is not None and (smooth.dtype != x.dtype or smooth.shape != (K,) or smooth.stride(0) != 1):
        smooth = smooth.reshape(K).to(x.dtype).contiguous()
    meta = dict(_quant_params(K, max_block_k))
    _quant_rows_kernel[(cdiv(M, meta["BLOCK_M"]),)](
        x, q, s, x if smooth is None else smooth, M, K, x.stride(0), q.stride(0),
        HAS_SMOOTH=smooth is not None, **meta)
    return q, s


# ---------------------------------------------------------------------------------------------
# 2. int8 GEMM with a scale-and-bias epilogue
# ---------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, stages, warps, group=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
        num_stages=stages, num_warps=warps,
    )


# Candidates by row count (the autotune key has the bucket, not M, so a new sequence length
# does not re-tune). Few per bucket: tuning the benchmark's 30 shapes must stay under a minute.
CONFIGS_SMALL_M = [  # M <= 16: bandwidth bound on the weight; many narrow tiles, deep K steps
    _cfg(16, 64, 256, 4, 4), _cfg(16, 128, 128, 4, 4), _cfg(16, 32, 256, 5, 4),
]
CONFIGS_MID_M = [  # 16 < M <= 256
    _cfg(64, 64, 128, 4, 4), _cfg(64, 128, 128, 4, 4), _cfg(128, 128, 128, 4, 8),
]
CONFIGS_LARGE_M = [  # compute bound: big wgmma tiles, 3-4 stages of 128-deep K
    _cfg(128, 256, 128, 3, 8), _cfg(128, 128, 128, 4, 8), _cfg(64, 128, 128, 4, 4),
    _cfg(256, 128, 128, 3, 8), _cfg(128, 64, 128, 4, 4),  # narrow N (768): more programs
]
# The interpreter neither benchmarks nor needs speed: one modest config.
CONFIGS_INTERPRET = [_cfg(32, 128, 128, 1, 4)]


@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, c_ptr,  # a (M, K) int8, b (N, K) int8, c (M, N) out dtype (int32 if RAW)
    sa_ptr, sb_ptr, bias_ptr,  # (M,) fp32, (N,) fp32, (N,) any float
    M, N, K, M_BUCKET,
    stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, RAW_ACC: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row tiles share each weight column tile while it is in L2.
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # Out-of-range rows/columns wrap around (loads stay in bounds); the store masks them.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # (BM,)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # (BN,)
    offs_k = tl.arange(0, BLOCK_K)  # (BK,)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # (BM, BK)
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # (BK, BN), K-major

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # exact: |acc| < 127 * 127 * K
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if RAW_ACC:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        sa = tl.load(sa_ptr + offs_m)  # (BM,), in bounds: wrapped offsets
        sb = tl.load(sb_ptr + offs_n)  # (BN,)
        c = acc.to(tl.float32) * sa[:, None] * sb[None, :]  # same order as the reference
        if HAS_BIAS:
            c = c + tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=c_mask)


_int8_tuned = bucket_autotune(_int8_matmul_kernel, ["M_BUCKET", "N", "K"], INTERPRET, CONFIGS_INTERPRET,
                              CONFIGS_SMALL_M, CONFIGS_MID_M, CONFIGS_LARGE_M, even_k=True)


def int8_matmul(
    a_q: torch.Tensor,  # (M, K) int8
    a_scale: torch.Tensor,  # (M,) fp32
    w_q: torch.Tensor,  # (N, K) int8
    w_scale: torch.Tensor,  # (N,) fp32
    bias: torch.Tensor | None,  # (N,) or None
    out_dtype: torch.dtype,
    raw_acc: bool = False,
    config: dict | None = None,  # fixed meta-parameters instead of autotuning (tests)
) -> torch.Tensor:
    """(M, N) = a_q @ w_q.T scaled; with raw_acc=True the exact int32 accumulator instead."""
    M, K = a_q.shape
    N = w_q.shape[0]
    if w_q.shape[1] != K:
        raise ValueError(f"int8_matmul: x has K={K}, w_q is {tuple(w_q.shape)}")
    if a_q.stride(1) != 1:
        a_q = a_q.contiguous()
    if w_q.stride(1) != 1:
        w_q = w_q.contiguous()
    c = torch.empty((M, N), dtype=torch.int32 if raw_acc else out_dtype, device=a_q.device)
    if M == 0:
        return c
    if a_scale.dtype != torch.float32 or a_scale.stride(0) != 1:
        a_scale = a_scale.float().contiguous()
    if w_scale.dtype != torch.float32 or w_scale.stride(0) != 1:
        w_scale = w_scale.float().contiguous()
    bias_arg = bias if bias is None or bias.stride(0) == 1 else bias.contiguous()
    if bias_arg is None:
        bias_arg = w_scale  # dummy pointer if no bias

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    args = (a_q, w_q, c, a_scale, w_scale, bias_arg, M, N, K, m_bucket(M),
            a_q.stride(0), w_q.stride(0), c.stride(0))
    if config is None:
        _int8_tuned[grid](*args, HAS_BIAS=bias is not None, RAW_ACC=raw_acc)
    else:
        config = {"GROUP_M": 8, "num_warps": 4, "num_stages": 1, **config}
        _int8_matmul_kernel[grid(config)](
            *args, HAS_BIAS=bias is not None, RAW_ACC=raw_acc,
            EVEN_K=K % config["BLOCK_K"] == 0, **config,
        )
    return c


def int8_linear(
    x: torch.Tensor,  # (..., K) fp16 / bf16 / fp32
    w_q: torch.Tensor,  # (N, K) int8
    w_scale: torch.Tensor,  # (N,) fp32
    bias: torch.Tensor | None,  # (N,) or None
    smooth: torch.Tensor | None = None,  # (K,): int8_linear(x * smooth, ...), one launch less
    fused: bool | None = None,  # one launch (int8_fused.py); None: FUSED_QUANT
) -> torch.Tensor:
    """`slimformer::int8_linear` with act_mode=ACT_PER_TOKEN_I8, on Triton. Output (..., N)."""
    if FUSED_QUANT if fused is None else fused:
        from slimformer.kernels.int8_fused import int8_linear_fused

        return int8_linear_fused(x, w_q, w_scale, bias, smooth)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)  # (M, K)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], w_q.shape[0]))
    q, s = quantize_rows(x2, smooth=smooth)
    y = int8_matmul(q, s, w_q, w_scale, bias, x.dtype)  # (M, N)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


# ---------------------------------------------------------------------------------------------
# Fallback policy: where does int8 lose to fp16?
# ---------------------------------------------------------------------------------------------

# Smallest M at which int8_linear beat cuBLAS fp16, by (N, K), as measured by
# `bench/kernels.py` (it prints a table to paste here). TO BE FILLED FROM MEASUREMENTS on
# the target GPU; until then `prefer_int8` uses the rule below.
# Measured by bench/gpu.sh on an NVIDIA H200 (triton 3.6, torch 2.11), 2026-11-27: at BERT-base
# shapes the per-token quantization launch plus the GEMM never beat cuBLAS fp16 (bench/results/).
# Caveats: those times were do_bench without CUDA graphs, i.e. bound by the host's two launches
# (~0.065 ms floor) rather than by the kernels (bench/kernels.py now reports `ms_graph` too); and
# no run-time path consults `prefer_int8` yet: every slimformer::int8_linear runs int8 kernels.
NEVER = 1 << 30
INT8_MIN_M: dict[tuple[int, int], int] = {
    (768, 768): NEVER, (3072, 768): NEVER, (768, 3072): NEVER,
    (4096, 4096): 2048, (11008, 4096): 2048, (4096, 11008): 2048,
}


def prefer_int8(M: int, N: int, K: int) -> bool:
    """Should a linear of this shape run int8 (True) or stay fp16 (False)?

    Measured table first. Otherwise: int8 wins when the GEMM is big enough to amortize the
    extra quantization launch: many tokens (compute bound, 2x tensor-core rate), or a large
    weight (bandwidth bound, half the bytes). Tiny layers at tiny M stay fp16.
    """
    if (N, K) in INT8_MIN_M:
        return M >= INT8_MIN_M[(N, K)]
    return M >= 256 or N * K >= 4096 * 4096
