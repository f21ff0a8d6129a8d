"""Linear attention, non-causal and chunked causal, in one Triton kernel.

Motivation
----------
Softmax attention reads and writes O(T^2) scores per head. With a non-negative feature map
phi, attention becomes phi(Q) (phi(K)^T V) / (phi(Q) . sum phi(K)): the (F x D) state
phi(K)^T V is all a query needs, so time is O(T F D) and memory O(F D) per head. Causal
attention needs, at row t, the state of the rows <= t; the chunked form keeps a running state
across chunks of C rows and does the (C x C) lower-triangular part inside each chunk exactly
with one small matmul, so the GPU works on tensor-core tiles, never on single rows.

Kernel: one program per (batch x head, D-slice of the output). It walks the sequence in
chunks of BLOCK_T rows, keeping state (BLOCK_F x BLOCK_D) and normaliser z (BLOCK_F,) in
registers, fp32:
  causal:      out_c = (q_c S + tril(q_c k_c^T) v_c) / (q_c z + rowsum(tril(q_c k_c^T)) + eps),
               then S += k_c^T v_c, z += colsum(k_c)
  non-causal:  a first sweep builds S, z over all rows; a second writes q_c S / (q_c z + eps).
Arithmetic as `naive_attention.linear_attention_ref` (fp32 accumulation; tf32 dots on GPUs).
Forward only: the op's autograd differentiates the plain-PyTorch chunked form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimformer.kernels._triton import interpret_requested, next_pow2

INTERPRET = interpret_requested()


@triton.jit
def _linear_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,  # q, k (BH, T, F); v, o (BH, T, D); contiguous
    T, F, D, eps,
    CAUSAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    rows = tl.arange(0, BLOCK_T)  # (BT,)
    fcols = tl.arange(0, BLOCK_F)  # (BF,)
    dcols = d0 + tl.arange(0, BLOCK_D)  # (BD,)
    f_ok, d_ok = fcols < F, dcols < D
    q_base, k_base = q_ptr + bh * T * F, k_ptr + bh * T * F
    v_base, o_base = v_ptr + bh * T * D, o_ptr + bh * T * D
    state = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    z = tl.zeros((BLOCK_F,), dtype=tl.float32)
    if not CAUSAL:  # first sweep: the whole sequence's state
        for t0 in range(0, T, BLOCK_T):
            t_ok = (t0 + rows) < T
            k = tl.load(k_base + (t0 + rows)[:, None] * F + fcols[None, :], mask=t_ok[:, None] & f_ok[None, :],
                        other=0.0).to(tl.float32)  # (BT, BF)
            v = tl.load(v_base + (t0 + rows)[:, None] * D + dcols[None, :], mask=t_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)  # (BT, BD)
            state += tl.dot(tl.trans(k), v)
            z += tl.sum(k, axis=0)
    for t0 in range(0, T, BLOCK_T):
        t_ok = (t0 + rows) < T
        q = tl.load(q_base + (t0 + rows)[:, None] * F + fcols[None, :], mask=t_ok[:, None] & f_ok[None, :],
                    other=0.0).to(tl.float32)  # (BT, BF)
        num = tl.dot(q, state)  # (BT, BD): the chunks before (causal) or everything
        den = tl.sum(q * z[None, :], axis=1)  # (BT,)
        if CAUSAL:
            k = tl.load(k_base + (t0 + rows)[:, None] * F + fcols[None, :], mask=t_ok[:, None] & f_ok[None, :],
                        other=0.0).to(tl.float32)
            v = tl.load(v_base + (t0 + rows)[:, None] * D + dcols[None, :], mask=t_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k))  # (BT, BT)
            s = tl.where(rows[:, None] >= rows[None, :], s, 0.0)
            num += tl.dot(s, v)
            den += tl.sum(s, axis=1)
            state += tl.dot(tl.trans(k), v)
            z += tl.sum(k, axis=0)
        out = num / (den[:, None] + eps)
        tl.store(o_base + (t0 + rows)[:, None] * D + dcols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & d_ok[None, :])


MAX_STATE = 8192  # fp32 state elements a program keeps in registers (32 KB)


def launch_params(T: int, F: int, D: int) -> dict:
    # tl.dot needs every dim >= 16; the interpreter is fastest with few, large chunks
    block_t = 64 if not INTERPRET else max(16, min(128, next_pow2(T)))
    block_f = max(16, next_pow2(F))
    # wide feature maps (Hedgehog with 2 x 128 features): narrower D-slices, more programs,
    # so that the (BLOCK_F x BLOCK_D) state stays in registers instead of spilling
    block_d = max(16, min(64, next_pow2(D), MAX_STATE // block_f))
    return dict(BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_D=block_d, num_warps=4)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, eps: float) -> torch.Tensor:
    """q, k (B, H, T, F) non-negative features, v (B, H, T, D) -> (B, H, T, D) in v's dtype."""
    B, H, T, F = q.shape
    D = v.shape[-1]
    q3, k3, v3 = (x.reshape(B * H, T, x.shape[-1]).contiguous() for x in (q, k, v))
    out = torch.empty((B * H, T, D), dtype=v.dtype, device=v.device)
    if T == 0 or B * H == 0:
        return out.reshape(B, H, T, D)
    meta = launch_params(T, F, D)
    grid = (B * H, triton.cdiv(D, meta["BLOCK_D"]))
    _linear_attention_kernel[grid](q3, k3, v3, out, T, F, D, eps, CAUSAL=causal, **meta)
    return out.reshape(B, H, T, D)


if __name__ == "__main__":  # reference check on an odd shape, then a benchmark (GPU)
    from slimformer.kernels.naive_attention import linear_attention_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for causal in (False, True):
        q, k = (torch.rand(2, 3, 37, 24, device=dev) for _ in range(2))
        v = torch.randn(2, 3, 37, 40, device=dev)
        err = (linear_attention(q, k, v, causal, 1e-6) - linear_attention_ref(q, k, v, causal)).abs().max()
        print(f"causal={causal} max abs err {err:.2e}")
    if dev == "cuda":
        for T in (1024, 4096, 16384):
            q, k = (torch.rand(1, 12, T, 128, device=dev, dtype=torch.float16) for _ in range(2))
            v = torch.randn(1, 12, T, 64, device=dev, dtype=torch.float16)
            for causal in (False, True):
                ms = triton.testing.do_bench(lambda q=q, k=k, v=v, c=causal: linear_attention(q, k, v, c, 1e-6))
                print(f"T={T} causal={causal}: {ms:.3f} ms")
