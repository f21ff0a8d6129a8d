"""The custom ops a compiled graph calls. One op, two lowerings: its Triton kernel on the GPU
(or on CPU tensors under TRITON_INTERPRET=1), ONNX Runtime operators on the CPU target.

Each op has a fake (meta) kernel so `torch.export` can trace graphs that contain it.
Dispatch (see `_triton.use_triton`): the Triton kernel for CUDA tensors, and for CPU tensors
when TRITON_INTERPRET=1 and triton is installed; otherwise the plain-PyTorch reference.
Kernel modules are imported on first use, so importing slimformer never imports triton.
"""

from __future__ import annotations

import torch

from slimformer.kernels import naive
from slimformer.kernels._triton import check_mode, use_triton


@torch.library.custom_op("slimformer::int8_linear", mutates_args=())
def int8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_mode: int,
) -> torch.Tensor:
    """y = dequant(quant(x) @ w_q.T) + bias. x: (..., K); w_q: (N, K) int8; w_scale: (N,)."""
    return int8_linear_impl(x, w_q, w_scale, bias, act_mode)


def int8_linear_impl(x, w_q, w_scale, bias, act_mode: int, smooth: torch.Tensor | None = None):
    """The op's body, also called directly (no dispatcher) by the GPU runtime graph
    (compiler/gpu_rewrites.py); smooth (K,): the op applied to x * smooth."""
    if act_mode == naive.ACT_PER_TOKEN_I8 and use_triton(x):
        from slimformer.kernels import int8_linear as k

        check_mode(k.INTERPRET, x)
        return k.int8_linear(x, w_q, w_scale, bias, smooth)
    if smooth is not None:
        x = x * smooth
    # act_mode 0 (ORT's per-tensor uint8) runs its reference everywhere, the GPU included.
    return naive.int8_linear_ref(x, w_q, w_scale, bias, act_mode)


@int8_linear.register_fake
def _(x, w_q, w_scale, bias, act_mode):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.custom_op(
    "slimformer::int4_linear", mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor scales, Tensor? zero_points, Tensor? bias, "
           "int K, int block_size) -> Tensor",
)
def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bias: torch.Tensor | None,
    K: int,
    block_size: int,
) -> torch.Tensor:
    """y = x @ dequant(W).T + bias, W in ORT MatMulNBits layout (see kernels/packing.py).

    x: (..., K); qweight: (N, n_blocks, block_size // 2) uint8; scales: (N, n_blocks);
    zero_points: (N, ceil(n_blocks / 2)) uint8 packed, or None for 8; bias: (N,) or None.
    """
    return int4_linear_impl(x, qweight, scales, zero_points, bias, K, block_size)


def int4_linear_impl(x, qweight, scales, zero_points, bias, K: int, block_size: int):
    """The op's body, also called directly (no dispatcher) by the GPU runtime graph."""
    if use_triton(x):
        from slimformer.kernels import int4_linear as k

        if block_size in k.SUPPORTED_BLOCK_SIZES:
            check_mode(k.INTERPRET, x)
            return k.int4_linear(x, qweight, scales, zero_points, bias, K, block_size)
    return naive.int4_linear_ref(x, qweight, scales, zero_points, bias, K, block_size)


@int4_linear.register_fake
def _(x, qweight, scales, zero_points, bias, K, block_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))

from slimformer.kernels import attention_ops  # noqa: E402, F401  (slimformer::*_attention ops)
