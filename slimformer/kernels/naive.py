"""Plain-PyTorch references for every slimformer kernel.

Each function states the exact arithmetic its fast kernel (Triton on the GPU) or its
ONNX Runtime lowering (on the CPU) performs, so tests can compare against it bit for bit.
"""

from __future__ import annotations

import torch

# Activation quantization modes of `slimformer::int8_linear`.
ACT_PER_TENSOR_U8 = 0  # ORT DynamicQuantizeMatMul: one asymmetric uint8 scale per call
ACT_PER_TOKEN_I8 = 1  # Triton kernel: one symmetric int8 scale per row (token)
# CPU per-token: rows are divided by their absmax, then DynamicQuantizeMatMul quantizes the
# normalised tensor per-tensor (range [-1, 1]); the output is multiplied back by the row absmax.
# One fused ORT kernel plus two cheap elementwise ops: per-token precision at per-tensor speed.
ACT_ROW_NORM_U8 = 2


def quantize_per_tensor_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX `DynamicQuantizeLinear`: asymmetric uint8 over the whole tensor, range holds 0."""
    x = x.float()
    x_min = torch.clamp(x.min(), max=0.0)
    x_max = torch.clamp(x.max(), min=0.0)
    scale = (x_max - x_min) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero_point = torch.clamp(torch.round(-x_min / scale), 0, 255)  # round half to even, as ONNX
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return q, scale, zero_point


def quantize_per_token_i8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row of the last dim: (..., K) -> q (..., K), s (..., 1)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.clamp(torch.round(x / scale), -127, 127)
    return q, scale


def exact_int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a (..., K) @ b_t.T (N, K) for integer-valued float tensors with |a| <= 255, |b| <= 127,
    exactly: fp32 sums of 512 such products stay below 2**24, partial sums add in float64."""
    a, b_t = a.float(), b_t.float()
    acc = None
    for k0 in range(0, a.shape[-1], 512):
        part = (a[..., k0:k0 + 512] @ b_t[:, k0:k0 + 512].t()).double()
        acc = part if acc is None else acc + part
    return acc


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (..., 1) max |x| per row, never 0 (an all-zero row stays zero)."""
    return x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)


def int8_linear_ref(
    x: torch.Tensor,
    w_q: torch.Tensor,  # (N, K) int8, symmetric per output channel
    w_scale: torch.Tensor,  # (N,) fp32
    bias: torch.Tensor | None,  # (N,) or None
    act_mode: int,
) -> torch.Tensor:
    """W8A8 linear with dynamic activation quantization; output in x's dtype.

    The integer product is exact (see exact_int_matmul), as on the integer hardware it models.
    """
    if act_mode == ACT_PER_TENSOR_U8:
        q, s, zp = quantize_per_tensor_u8(x)
        acc = exact_int_matmul(q - zp, w_q)  # (..., N), exact integers
        y = acc.float() * (s * w_scale.float())
    elif act_mode == ACT_ROW_NORM_U8:
        r = row_absmax(x)
        q, s, zp = quantize_per_tensor_u8(x.float() / r)
        acc = exact_int_matmul(q - zp, w_q)
        y = acc.float() * (s * w_scale.float()) * r
    elif act_mode == ACT_PER_TOKEN_I8:
        q, s = quantize_per_token_i8(x)
        acc = exact_int_matmul(q, w_q)
        y = acc.float() * s * w_scale.float()
    else:
        raise ValueError(f"int8_linear: unknown act_mode {act_mode} (0 = per-tensor u8, 1 = per-token i8)")
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dequantize_int4_ref(
    qweight: torch.Tensor,  # (N, n_blocks, block_size // 2) uint8, MatMulNBits layout
    scales: torch.Tensor,  # (N, n_blocks) or (N * n_blocks,)
    zero_points: torch.Tensor | None,  # (N, ceil(n_blocks / 2)) uint8 packed, or None (= 8)
    K: int,
    block_size: int,
) -> torch.Tensor:
    """(N, K) fp32 weight: w[n, k] = (q[n, k] - zp[n, k // bs]) * scale[n, k // bs]."""
    from slimformer.kernels.packing import unpack_int4_matmulnbits

    q, s, zp = unpack_int4_matmulnbits(qweight, scales, zero_points, K, block_size)
    idx = torch.arange(K, device=q.device) // block_size  # (K,) block of each column
    return (q.float() - zp.float()[:, idx]) * s.float()[:, idx]


def int4_linear_ref(
    x: torch.Tensor,  # (..., K)
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bias: torch.Tensor | None,  # (N,) or None
    K: int,
    block_size: int,
) -> torch.Tensor:
    """W4A16 linear, ORT `MatMulNBits` semantics: x @ dequant(W).T + bias, fp32 math, x's dtype."""
    w = dequantize_int4_ref(qweight, scales, zero_points, K, block_size)  # (N, K)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
