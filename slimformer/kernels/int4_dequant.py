"""W4A16 for many tokens: dequantize the packed int4 weight to x's dtype, then cuBLAS.

Why: `int4_linear`'s fused kernel is built for decoding (M <= 16: it reads each packed byte
once and is bound by the weight's bytes). With many tokens a linear is compute bound, and
there the fused kernel's tiles (small, to stay clear of register spills: two fp32
accumulators) ran far behind cuBLAS on the H200 (bench/results/kernels_nvidia-h200.json,
M = 128 and 2048, where the times are the GPU's, not the host's: BERT 768x768 at M = 2048
0.113 ms vs 0.009 ms; Llama 11008x4096 at M = 2048 0.86 ms vs 0.27 ms). Writing the weight
out in fp16 once per call costs 2 bytes an element (2.4 MB for 768 x 3072, a few
microseconds) and hands the GEMM to cuBLAS: within a few microseconds of fp16 speed.

Arithmetic: w[n, k] = (q - zp) * scale in fp32, exactly as `naive.dequantize_int4_ref`,
rounded once to x's dtype; then x @ w.T + bias by torch (fp32 accumulation in cuBLAS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slimformer.kernels.int8_linear import cdiv


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, zp_ptr, w_ptr,  # packed (N, NB, G/2) uint8, scales (N, NB), zp (N, ZS) uint8, w (N, K)
    N, K, N_BLOCKS, ZP_STRIDE,
    HAS_ZP: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2
    b = tl.program_id(1)  # quantization block along K
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    offs_h = tl.arange(0, HALF)  # (H,)
    packed = tl.load(qw_ptr + rows[:, None] * (N_BLOCKS * HALF) + b * HALF + offs_h[None, :],
                     mask=row_ok[:, None], other=0)  # (BN, H) uint8: low nibble = even k
    if HAS_ZP:
        zp = tl.load(zp_ptr + rows[:, None] * ZP_STRIDE + b // 2, mask=row_ok[:, None], other=0)
        zp = ((zp >> ((b % 2) * 4)) & 0xF).to(tl.float32)  # (BN, 1)
    else:
        zp = tl.full((BLOCK_N, 1), 8.0, dtype=tl.float32)
    scale = tl.load(s_ptr + rows * N_BLOCKS + b, mask=row_ok, other=0.0).to(tl.float32)  # (BN,)
    lo = ((packed & 0xF).to(tl.float32) - zp) * scale[:, None]  # (BN, H): k = 2j
    hi = ((packed >> 4).to(tl.float32) - zp) * scale[:, None]  # k = 2j + 1
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, GROUP))  # (BN, G) interleaved back
    cols = b * GROUP + tl.arange(0, GROUP)
    tl.store(w_ptr + rows[:, None] * K + cols[None, :], w.to(w_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < K))


def dequantize_int4(qweight, scales, zero_points, K: int, block_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weight in `dtype` from the MatMulNBits packing (see packing.py)."""
    N = qweight.shape[0]
    nb = cdiv(K, block_size)
    w = torch.empty((N, K), dtype=dtype, device=qweight.device)
    block_n = max(1, min(64, 4096 // block_size))  # ~4096 weights a program
    zp = zero_points.contiguous() if zero_points is not None else qweight  # dummy if absent
    _dequant_kernel[(cdiv(N, block_n), nb)](
        qweight.contiguous(), scales.contiguous(), zp, w, N, K, nb, cdiv(nb, 2),
        HAS_ZP=zero_points is not None, GROUP=block_size, BLOCK_N=block_n,
        num_warps=4)
    return w


def int4_linear_dequant(x2: torch.Tensor, qweight, scales, zero_points, bias, K: int,
                        block_size: int) -> torch.Tensor:
    """x2 (M, K) -> (M, N): dequantize, then one cuBLAS GEMM (two launches)."""
    w = dequantize_int4(qweight, scales, zero_points, K, block_size, x2.dtype)
    return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))
