"""Layer-wise structured pruning with optimal brain surgeon (OBS) updates, for FFN neurons.

For one FFN, X (tokens, K) is the input of its down projection on calibration text and W
(N, K) the down projection's weight. Removing neuron j and re-solving the least squares
min ||X W'^T - X W^T|| over the others costs  ||W[:, j]||^2 / [H^-1]_jj  (H = X^T X), and the
best update of the remaining columns is  W -= W[:, j] H^-1[j, :] / H^-1[j, j]  (Hassibi & Stork
1993; structured, as in Kurtic et al. 2023's ZipLM). Neurons are removed greedily, a few at a
time (block OBS), with H^-1 downdated after each removal: selection and reconstruction minimise the same
layer-output error, which a gradient score followed by a separate refit does not.

FFNs are pruned in execution order, each on activations that already see the earlier cuts
and their updates.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from slimformer.compiler.graph_utils import capture
from slimformer.compiler.numerics import batch_mask


def input_hessian(gm: GraphModule, nodes: list[Node], batches: list[dict], width: int) -> tuple[torch.Tensor, int]:
    """(X^T X over the real tokens of `batches` at every node in `nodes`, float64; tokens).
    A node's value is (..., width); padding tokens are left out where the mask lines up."""
    return input_hessians(gm, [nodes], batches, [width])[0]


def input_hessians(gm: GraphModule, node_groups: list[list[Node]], batches: list[dict],
                   widths: list[int]) -> list[tuple[torch.Tensor, int]]:
    """input_hessian for several groups of nodes, from one forward pass per batch."""
    hs = [torch.zeros(w, w, dtype=torch.float64) for w in widths]
    count = [0] * len(node_groups)
    group = {n: g for g, nodes in enumerate(node_groups) for n in nodes}

    def record(node, t, i):
        g = group[node]
        x = t.detach().reshape(-1, widths[g])
        m = batch_mask(batches[i])
        if m is not None and m.numel() == x.shape[0]:
            x = x[m.reshape(-1).bool()]
        hs[g].add_((x.float().T @ x.float()).double())
        count[g] += x.shape[0]

    capture(gm, list(group), batches, record, stop_early=True)
    return list(zip(hs, count))


def obs_select(h: torch.Tensor, w: torch.Tensor, n_keep: int, damp: float = 0.01,
               rounds: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS removal of input columns of w (N, K) down to n_keep, for inputs with
    second moment h (K, K). damp: added to the diagonal, times its mean. rounds: the removals
    are made in at most this many steps, each taking the lowest-cost columns together with
    the joint (block) update. Returns (sorted kept indices, updated w (N, K) with the removed
    columns zero). Pure function."""
    return obs_path(h, w, [n_keep], damp, rounds)[n_keep]


@torch.no_grad()
def obs_path(h: torch.Tensor, w: torch.Tensor, n_keeps: list[int], damp: float = 0.01,
             rounds: int = 32) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """obs_select at several widths in one greedy pass, down to the smallest, taking a
    snapshot at each of the others on the way (the step size is set by the deepest cut, so a
    shallower snapshot can differ slightly from obs_select run for it alone). Pure function."""
    if not n_keeps:
        return {}
    k = h.shape[0]
    h = h.double().clone()
    dead = h.diagonal() <= 0
    h.diagonal().add_(damp * h.diagonal().mean().clamp(min=1e-12))
    h[dead, dead] = 1.0
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = w.double().clone()
    alive = torch.ones(k, dtype=torch.bool)
    def stop_of(n: int) -> int:  # columns removed to keep n
        return min(max(k - n, 0), k)

    stops = sorted({stop_of(n) for n in n_keeps})  # shallowest first
    chunk = max(1, -(-stops[-1] // max(rounds, 1)))
    snapshots, removed = {}, 0
    for stop in stops:
        while removed < stop:
            c = min(chunk, stop - removed)
            score = w.pow(2).sum(0) / hinv.diagonal().clamp(min=1e-20)
            score[~alive] = float("inf")
            idx = score.topk(c, largest=False).indices
            rows = hinv[idx]  # (c, K)
            solve = torch.linalg.solve(rows[:, idx], rows)  # (Hinv_SS)^-1 Hinv_S:
            w -= w[:, idx] @ solve
            hinv -= hinv[:, idx] @ solve
            w[:, idx] = 0.0
            alive[idx] = False
            hinv[idx, :] = 0.0
            hinv[:, idx] = 0.0
            hinv[idx, idx] = 1.0  # keeps the removed indices inert
            removed += c
        snapshots[k - stop] = (alive.nonzero().flatten(), w.float())
    return {n: snapshots[k - stop_of(n)] for n in n_keeps}
