"""`slimformer::linear_attention`, `slimformer::block_sparse_attention` and
`slimformer::hybrid_attention` (the two combined): the custom ops the
attention-replacement pass puts in the graph (registered on import of `slimformer.kernels.ops`).

Each has a fake kernel (for torch.export), runs its Triton kernel where `use_triton` says so,
else its sub-quadratic plain-PyTorch spelling from `naive_attention` (the one the CPU lowering
exports to ONNX). Autograd always differentiates that spelling (recomputed in backward), so
recovery training works on any device; the Triton kernels are forward-only.
"""

from __future__ import annotations

import torch

from slimformer.kernels import naive_attention as ref
from slimformer.kernels._triton import check_mode, use_triton


@torch.library.custom_op("slimformer::linear_attention", mutates_args=())
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     eps: float) -> torch.Tensor:
    """phi(q) (phi(k)^T v) / (phi(q) . sum phi(k)); q, k: (B, H, T, F) feature-mapped,
    non-negative (masked keys zeroed); v: (B, H, T, D) -> (B, H, T, D)."""
    if use_triton(q):
        from slimformer.kernels import linear_attention as kernel

        check_mode(kernel.INTERPRET, q)
        return kernel.linear_attention(q, k, v, causal, eps)
    return ref.linear_attention_chunked(q, k, v, causal, eps)


@linear_attention.register_fake
def _(q, k, v, causal, eps):
    return v.new_empty((*q.shape[:-1], v.shape[-1]))


def _linear_setup(ctx, inputs, output):
    q, k, v, causal, eps = inputs
    ctx.save_for_backward(q, k, v)
    ctx.causal, ctx.eps = causal, eps


def _linear_backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    fn = lambda q, k, v: ref.linear_attention_chunked(q, k, v, ctx.causal, ctx.eps)  # noqa: E731
    with torch.enable_grad():
        _, vjp = torch.func.vjp(fn, q, k, v)
        gq, gk, gv = vjp(grad)
    return gq, gk, gv, None, None


linear_attention.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("slimformer::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_mask: torch.Tensor | None, window: int, global_tokens: int,
                           causal: bool, scale: float) -> torch.Tensor:
    """Sliding-window (blocks of `window`) + `global_tokens` softmax attention (see
    naive_attention.local_pattern). key_mask: (B, S), nonzero = a real token, or None."""
    if use_triton(q):
        from slimformer.kernels import block_sparse_attention as kernel

        check_mode(kernel.INTERPRET, q)
        return kernel.block_sparse_attention(q, k, v, key_mask, window, global_tokens, causal, scale)
    return ref.block_sparse_attention_blocked(q, k, v, key_mask, window, global_tokens, causal, scale)


@block_sparse_attention.register_fake
def _(q, k, v, key_mask, window, global_tokens, causal, scale):
    return v.new_empty((*q.shape[:-1], v.shape[-1]))


def _local_setup(ctx, inputs, output):
    q, k, v, key_mask, window, global_tokens, causal, scale = inputs
    ctx.save_for_backward(q, k, v, key_mask)
    ctx.args = (window, global_tokens, causal, scale)


def _local_backward(ctx, grad):
    q, k, v, key_mask = ctx.saved_tensors
    fn = lambda q, k, v: ref.block_sparse_attention_blocked(q, k, v, key_mask, *ctx.args)  # noqa: E731
    with torch.enable_grad():
        _, vjp = torch.func.vjp(fn, q, k, v)
        gq, gk, gv = vjp(grad)
    return gq, gk, gv, None, None, None, None, None


block_sparse_attention.register_autograd(_local_backward, setup_context=_local_setup)


@torch.library.custom_op("slimformer::hybrid_attention", mutates_args=())
def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor,
                     key_mask: torch.Tensor | None, window: int, global_tokens: int, causal: bool,
                     scale: float, eps: float) -> torch.Tensor:
    """Block-sparse softmax attention over the local pattern plus linear attention over every
    other key (naive_attention.hybrid_attention_ref). fq, fk (B, H, T, F): non-negative
    features of q and k. On the GPU: the block-sparse kernel, the far keys' per-block states
    as batched matmuls (hybrid_far_field), one elementwise combination."""
    if use_triton(q):
        from slimformer.kernels import block_sparse_attention as kernel

        check_mode(kernel.INTERPRET, q)
        local = kernel.block_sparse_attention(q, k, v, key_mask, window, global_tokens, causal, scale)
        far_num, far_den = ref.hybrid_far_field(fq, fk, v, key_mask, window, global_tokens, causal)
        return ref.hybrid_combine(local, far_num, far_den, eps)
    return ref.hybrid_attention_blocked(q, k, v, fq, fk, key_mask, window, global_tokens, causal, scale, eps)


@hybrid_attention.register_fake
def _(q, k, v, fq, fk, key_mask, window, global_tokens, causal, scale, eps):
    return v.new_empty((*q.shape[:-1], v.shape[-1]))


def _hybrid_setup(ctx, inputs, output):
    q, k, v, fq, fk, key_mask, *args = inputs
    ctx.save_for_backward(q, k, v, fq, fk, key_mask)
    ctx.args = tuple(args)


def _hybrid_backward(ctx, grad):
    q, k, v, fq, fk, key_mask = ctx.saved_tensors
    fn = lambda *t: ref.hybrid_attention_blocked(*t, key_mask, *ctx.args)  # noqa: E731
    with torch.enable_grad():
        _, vjp = torch.func.vjp(fn, q, k, v, fq, fk)
        grads = vjp(grad)
    return (*grads, None, None, None, None, None, None)


hybrid_attention.register_autograd(_hybrid_backward, setup_context=_hybrid_setup)
