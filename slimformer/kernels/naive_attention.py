"""Plain-PyTorch references for slimformer's attention ops, and their sub-quadratic spellings.

Two kinds of function per op:
  *_ref       the definition, written the obvious (quadratic) way; tests compare against it.
  *_chunked / *_blocked
              the same arithmetic with no (T x T) intermediate, in ops that ONNX Runtime runs
              (matmul, cumsum, softmax, reshape, pad): the CPU lowering swaps the custom op for
              this, and the op's autograd differentiates through it.

Shapes: q (B, H, T, Dq), k (B, H, S, Dq), v (B, H, S, D); outputs (B, H, T, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LINEAR_EPS = 1e-6
CAUSAL_CHUNK = 64  # rows per chunk of the causal form: a (C x C) block per chunk, state per chunk


# ---------------------------------------------------------------------------------------------
# linear attention: out_t = phi(q_t) . sum_s phi(k_s) v_s^T / phi(q_t) . sum_s phi(k_s)
# (q, k here are already feature-mapped, non-negative; masked keys have zero features)
# ---------------------------------------------------------------------------------------------


def linear_attention_ref(q, k, v, causal: bool, eps: float = LINEAR_EPS):
    scores = q.float() @ k.float().transpose(-2, -1)  # (B, H, T, S)
    if causal:
        scores = scores.tril()
    out = (scores @ v.float()) / (scores.sum(-1, keepdim=True) + eps)
    return out.to(v.dtype)


def linear_attention_noncausal(q, k, v, eps: float = LINEAR_EPS):
    qf, kf, vf = q.float(), k.float(), v.float()
    kv = kf.transpose(-2, -1) @ vf  # (B, H, F, D)
    z = kf.sum(2).unsqueeze(-1)  # (B, H, F, 1)
    return ((qf @ kv) / (qf @ z + eps)).to(v.dtype)


def linear_attention_chunked(q, k, v, causal: bool, eps: float = LINEAR_EPS, chunk: int = CAUSAL_CHUNK):
    """Causal: per chunk of C rows, the exact (C x C) lower-triangular part plus the running
    state sum_{s < chunk start} phi(k_s) v_s^T (an exclusive cumsum over chunks)."""
    if not causal:
        return linear_attention_noncausal(q, k, v, eps)
    B, H, T, Fd = q.shape
    D = v.shape[-1]
    # pad to whole chunks with zero rows (zero features add nothing to any state); spelt
    # n * C - T so that torch.export can prove the reshape below for every T (no guard on T)
    n = (T + chunk - 1) // chunk
    pad = n * chunk - T
    qf, kf, vf = (F.pad(x.float(), (0, 0, 0, pad)) for x in (q, k, v))
    qc = qf.reshape(B, H, n, chunk, Fd)  # (B, H, N, C, F)
    kc = kf.reshape(B, H, n, chunk, Fd)
    vc = vf.reshape(B, H, n, chunk, D)  # (B, H, N, C, D)
    kv = kc.transpose(-2, -1) @ vc  # (B, H, N, F, D)
    ks = kc.sum(3)  # (B, H, N, F)
    state = torch.cumsum(kv, dim=2) - kv  # exclusive: chunks strictly before
    zstate = torch.cumsum(ks, dim=2) - ks
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-2, -1)) * tri  # (B, H, N, C, C)
    num = qc @ state + scores @ vc  # (B, H, N, C, D)
    den = (qc * zstate.unsqueeze(3)).sum(-1, keepdim=True) + scores.sum(-1, keepdim=True)
    out = (num / (den + eps)).reshape(B, H, n * chunk, D)[:, :, :T]
    return out.to(v.dtype)


# ---------------------------------------------------------------------------------------------
# block-sparse (local + global) attention
#
# Pattern, for window W and G global tokens: query i in block b = i // W attends to keys in
# blocks b-1, b, b+1 (causal: b-1, b, and j <= i), plus keys j < G; a query i < G attends to
# every key (causal: j <= i). With T <= W there is one block: plain softmax attention, exactly.
# ---------------------------------------------------------------------------------------------


def local_pattern(T: int, S: int, window: int, global_tokens: int, causal: bool, device=None):
    """(T, S) bool: True where query i may attend to key j."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    near = ((i // window) - (j // window)).abs() <= 1
    allowed = near | (j < global_tokens) | (i < global_tokens)
    if causal:
        allowed &= j <= i
    return allowed


def block_sparse_attention_ref(q, k, v, key_mask, window: int, global_tokens: int, causal: bool,
                               scale: float | None = None):
    T, S = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = local_pattern(T, S, window, global_tokens, causal, q.device)  # (T, S)
    if key_mask is not None:
        allowed = allowed & (key_mask != 0)[:, None, None, :]  # (B, 1, T, S)
    scores = (q.float() * scale) @ k.float().transpose(-2, -1)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    return (torch.softmax(scores, dim=-1) @ v.float()).to(v.dtype)


def block_sparse_attention_blocked(q, k, v, key_mask, window: int, global_tokens: int, causal: bool,
                                   scale: float | None = None):
    """Padded windows: the sequence is cut into N blocks of W; block b's queries score, in one
    matmul and one softmax, the G global keys and the 3W keys of blocks b-1..b+1 (causal: 2W,
    b-1 and b); the G global query rows are computed densely (G x T) and written over the
    first rows. Cost O(T * (G + 3W)), no (T x T) intermediate.

    The padding/duplicate-global mask depends on the key alone, so it rides along as one extra
    channel: q' = [q * scale, 1], k' = [k, bias] -- the score matmul adds it, and no pass over
    the (B, H, N, W, G + 3W) scores is spent on masking (an Add there cost ~20% on ORT)."""
    B, H, T, Dq = q.shape
    D = v.shape[-1]
    W, G = window, min(global_tokens, T)  # G > T: every token is global
    scale = Dq ** -0.5 if scale is None else scale
    qs, kf, vf = q.float() * scale, k.float(), v.float()
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask != 0
    pos = torch.arange(T, device=q.device)
    n = (T + W - 1) // W
    pad = n * W - T  # not (-T) % W: torch.export must prove the reshapes for every T
    ones = torch.ones(B, H, n * W, 1, device=q.device)
    qb = torch.cat([F.pad(qs, (0, 0, 0, pad)), ones], dim=-1).reshape(B, H, n, W, Dq + 1)
    # keys: one block of padding on each side, then the G global keys (with their own mask)
    local_ok = F.pad(valid & (pos >= G), (W, pad + W), value=False)  # (B, (N+2)W): globals live apart
    kp = torch.cat([F.pad(kf, (0, 0, W, pad + W)), additive_mask(local_ok)[:, None, :, None].expand(B, H, -1, 1)], dim=-1)
    vp = F.pad(vf, (0, 0, W, pad + W))
    shifts = (0, 1) if causal else (0, 1, 2)  # blocks b-1, b (, b+1) in padded block numbering
    L = len(shifts) * W
    rows = torch.arange(n, device=q.device)[:, None] * W + torch.arange(L, device=q.device)  # (N, nW)
    if global_tokens > 0:  # the global keys, the first G keys of every block's window
        kg = torch.cat([kf[:, :, :G], additive_mask(valid[:, :G])[:, None, :, None].expand(B, H, -1, 1)], dim=-1)
        kp, vp = torch.cat([kp, kg], dim=2), torch.cat([vp, vf[:, :, :G]], dim=2)
        globs = (n + 2) * W + torch.arange(G, device=q.device)
        rows = torch.cat([globs[None, :].expand(n, G), rows], dim=1)  # (N, G + nW)
    # every block's window in one Gather of key rows: no per-shift Slice and Concat copies
    width = L + (G if global_tokens > 0 else 0)
    kw = kp.index_select(2, rows.flatten()).reshape(B, H, n, width, Dq + 1)  # (B, H, N, G + nW, Dq + 1)
    vw = vp.index_select(2, rows.flatten()).reshape(B, H, n, width, D)  # (B, H, N, G + nW, D)
    scores = qb @ kw.transpose(-2, -1)  # (B, H, N, W, G + nW), masks included
    if causal:  # key position <= query position: depends on both, an Add of a (N, W, G + nW) bias
        blocks = torch.arange(n, device=q.device)[:, None]
        kpos = torch.cat([((blocks + s - 1) * W + torch.arange(W, device=q.device)[None, :]) for s in shifts], dim=1)
        if global_tokens > 0:
            kpos = torch.cat([torch.arange(G, device=q.device)[None, :].expand(n, G), kpos], dim=1)
        qpos = torch.arange(n * W, device=q.device).reshape(n, W)
        scores = scores + additive_mask(kpos[:, None, :] <= qpos[:, :, None])
    out = (torch.softmax(scores, dim=-1) @ vw).reshape(B, H, n * W, D)[:, :, :T]
    if global_tokens > 0:  # global query rows attend to every key
        ok = valid[:, None, None, :]  # (B, 1, 1, T)
        if causal:
            ok = ok & (pos[None, :] <= pos[:G, None])
        sq = qs[:, :, :G] @ kf.transpose(-2, -1) + additive_mask(ok)  # (B, H, G, T)
        out = torch.cat([torch.softmax(sq, dim=-1) @ vf, out[:, :, G:]], dim=2)
    return out.to(v.dtype)


# ---------------------------------------------------------------------------------------------
# hybrid attention (after LoLCATs, Zhang et al. 2024): the local pattern's keys in exact softmax,
# every other key through linear attention, normalised together:
#   out_i = (sum_{j near} p_ij v_j + sum_{j far} phi(q_i).phi(k_j) v_j) / (1 + sum_{j far} phi(q_i).phi(k_j))
# p_ij = softmax over i's near keys ("near" = local_pattern): the near keys hold weight 1 and the
# far keys add theirs on that scale. (LoLCATs weighs the far keys against e^{s_ij - max s_i}
# instead; on MiniLM this form fits softmax better -- KL 0.03-0.05 vs 0.04-0.08 nats per row,
# 6 layers, window 64, 2 x 64 features -- and its near part is block_sparse_attention as is.)
# Local attention drops the far keys' weight; here they keep it, at linear cost. Global query
# rows have no far keys.
# ---------------------------------------------------------------------------------------------


def hybrid_attention_ref(q, k, v, fq, fk, key_mask, window: int, global_tokens: int, causal: bool,
                         scale: float | None = None, eps: float = LINEAR_EPS):
    """q, k (B, H, T, Dq), v (B, H, T, D); fq, fk (B, H, T, F) the non-negative features of q, k
    (the far keys' weights are fq . fk: any per-head factor belongs in fk)."""
    B, H, T, Dq = q.shape
    scale = Dq ** -0.5 if scale is None else scale
    pattern = local_pattern(T, T, window, global_tokens, causal, q.device)  # (T, T)
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask != 0
    near = pattern & valid[:, None, None, :]  # (B, 1, T, T)
    far = ~pattern & valid[:, None, None, :]
    if causal:
        far = far & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    a = hybrid_weights(q.float(), k.float(), fq.float(), fk.float(), near, far, scale)
    return ((a @ v.float()) / (a.sum(-1, keepdim=True) + eps)).to(v.dtype)


def hybrid_weights(q, k, fq, fk, near, far, scale: float):
    """Hybrid attention's unnormalised weights (B, H, T, S): softmax over the near keys (they
    sum to 1), plus fq . fk on the far ones. near, far: bool, broadcastable to (B, H, T, S)."""
    s = ((q * scale) @ k.transpose(-2, -1)).masked_fill(~near, torch.finfo(q.dtype).min)
    return torch.softmax(s, dim=-1) * near + (fq @ fk.transpose(-2, -1)) * far


def hybrid_far_field(fq, fk, v, key_mask, window: int, global_tokens: int, causal: bool):
    """The far keys' part of hybrid attention: numerator (B, H, T, D) and denominator (B, H, T),
    from per-block states S_c = sum_{j in block c} phi(k_j) v_j^T (B, H, N, F, D): block b's far
    state is the total minus blocks b-1..b+1 (causal: the blocks before b-1, an exclusive
    cumsum). Global keys are always near (zeroed out of the states here), global rows get 0.
    O(T F D), no (T x T) or (T x W) intermediate."""
    B, H, T, Fd = fq.shape
    D = v.shape[-1]
    W, G = window, min(global_tokens, T)
    pos = torch.arange(T, device=fq.device)
    valid = torch.ones(B, T, dtype=torch.bool, device=fq.device) if key_mask is None else key_mask != 0
    keep = (valid & (pos >= G)).to(torch.float32)[:, None, :, None]  # (B, 1, T, 1)
    n = (T + W - 1) // W
    pad = n * W - T
    qb = F.pad(fq.float(), (0, 0, 0, pad)).reshape(B, H, n, W, Fd)
    kb = F.pad(fk.float(), (0, 0, 0, pad)).reshape(B, H, n, W, Fd)
    # [v | 1] with the normaliser as one more column, dropped keys zeroed on this side: D + 1
    # columns to multiply rather than the F of phi(k)
    vk = torch.cat([v.float() * keep, keep.expand(B, H, T, 1)], dim=-1)
    vb = F.pad(vk, (0, 0, 0, pad)).reshape(B, H, n, W, D + 1)
    st = kb.transpose(-2, -1) @ vb  # (B, H, N, F, D + 1): [phi(k)^T v | phi(k)^T 1] per block
    if causal:
        far = F.pad(torch.cumsum(st, dim=2), (0, 0, 0, 0, 2, 0))[:, :, :n]  # blocks <= b - 2
    else:
        sp = F.pad(st, (0, 0, 0, 0, 1, 1))  # (B, H, N + 2, F, D + 1)
        far = st.sum(2, keepdim=True) - (sp[:, :, :n] + sp[:, :, 1:n + 1] + sp[:, :, 2:n + 2])
    nd = (qb @ far).reshape(B, H, n * W, D + 1)[:, :, :T] * (pos >= G).to(torch.float32)[:, None]
    return nd[..., :D], nd[..., D]


def hybrid_combine(local_out, far_num, far_den, eps: float = LINEAR_EPS):
    """(local attention's output + the far numerator) / (1 + the far denominator)."""
    return ((local_out.float() + far_num) / (1.0 + far_den + eps).unsqueeze(-1)).to(local_out.dtype)


def hybrid_attention_blocked(q, k, v, fq, fk, key_mask, window: int, global_tokens: int, causal: bool,
                             scale: float | None = None, eps: float = LINEAR_EPS):
    """Sub-quadratic hybrid attention: block_sparse_attention_blocked for the near keys, plus
    hybrid_far_field, combined."""
    local = block_sparse_attention_blocked(q.float(), k.float(), v.float(), key_mask, window, global_tokens,
                                           causal, scale)
    far_num, far_den = hybrid_far_field(fq, fk, v, key_mask, window, global_tokens, causal)
    return hybrid_combine(local, far_num, far_den, eps).to(v.dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bool mask as a score bias: 0 where allowed, dtype's min / 2 elsewhere (adding a score
    to it cannot overflow to -inf, so a row with nothing allowed stays finite)."""
    bias = torch.where(allowed, 0.0, torch.finfo(dtype).min / 2)
    return bias if bias.dtype == dtype else bias.to(dtype)  # no Cast in the exported graph
