"""Block-sparse attention: sliding window (blocks of W) plus G global tokens, in Triton.

Motivation
----------
Long-document encoders (Longformer, BigBird) keep softmax attention but let each token see
only its neighbourhood, plus a few global tokens that see and are seen by everything. Per
query that is G + 3W keys instead of T: O(T (G + 3W)) work, and no (T x T) scores in memory.
Exact softmax attention when the sequence fits in one window block.

Pattern (as `naive_attention.local_pattern`): query i in block b = i // W sees the keys of
blocks b-1, b, b+1 (causal: b-1, b and j <= i) and the keys j < G; a query i < G sees every key
(causal: j <= i); keys with key_mask == 0 are never seen.

Kernel: flash-attention style, one program per (batch x head, tile of BLOCK_M queries), an
online softmax in fp32 over two key segments: the global keys [0, G), then the local span of
the tile's blocks, [max(lo, G), hi) (no key is visited twice). A tile holding a global query
row walks every key instead. Scores outside the exact pattern get a finite -1e30, so a row
with no visible key (a padding query) stays finite. Forward only (autograd: the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimformer.kernels._triton import interpret_requested, next_pow2

INTERPRET = interpret_requested()
# a global that a compiled kernel reads must be a constexpr (the interpreter accepts a float)
MASKED = tl.constexpr(-1.0e30)


@triton.jit
def _block_sparse_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, m_ptr,  # q, k (BH, T, Dq); v, o (BH, T, D); m (B, T) int32
    H, T, Dq, D, W, G, scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    m0 = tl.program_id(1) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)  # (BM,) query positions
    cols = tl.arange(0, BLOCK_N)
    dq, dv = tl.arange(0, BLOCK_DQ), tl.arange(0, BLOCK_D)
    row_ok = rows < T
    q = tl.load(q_ptr + bh * T * Dq + rows[:, None] * Dq + dq[None, :],
                mask=row_ok[:, None] & (dq[None, :] < Dq), other=0.0)
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)  # (BM, BDq)
    k_base, v_base = k_ptr + bh * T * Dq, v_ptr + bh * T * D
    m_base = m_ptr + (bh // H) * T

    # key segments: [0, hi1) the globals (or everything, for a tile with global rows), [lo2, hi2) local
    last = tl.minimum(m0 + BLOCK_M, T) - 1
    lo = tl.maximum((m0 // W - 1) * W, 0)
    hi = tl.minimum((last // W + 2) * W, T)
    if CAUSAL:
        hi = tl.minimum(hi, last + 1)
    is_global = m0 < G
    hi1 = tl.where(is_global, T, tl.minimum(G, T))
    lo2 = tl.maximum(lo, G)
    hi2 = tl.where(is_global, 0, hi)

    m_i = tl.full((BLOCK_M,), MASKED, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for seg in tl.static_range(2):
        start = 0 if seg == 0 else lo2
        stop = hi1 if seg == 0 else hi2
        for n0 in range(start, stop, BLOCK_N):
            keys = n0 + cols  # (BN,)
            key_ok = keys < stop
            k = tl.load(k_base + keys[:, None] * Dq + dq[None, :], mask=key_ok[:, None] & (dq[None, :] < Dq), other=0.0)
            v = tl.load(v_base + keys[:, None] * D + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(k))  # (BM, BN) fp32
            near = tl.abs(rows[:, None] // W - keys[None, :] // W) <= 1
            ok = near | (keys[None, :] < G) | (rows[:, None] < G)
            if CAUSAL:
                ok = ok & (keys[None, :] <= rows[:, None])
            ok = ok & key_ok[None, :]
            if HAS_MASK:
                ok = ok & (tl.load(m_base + keys, mask=key_ok, other=0) != 0)[None, :]
            s = tl.where(ok, s, MASKED)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(o_ptr + bh * T * D + rows[:, None] * D + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < D))


def block_sparse_attention(q, k, v, key_mask, window: int, global_tokens: int, causal: bool,
                           scale: float) -> torch.Tensor:
    """q, k (B, H, T, Dq), v (B, H, T, D), key_mask (B, T) or None -> (B, H, T, D)."""
    B, H, T, Dq = q.shape
    D = v.shape[-1]
    if INTERPRET and v.dtype == torch.bfloat16:  # the interpreter's bf16 tl.dot returns garbage
        out = block_sparse_attention(q.float(), k.float(), v.float(), key_mask, window, global_tokens, causal, scale)
        return out.to(v.dtype)
    q3, k3, v3 = (x.reshape(B * H, T, x.shape[-1]).contiguous() for x in (q, k, v))
    out = torch.empty((B * H, T, D), dtype=v.dtype, device=v.device)
    if T == 0 or B * H == 0:
        return out.reshape(B, H, T, D)
    mask = (key_mask != 0).to(torch.int32).contiguous() if key_mask is not None else q3  # q3: unused
    block_m = 64 if not INTERPRET else max(16, min(64, next_pow2(T)))
    grid = (B * H, triton.cdiv(T, block_m))
    _block_sparse_kernel[grid](
        q3, k3, v3, out, mask, H, T, Dq, D, window, global_tokens, scale,
        HAS_MASK=key_mask is not None, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_m,
        BLOCK_DQ=max(16, next_pow2(Dq)), BLOCK_D=max(16, next_pow2(D)), num_warps=4)
    return out.reshape(B, H, T, D)


if __name__ == "__main__":  # reference check on an odd shape, then a benchmark (GPU)
    from slimformer.kernels.naive_attention import block_sparse_attention_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(2, 3, 129, 24, device=dev) for _ in range(3))
    mask = torch.ones(2, 129, dtype=torch.long, device=dev)
    mask[1, 100:] = 0
    for causal in (False, True):
        got = block_sparse_attention(q, k, v, mask, 16, 2, causal, 24 ** -0.5)
        want = block_sparse_attention_ref(q, k, v, mask, 16, 2, causal)
        err = ((got - want).abs() * mask[:, None, :, None]).max()
        print(f"causal={causal} max abs err (real rows) {err:.2e}")
    if dev == "cuda":
        for T in (1024, 4096, 16384):
            q, k, v = (torch.randn(1, 12, T, 64, device=dev, dtype=torch.float16) for _ in range(3))
            ms = triton.testing.do_bench(lambda q=q, k=k, v=v: block_sparse_attention(q, k, v, None, 256, 1, False, 0.125))
            ref = triton.testing.do_bench(lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            print(f"T={T}: block-sparse {ms:.3f} ms, SDPA {ref:.3f} ms")
