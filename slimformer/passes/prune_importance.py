"""Label-free importance of structural units (attention heads, FFN neurons) from gates.

A gate g (ones) multiplies each unit's slice of an activation; the importance of a unit is the
Fisher information of its gate (Kwon et al. 2022, "A Fast Post-Training Pruning Framework"),
with the task loss replaced by a distance to the original model's outputs:

    L = 1/2 * sum_tokens || (f(x; g) - f_orig(x)) / sigma - eps ||^2,   eps ~ N(0, I)

At the unpruned point f == f_orig and a plain distance has zero gradient; the noise term makes
the squared gradient an unbiased estimate of the Gauss-Newton curvature of the distance (the
Fisher of a Gaussian output model with sampled labels), and once earlier passes moved f away
from f_orig the real error enters too. Gates are per sample, so squared gradients are per
sample, as the Fisher wants. sigma is each sample's output RMS (scale-free across models).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from slimformer.compiler.numerics import batch_mask, flat_tensors

aten = torch.ops.aten


def gate_point(node: Node) -> Node:
    """The (B, T, width) tensor to gate for a projection input: GPT-2's Conv1D reads a
    flattened (B*T, width) view, whose 3-D source keeps per-sample gates possible."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() == 2 and node.op == "call_function" \
            and node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        src = node.args[0]
        sval = src.meta.get("val") if isinstance(src, Node) else None
        if isinstance(sval, torch.Tensor) and sval.dim() == 3:
            return src
    return node


def gate_fisher(gm: GraphModule, batches: list[dict], targets: list[list[torch.Tensor]],
                points: list[tuple[Node, int]], progress=None, what: str = "importance",
                seed: int = 0) -> list[torch.Tensor]:
    """Per (node, units) point: (units,) summed squared gate gradients over `batches`.

    node: a (B, ..., units * size) activation; its last dim is split into `units` equal slices
    (heads, or neurons with size 1). targets: per batch, the original model's flat outputs.
    """
    gates: list[torch.Tensor | None] = [None] * len(points)
    fisher = [torch.zeros(u, dtype=torch.float64) for _, u in points]
    inserted = []

    def make_gate(i: int, units: int):
        def gate(x):  # (B, ..., units * size)
            g = gates[i]
            shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (units, 1)
            return (x.unflatten(-1, (units, -1)) * g.view(shape)).flatten(-2)
        return gate

    for i, (node, units) in enumerate(points):
        users = list(node.users)
        with gm.graph.inserting_after(node):
            g = gm.graph.call_function(make_gate(i, units), (node,))
        g.meta = dict(node.meta)
        for u in users:
            u.replace_input_with(node, g)
        inserted.append((node, g))
    gm.recompile()
    params = [p for p in gm.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    task = progress.add_task(what, total=len(batches)) if progress is not None else None
    try:
        for batch, target in zip(batches, targets):
            bsz = _batch_size(batch)
            for i, (_, units) in enumerate(points):
                gates[i] = torch.ones(bsz, units, requires_grad=True)
            with torch.enable_grad():
                out = flat_tensors(gm(**batch))[0].float()
                loss = _noisy_distance(out, target[0].float(), batch_mask(batch), gen)
                grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for i, gr in enumerate(grads):
                if gr is not None:
                    fisher[i] += gr.double().pow(2).sum(0)
            if task is not None:
                progress.advance(task)
    finally:
        for node, g in inserted:
            g.replace_all_uses_with(node)
            gm.graph.erase_node(g)
        gm.recompile()
        for p in params:
            p.requires_grad_(True)
        if task is not None:
            progress.remove_task(task)
    return [f.float() for f in fisher]


def _noisy_distance(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None,
                    gen: torch.Generator) -> torch.Tensor:
    """sum over samples of 1/2 ||(out - ref) / sigma - eps||^2 over real tokens."""
    b = out.shape[0]
    keep = torch.ones(out.shape[:-1]) if out.dim() < 2 else torch.ones(out.shape[:2])
    if mask is not None and out.dim() >= 3 and mask.shape == out.shape[:2]:
        keep = mask.float()
    while keep.dim() < out.dim():
        keep = keep.unsqueeze(-1)
    sq = (ref.pow(2) * keep).reshape(b, -1).sum(1)
    n = keep.expand_as(ref).reshape(b, -1).sum(1).clamp(min=1)
    sigma = (sq / n).sqrt().clamp(min=1e-6).view(b, *([1] * (out.dim() - 1)))
    eps = torch.randn(out.shape, generator=gen)
    return 0.5 * (((out - ref) / sigma - eps).pow(2) * keep).sum()


def _batch_size(batch: dict) -> int:
    t = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return int(t.shape[0])


def select_global(scores: list[torch.Tensor], fraction: float, min_keep: int = 1,
                  unit_cost: list[int] | None = None) -> list[torch.Tensor]:
    """Kept indices per group after removing the globally least important `fraction` of units
    (each group keeps at least `min_keep`). unit_cost: units per element of a group's score
    (a GQA group removes n_rep heads), counted against the fraction. Pure function."""
    cost = unit_cost or [1] * len(scores)
    total = sum(len(s) * c for s, c in zip(scores, cost))
    budget = int(fraction * total + 1e-9)
    order = sorted(((s[j].item(), g, j) for g, s in enumerate(scores) for j in range(len(s))))
    removed: list[set[int]] = [set() for _ in scores]
    spent = 0
    for _, g, j in order:
        if spent + cost[g] > budget:
            continue
        if len(scores[g]) - len(removed[g]) <= min_keep:
            continue
        removed[g].add(j)
        spent += cost[g]
    return [torch.tensor([j for j in range(len(s)) if j not in removed[g]], dtype=torch.long)
            for g, s in enumerate(scores)]


def select_uniform(scores: list[torch.Tensor], fraction: float, min_keep: int = 1) -> list[torch.Tensor]:
    """Kept indices per group after removing the `fraction` least important units of every
    group (the same share in each layer). Pure function."""
    out = []
    for s in scores:
        n_remove = min(int(fraction * len(s) + 1e-9), len(s) - min_keep)
        drop = set(s.argsort()[:max(n_remove, 0)].tolist())
        out.append(torch.tensor([j for j in range(len(s)) if j not in drop], dtype=torch.long))
    return out


def round_keep(keep: torch.Tensor, score: torch.Tensor, width: int, multiple: int) -> torch.Tensor:
    """Rounds a kept set up to a multiple of `multiple` (GEMM-friendly widths), adding back the
    most important removed units. Pure function."""
    target = min(width, -(-len(keep) // multiple) * multiple)
    if target <= len(keep):
        return keep
    removed = torch.tensor(sorted(set(range(width)) - set(keep.tolist())), dtype=torch.long)
    back = removed[score[removed].argsort(descending=True)[: target - len(keep)]]
    return torch.cat([keep, back]).sort().values
