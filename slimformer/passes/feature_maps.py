"""Feature maps phi for linear attention, and Hedgehog's per-layer training of them.

Linear attention replaces softmax(q k^T) with phi(q) phi(k)^T, normalised per row. A fixed map
(ELU + 1, Katharopoulos et al. 2020) is cheap but spreads attention far flatter than softmax.
Hedgehog (Zhang et al. 2024) learns phi(x) = [softmax(x W), softmax(-x W)] per head, trained so
that the normalised phi(q) phi(k)^T matches that layer's softmax attention weights on
calibration activations (cross-entropy between the two distributions); that recovers the
"spiky" attention patterns a fixed map cannot represent. For hybrid attention the same fit
targets the hybrid's weights (softmax on the local window, phi on the other keys) and learns a
far-key weight per head with the maps.

All functions here are graph-callable: the pass inserts them as call_function nodes, so the
CPU lowering exports them as plain ONNX ops (MatMul, Softmax, Concat).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimformer.kernels.naive_attention import hybrid_weights, local_pattern

FEATURE_MAPS = ("hedgehog", "elu")


def elu_features(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), weight (H, D, F) -> (B, H, T, 2F), non-negative."""
    u = torch.matmul(x, weight)  # (B, H, T, F): one projection per head
    return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)


def scale_heads(phi_k: torch.Tensor, log_gain: torch.Tensor) -> torch.Tensor:
    """Hybrid attention's far-key weight per head: phi_k (B, H, S, F) * exp(log_gain (H, 1, 1))
    (a log, so that training cannot make a weight negative)."""
    return phi_k * torch.exp(log_gain)


def mask_keys(phi_k: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Zero the features of padding keys: they then add nothing to the sums. key_mask (B, S)."""
    return phi_k * (key_mask != 0).to(phi_k.dtype)[:, None, :, None]


# The default feature size per sign: at least 128. On MiniLM (head dim 32, all 6 layers linear,
# 256-token text) F = 128 vs F = 32 lifts the held-out pooled mean cosine from 0.932 to 0.956;
# on a 2-layer BERT-base-width model at 8192 tokens it costs ~7% of the whole model's time
# (bench/results/attention_cpu.json).
MIN_FEATURES = 128


LINEAR_LR = 0.02
# Hybrid attention, fitted on MiniLM (all 6 layers, window 64, F = 64, 150 steps): lr 0.01
# gives KL to softmax 0.03-0.05 per layer; the far keys' weight starts at exp(-0.69) = 0.5.
HYBRID_LR = 0.01
HYBRID_LOG_GAIN0 = -0.6931
# Sequences per fit step: each step costs O(B H T^2); the MiniLM figures were measured with
# calibration batches of 4 long windows, and the CLI's batches of 16 made each Hedgehog step 4x
# dearer (MiniLM hybrid, 256 tokens: 30 min for the pass). Bigger batches are subsampled.
STEP_SEQUENCES = 4


def default_feature_dim(head_dim: int) -> int:
    return max(head_dim, MIN_FEATURES)


def hedgehog_init(num_heads: int, head_dim: int, feature_dim: int | None = None) -> torch.Tensor:
    """(H, D, F): identity on the first min(D, F) columns (the paper's init: phi starts as a
    softmax over q's own channels), random N(0, 1/D) directions beyond D. Call after seeding."""
    f = feature_dim or head_dim
    w = torch.randn(num_heads, head_dim, f) * head_dim ** -0.5
    n = min(head_dim, f)
    w[:, :n, :n] = torch.eye(n)
    w[:, n:, :n] = 0.0
    return w


def _attention_targets(q, k, allowed, scale):
    """Softmax attention weights (B, H, T, S) of the original layer; `allowed` (B, 1, T, S)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    return torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)


def _linear_weights(phi_q, phi_k, allowed):
    a = (phi_q @ phi_k.transpose(-2, -1)) * allowed  # (B, H, T, S)
    return a / (a.sum(-1, keepdim=True) + 1e-6)


def _hybrid_weights(q, k, phi_q, phi_k, near, far, scale):
    """Hybrid attention's weights (B, H, T, S), normalised (naive_attention.hybrid_attention_ref)."""
    a = hybrid_weights(q, k, phi_q, phi_k, near, far, scale)
    return a / (a.sum(-1, keepdim=True) + 1e-6)


def train_hedgehog(samples: list[tuple], num_heads: int, head_dim: int, scale: float,
                   steps: int = 150, lr: float | None = None, seed: int = 0,
                   feature_dim: int | None = None, near: tuple[int, int] | None = None) -> tuple:
    """Fits (W_q, W_k), each (H, D, F), so the linear attention weights match softmax's.
    feature_dim F (default D): phi has 2F features; more fit spikier attention (on MiniLM,
    head dim 32, F = 128 roughly halves the KL to softmax of F = 32) at O(T F D) cost.
    near = (window, global_tokens): fit hybrid attention instead (the local pattern's keys in
    softmax, the far keys through phi; naive_attention.hybrid_attention_ref), with a far-key
    log-weight per head (H, 1, 1) learned alongside (scale_heads).

    samples: (q, k, allowed) per calibration batch; q, k (B, H, T, D) as the layer's attention
    saw them (after rotary), allowed (B, 1, T, S) bool (padding and causality).
    Returns W_q, W_k (, the log-weights, with near), and {"loss_start", "loss_end"}
    (cross-entropy, nats per query row; "features": phi's size, 2F).
    """
    torch.manual_seed(seed)
    wq = torch.nn.Parameter(hedgehog_init(num_heads, head_dim, feature_dim))
    wk = torch.nn.Parameter(hedgehog_init(num_heads, head_dim, feature_dim))
    gain = torch.nn.Parameter(torch.full((num_heads, 1, 1), HYBRID_LOG_GAIN0))
    params = [wq, wk] + ([gain] if near else [])
    opt = torch.optim.Adam(params, lr=lr or (HYBRID_LR if near else LINEAR_LR))
    with torch.no_grad():
        targets = [_attention_targets(q.float(), k.float(), m, scale) for q, k, m in samples]
        rows = [m.any(-1, keepdim=True).expand(-1, num_heads, -1, -1) for _, _, m in samples]
        pattern = [local_pattern(q.shape[2], k.shape[2], *near, causal=False) & m if near else None
                   for q, k, m in samples]

    def loss_of(i, pick=None):
        q, k, m = samples[i]
        target, row, near_i = targets[i], rows[i], pattern[i]
        if pick is not None:  # a few sequences of the batch (masks without a batch dim broadcast)
            q, k, target, row = q[pick], k[pick], target[pick], row[pick]
            m = m[pick] if m.shape[0] > 1 else m
            near_i = near_i[pick] if near and near_i.shape[0] > 1 else near_i
        q, k = q.float(), k.float()
        phi_q, phi_k = hedgehog_features(q, wq), hedgehog_features(k, wk)
        if near:
            pred = _hybrid_weights(q, k, phi_q, scale_heads(phi_k, gain), near_i, m & ~near_i, scale)
        else:
            pred = _linear_weights(phi_q, phi_k, m)
        ce = -(target * torch.log(pred + 1e-8)).sum(-1, keepdim=True)  # (B, H, T, 1)
        return ce[row].mean()

    def mean_loss():
        with torch.no_grad():
            return sum(loss_of(i).item() for i in range(len(samples))) / len(samples)

    start = mean_loss()
    gen = torch.Generator().manual_seed(seed)
    for step in range(max(steps, 0)):
        i = step % len(samples)
        b = samples[i][0].shape[0]
        pick = torch.randperm(b, generator=gen)[:STEP_SEQUENCES] if b > STEP_SEQUENCES else None
        opt.zero_grad()
        loss_of(i, pick).backward()
        opt.step()
    info = {"loss_start": round(start, 4), "loss_end": round(mean_loss(), 4), "features": 2 * wq.shape[-1]}
    return (*(p.detach() for p in params), info)
