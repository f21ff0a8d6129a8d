"""How many neurons each FFN keeps under a global FFN cut, chosen by measured sensitivity.

Why: FFNs do not cost the model alike. On MiniLM-L6 after a 0.25 head cut, removing 40% of
one FFN's neurons (with its OBS update) lowers the output's mean cosine to the original by
0.006 in layer 2 and by 0.014 in layer 5. The uniform cut pays the expensive layers' price;
a Fisher ranking over all layers (prune_importance.select_global) is not comparable across
layers and emptied the last FFN. The cut's effect on the model's output is comparable.

How: per FFN, one greedy OBS pass (prune_obs.obs_path) gives the cut at a few shares around
the global one, each with the error it adds to the layer's output, trace(D H D^T). One of
them (the uniform share) is run through the model, on the calibration batches, to measure
the layer's gain: how much the mean cosine to the original falls per unit of that error.
A candidate's cost is its error times the gain; a knapsack then picks, per FFN, the width
with the least summed cost among choices that remove at least as many neurons as the
uniform cut (the uniform choice is one of them). One forward pass per FFN, not one per
candidate: on MiniLM the measured cost over the layer-output error stayed within 5% across
shares 0.2-0.7 in each layer (layers 0-5: 3.4-3.5, 1.9-2.0, 1.7-1.9, 2.1-2.2, 3.4-3.6,
4.8-4.9, in one unit), while it differed 3x between layers. Costs are taken as additive
(the sum of single-layer costs predicted the joint cut's within 5%).

MiniLM heads 0.25 + FFN 0.4 (widths 928, 768, 768, 768, 1080, 1232 instead of 928 each; the
same FLOPs; torch, 227 eval sentences' pooled cosine): held-out error after least squares
0.232 -> 0.222, after 2,000 distillation steps 0.141 -> 0.130 (seed 1: 0.143 -> 0.134);
pooled mean 0.969 -> 0.972 (seed 1: 0.967 -> 0.972), pooled min within noise (0.898 ->
0.898, seed 1 0.895 -> 0.891). A finer grid of shares (steps of 0.05, one forward per
candidate) gave 0.129: the five shares here take most of it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from slimformer.compiler.analysis import LinearSite, get_attr_tensor
from slimformer.compiler.graph_utils import set_attr_tensor
from slimformer.compiler.numerics import compare, run_batches
from slimformer.passes.prune_obs import obs_path

# Shares tried per FFN: the global fraction plus or minus these.
OFFSETS = (-0.2, -0.1, 0.0, 0.1, 0.2)


def kept_width(width: int, fraction: float, min_keep: int, multiple_of: int) -> int:
    """Neurons an FFN of `width` keeps at `fraction`: at least min_keep, rounded up to a
    multiple of multiple_of (GEMM-friendly), never more than width."""
    n_keep = max(width - int(fraction * width + 1e-9), min(min_keep, width))
    return min(width, -(-n_keep // multiple_of) * multiple_of)


def candidate_widths(width: int, fraction: float, min_keep: int, multiple_of: int) -> list[int]:
    """The widths tried for one FFN: the global fraction's, and its neighbours in OFFSETS
    (shares kept within [0, 0.95])."""
    shares = {min(max(fraction + d, 0.0), 0.95) for d in OFFSETS}
    return sorted({kept_width(width, s, min_keep, multiple_of) for s in shares})


def knapsack(costs: list[dict[int, float]], budget: int) -> list[int]:
    """Per group, one width (a key of its cost table) such that the widths sum to at most
    `budget` and the costs' sum is least (ties: the most kept). Raises ValueError when no
    choice fits. Dynamic programming over the running total of widths. Pure function."""
    best: dict[int, float] = {0: 0.0}  # running total -> least cost
    back: list[dict[int, tuple[int, int]]] = []  # per group: total -> (previous total, width)
    for table in costs:
        nxt: dict[int, float] = {}
        choice: dict[int, tuple[int, int]] = {}
        for used, cost in best.items():
            for width, c in table.items():
                total = used + width
                if total <= budget and (total not in nxt or cost + c < nxt[total]):
                    nxt[total], choice[total] = cost + c, (used, width)
        if not nxt:
            raise ValueError(f"no choice of widths fits a budget of {budget}")
        best = nxt
        back.append(choice)
    total = min(best, key=lambda t: (best[t], -t))
    plan = []
    for choice in reversed(back):
        total, width = choice[total]
        plan.append(width)
    return plan[::-1]


@torch.no_grad()
def measured_widths(gm: GraphModule, downs: list[LinearSite], hessians: list[torch.Tensor],
                    widths: list[list[int]], probes: list[int], batches: list[dict], reference: list,
                    budget: int, damp: float, progress=None) -> tuple[list[int], list[dict[int, float]]]:
    """Kept width per FFN group, and the cost table behind the choice.

    downs: per group, its down projection (one call of it: shared weights are one tensor);
    hessians: its input's second moment (prune_obs.input_hessian); widths: the candidates;
    probes: per group, the candidate whose cut is run through the model (the uniform width);
    reference: the original model's outputs on `batches`. A candidate's cost is its
    layer-output error times the group's gain, measured at the probe: how much that cut
    lowers the mean cosine to the reference, per unit of its layer-output error. The probe's
    OBS weight is set, scored and the stored weight put back: gm computes what it did on
    return."""
    def cost() -> float:
        return 1.0 - compare(reference, run_batches(gm, batches), batches).cos_mean

    base = cost()
    task = progress.add_task("FFN allocation", total=len(downs)) if progress else None
    costs: list[dict[int, float]] = []
    try:
        for down, h, candidates, probe in zip(downs, hessians, widths, probes):
            w = down.weight(gm)  # (N, K)
            cuts = obs_path(h, w, [n for n in candidates if n < w.shape[1]], damp=damp)
            error = {n: _output_error(w, w_n, h) for n, (_, w_n) in cuts.items()}
            if probe not in cuts and cuts:
                probe = max(cuts)  # the uniform share cuts nothing here: probe the shallowest cut
            gain = 0.0
            if error.get(probe, 0.0) > 0:
                stored = get_attr_tensor(gm, down.weight_node)
                w_probe = cuts[probe][1] if down.kind == "linear" else cuts[probe][1].T
                try:
                    set_attr_tensor(gm, down.weight_node.target, w_probe.to(stored.dtype))
                    # A cut that happens to move the output towards the original counts as free.
                    gain = max(cost() - base, 0.0) / error[probe]
                finally:
                    set_attr_tensor(gm, down.weight_node.target, stored)
            costs.append({n: gain * error.get(n, 0.0) for n in candidates})
            if task is not None:
                progress.advance(task)
    finally:
        if task is not None:
            progress.remove_task(task)
    return knapsack(costs, budget), costs


def _output_error(w: torch.Tensor, w_cut: torch.Tensor, h: torch.Tensor) -> float:
    """Squared error the cut adds to the layer's output summed over the calibration tokens:
    trace(D H D^T), D = w - w_cut (N, K), H = X^T X."""
    d = w.float() - w_cut.float()
    return torch.einsum("nk,kj,nj->", d, h.float(), d).item()
