"""What the structural passes record in the report: parameters, FLOPs, cuts per layer."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from slimformer.compiler import analysis
from slimformer.compiler.graph_utils import param_count

FLOPS_SEQ = 128  # FLOPs are reported for one sequence of this many tokens


def flops_per_sequence(gm: GraphModule, seq: int = FLOPS_SEQ) -> float:
    """Multiply-adds x 2 of the linears and the attention score/value products, one sequence."""
    total = 0
    for s in analysis.find_linears(gm):
        total += 2 * s.in_features * s.out_features * seq
    for a in analysis.find_attention(gm):
        total += 2 * 2 * seq * seq * a.num_heads * a.head_dim  # QK^T and PV
    return float(total)


# The graph as it was before the first structural cut, kept on the CompileContext: recover's
# least squares reads the original activations off it by node name (cuts keep node names).
ORIGINAL_GRAPH = "slimformer_original_graph"


def original_graph(ctx) -> GraphModule | None:
    return getattr(ctx, ORIGINAL_GRAPH, None)


# Output projection node name -> the original's input features it still reads (a LongTensor of
# indices into the original's columns): distillation matches a pruned block's inner activations
# (kept heads' context, kept FFN neurons) to the original's same features.
KEPT_INPUTS = "slimformer_kept_inputs"


def kept_inputs(ctx) -> dict[str, torch.Tensor]:
    return getattr(ctx, KEPT_INPUTS, None) or {}


def note_kept_inputs(ctx, projection: str, kept: torch.Tensor) -> None:
    """Records that `projection` now reads only its `kept` inputs; a second cut of the same
    projection composes with the first, so indices always refer to the original graph."""
    table = dict(kept_inputs(ctx))
    before = table.get(projection)
    table[projection] = kept.clone() if before is None else before[kept]
    setattr(ctx, KEPT_INPUTS, table)


def note_before(ctx, gm: GraphModule) -> None:
    """Records the unpruned graph (a copy), its FLOPs and parameters once, before the first cut."""
    if original_graph(ctx) is None:
        setattr(ctx, ORIGINAL_GRAPH, analysis.copy_graph(gm))
    r = ctx.report
    if r is not None and r.flops_before is None:
        r.flops_before = flops_per_sequence(gm)
        r.params_before_structure = param_count(gm)


def note_after(ctx, gm: GraphModule, pass_name: str, per_layer: dict[str, str],
               skipped: dict[str, str]) -> None:
    r = ctx.report
    if r is None:
        return
    analysis.invalidate(gm)
    r.flops_after = flops_per_sequence(gm)
    r.params_after_structure = param_count(gm)
    for layer, what in per_layer.items():
        r.structure.setdefault(layer, []).append(f"{pass_name}: {what}")
    for what, why in skipped.items():
        r.skipped_cuts[f"{pass_name}: {what}"] = why
