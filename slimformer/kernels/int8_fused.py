"""W8A8 linear in one launch: per-token int8 quantization fused into the GEMM.

Why: `int8_linear.int8_linear` is two launches (the `_quant_rows_kernel` prologue, then the
GEMM) and a round trip of the int8 copy of x through memory. At BERT-base sizes every launch
costs about what the GEMM itself does, so this kernel quantizes the A tiles as it loads them:

  1. a first loop over K reads the program's BLOCK_M rows of x and takes each row's absmax
     (the per-token scale needs the whole row before any code can be computed);
  2. the main loop reads the x tiles again, divides by the row scale, rounds to int8 codes in
     registers and feeds them to the int8 tensor-core dot with the weight tiles.

The price: every column tile of the output (N / BLOCK_N programs per row block) re-reads and
re-quantizes its rows of x (from L2, mostly: grouped program order keeps them there).
Whether that beats the second launch is a measurement (bench/kernels.py: `int8_fused` rows).

Arithmetic: exactly `naive.int8_linear_ref(..., ACT_PER_TOKEN_I8)` and the two-launch path --
the same absmax, IEEE division and round-half-to-even, exact int32 accumulation, the same
epilogue order. `smooth` (K,): the linear of x * smooth (a folded SmoothQuant multiply), the
product rounded to x's dtype as torch would round it.

Selection: `int8_linear.int8_linear(..., fused=True)`, or SLIMFORMER_INT8_FUSED=1 for every
call (read at import); the two-launch path stays the default until a GPU run says otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimformer.kernels._triton import interpret_requested, m_bucket
from slimformer.kernels.int8_linear import _rint, _smoothed, cdiv
from slimformer.kernels.tiles import bucket_autotune, grouped_tile

INTERPRET = interpret_requested()


@triton.jit
def _int8_fused_kernel(
    x_ptr, b_ptr, c_ptr,  # x (M, K) float, b (N, K) int8, c (M, N) x's dtype
    sb_ptr, bias_ptr, smooth_ptr,  # (N,) fp32, (N,) float, (K,) x's dtype
    M, N, K, M_BUCKET,
    stride_xm, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order, as in _int8_matmul_kernel: neighbours share x rows in L2.
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # (BM,) wrapped: loads in bounds
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # (BN,)
    offs_k = tl.arange(0, BLOCK_K)  # (BK,)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # (BM, 1)
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # (BK, BN), K-major

    # 1. per-row absmax over the whole of K
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        cols = k * BLOCK_K + offs_k
        if EVEN_K:
            x = tl.load(x_rows + cols[None, :]).to(tl.float32)  # (BM, BK)
        else:
            x = tl.load(x_rows + cols[None, :], mask=cols[None, :] < K, other=0.0).to(tl.float32)
        x = _smoothed(x, smooth_ptr, cols, cols < K, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)  # (BM,) = naive.quantize_per_token_i8

    # 2. quantize each A tile on load, int8 x int8 -> int32 (exact)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        cols = k * BLOCK_K + offs_k
        if EVEN_K:
            x = tl.load(x_rows + cols[None, :]).to(tl.float32)
            b = tl.load(b_ptrs)
        else:
            x = tl.load(x_rows + cols[None, :], mask=cols[None, :] < K, other=0.0).to(tl.float32)
            b = tl.load(b_ptrs, mask=cols[:, None] < K, other=0)
        x = _smoothed(x, smooth_ptr, cols, cols < K, HAS_SMOOTH)
        q = _rint(tl.math.div_rn(x, scale[:, None]))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)  # (BM, BK)
        acc = tl.dot(q, b, acc, out_dtype=tl.int32)
        b_ptrs += BLOCK_K

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    sb = tl.load(sb_ptr + offs_n)  # (BN,)
    c = acc.to(tl.float32) * scale[:, None] * sb[None, :]  # same order as the reference
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=c_mask)


def _cfg(bm, bn, bk, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


# The fp32 x tile lives in registers next to the accumulator: tiles stay at or below 128 x 128
# with 64-deep K steps (BLOCK_K * BLOCK_M fp32 values per step).
CONFIGS_SMALL_M = [_cfg(16, 64, 128, 4, 4), _cfg(16, 128, 64, 4, 4)]
CONFIGS_MID_M = [_cfg(64, 64, 64, 3, 4), _cfg(64, 128, 64, 3, 4)]
CONFIGS_LARGE_M = [_cfg(128, 128, 64, 3, 8), _cfg(64, 128, 64, 3, 4), _cfg(128, 64, 64, 3, 4)]
CONFIGS_INTERPRET = [_cfg(32, 128, 128, 1, 4)]


_fused_tuned = bucket_autotune(_int8_fused_kernel, ["M_BUCKET", "N", "K"], INTERPRET, CONFIGS_INTERPRET,
                               CONFIGS_SMALL_M, CONFIGS_MID_M, CONFIGS_LARGE_M, even_k=True)


def int8_linear_fused(
    x: torch.Tensor,  # (..., K) fp16 / bf16 / fp32
    w_q: torch.Tensor,  # (N, K) int8
    w_scale: torch.Tensor,  # (N,) fp32
    bias: torch.Tensor | None,  # (N,) or None
    smooth: torch.Tensor | None = None,  # (K,)
    config: dict | None = None,  # fixed meta-parameters instead of autotuning (tests)
) -> torch.Tensor:
    """`int8_linear.int8_linear` in one launch. Output (..., N) in x's dtype."""
    K = x.shape[-1]
    N = w_q.shape[0]
    if w_q.shape[1] != K:
        raise ValueError(f"int8_linear_fused: x has K={K}, w_q is {tuple(w_q.shape)}")
    x2 = x.reshape(-1, K)  # (M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    if w_q.stride(1) != 1:
        w_q = w_q.contiguous()
    if w_scale.dtype != torch.float32 or w_scale.stride(0) != 1:
        w_scale = w_scale.float().contiguous()
    if smooth is not None and (smooth.dtype != x.dtype or smooth.shape != (K,) or smooth.stride(0) != 1):
        smooth = smooth.reshape(K).to(x.dtype).contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    args = (x2, w_q, y, w_scale, w_scale if bias is None else bias, x2 if smooth is None else smooth,
            M, N, K, m_bucket(M), x2.stride(0), w_q.stride(0), y.stride(0))
    flags = dict(HAS_BIAS=bias is not None, HAS_SMOOTH=smooth is not None)
    if config is None:
        _fused_tuned[grid](*args, **flags)
    else:
        config = {"GROUP_M": 8, "num_warps": 4, "num_stages": 1, **config}
        _int8_fused_kernel[grid(config)](*args, **flags, EVEN_K=K % config["BLOCK_K"] == 0, **config)
    return y.reshape(*x.shape[:-1], N)
