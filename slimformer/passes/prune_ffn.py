"""prune_ffn: removes a global fraction of FFN neurons, physically.

Selection, `method`:
- "obs" (default): layer by layer, the neurons whose removal the down projection's remaining
  columns can best make up for on calibration activations, with that update applied (see
  prune_obs). How many each FFN loses, `allocation`: "measured" (default), each FFN's share
  chosen by the measured cost of its cut on the model's output (see ffn_allocation);
  "uniform", the same share of every FFN.
- "fisher": Fisher information of a per-neuron gate on the down projection's input (see
  prune_importance), per layer ("uniform") or over all layers ("global").
A cut removes rows of the up projection(s) (SwiGLU's gate and up) and
columns of the down projection, and rewrites the width the export wrote into views (GPT-2's
Conv1D reshapes). Each FFN keeps at least `min_keep` neurons, rounded to a multiple of
`multiple_of` (GEMM-friendly widths on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from slimformer.compiler.blocks import FfnSite, find_ffns
from slimformer.compiler.coupling import cut_groups, linear_unit
from slimformer.compiler.graph_utils import set_attr_tensor
from slimformer.compiler.pass_manager import CompileContext, Pass, PassResult, register_pass
from slimformer.passes import prune_graph as pg
from slimformer.passes.ffn_allocation import candidate_widths, kept_width, measured_widths
from slimformer.passes.prune_importance import (
    gate_fisher,
    gate_point,
    round_keep,
    select_global,
    select_uniform,
)
from slimformer.passes.prune_obs import input_hessian, input_hessians, obs_select
from slimformer.passes.prune_report import note_after, note_before, note_kept_inputs


def apply_ffn_cut(gm: GraphModule, site: FfnSite, keep: torch.Tensor, done: set[str]) -> int:
    """Cuts one FFN call to the `keep` neurons; shared weights are sliced once (`done`)."""

    def cut(node, dim: int) -> None:
        if node is not None and node.target not in done:
            pg.slice_weight(gm, node, dim, keep)
            done.add(node.target)

    for up in site.ups:
        cut(up.weight_node, pg.weight_dims(up.kind)[0])
        cut(up.bias_node, 0)
    cut(site.down.weight_node, pg.weight_dims(site.down.kind)[1])
    sink = site.down.node.args[1] if site.down.kind == "addmm" else site.down.node.args[0]
    region = pg.isolate(gm, pg.block_region([u.node for u in site.ups], sink, site.path))
    return pg.rewrite_sizes(gm, region, {site.width: len(keep)})


@register_pass
@dataclass
class PruneFfn(Pass):
    """Options: fraction of FFN neurons to remove (global); rounding of kept widths."""

    name = "prune_ffn"
    rebases_reference = True
    fraction: float = 0.4
    multiple_of: int = 8
    min_keep: int = 8
    # obs: "measured" (each FFN's share from the measured cost of its cut) or "uniform" (the
    # same share of every FFN). fisher: "uniform" or "global" (the least important over all
    # layers; on MiniLM-L6, after head pruning, it emptied the last FFN, 1536 -> 136, and
    # held-out fidelity fell: pooled cos 0.87 vs 0.88). None: the method's first.
    allocation: str | None = None
    method: str = "obs"  # "obs" (with weight updates) or "fisher"
    damp: float = 0.1  # obs: ridge on the activations' second moment, times its mean diagonal
    max_batches: int | None = 8  # calibration batches for the Fisher estimate (obs uses all)

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        allowed = {"obs": ("measured", "uniform"), "fisher": ("uniform", "global")}
        if self.method not in allowed:
            raise ValueError(f"prune_ffn: unknown method {self.method!r}; choose one of {tuple(allowed)}")
        allocation = self.allocation or allowed[self.method][0]
        if allocation not in allowed[self.method]:
            raise ValueError(f"prune_ffn: allocation {allocation!r} does not go with method "
                             f"{self.method!r}; choose one of {allowed[self.method]}")
        sites = find_ffns(gm)
        note_before(ctx, gm)
        skipped: dict[str, str] = {}
        if not sites:
            note_after(ctx, gm, self.name, {}, {"ffn": "no feed-forward block was found"})
            return PassResult(gm, False, "no FFN found", {"skipped": skipped})
        units = [linear_unit(s.down.path, s.ups, [s.down]) for s in sites]
        groups = []
        for g in cut_groups(gm, units):
            if g.safe and len({sites[i].width for i in g.units}) == 1:
                groups.append(g.units)
            else:
                for i in g.units:
                    skipped[sites[i].path] = g.reason or "shared weights used with different widths"
        if not groups or self.fraction <= 0:
            note_after(ctx, gm, self.name, {}, skipped)
            return PassResult(gm, False, "no FFN could be cut", {"skipped": skipped})
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        groups.sort(key=lambda g: min(order[sites[i].down.node] for i in g))
        obs = self.method == "obs"
        measured = obs and allocation == "measured" and len(groups) > 1
        if obs:
            widths = self._obs_widths(gm, ctx, [[sites[i] for i in g] for g in groups], measured)
        else:
            scores = self._group_scores(gm, ctx, sites, groups)
            min_keep = min(self.min_keep, min(len(s) for s in scores))
            keep = select_uniform(scores, self.fraction, min_keep) if allocation == "uniform" \
                else select_global(scores, self.fraction, min_keep=min_keep)
        done: set[str] = set()
        per_layer, removed, total, removed_neurons = {}, 0, 0, {}
        task = ctx.progress.add_task("FFN selection (OBS)", total=len(groups)) if obs and ctx.progress else None
        for gi, members in enumerate(groups):
            width = sites[members[0]].width
            total += width
            if obs:
                kept = self._obs_group(gm, ctx, [sites[i] for i in members], widths[gi])
                task is not None and ctx.progress.advance(task)
            else:
                kept = round_keep(keep[gi], scores[gi], width, self.multiple_of)
            if len(kept) == width:
                continue
            for i in members:
                apply_ffn_cut(gm, sites[i], kept, done)
                note_kept_inputs(ctx, sites[i].down.node.name, kept)
            gm.recompile()
            removed += width - len(kept)
            calls = f" (shared by {len(members)} calls)" if len(members) > 1 else ""
            path = sites[members[0]].path
            per_layer[path] = f"FFN {width} -> {len(kept)} neurons{calls}"
            removed_neurons[path] = sorted(set(range(width)) - set(kept.tolist()))
        if task is not None:
            ctx.progress.remove_task(task)
        if not per_layer:
            note_after(ctx, gm, self.name, {}, skipped)
            return PassResult(gm, False, "fraction too small to remove a neuron", {"skipped": skipped})
        pg.refresh_meta(gm)
        gm.recompile()
        note_after(ctx, gm, self.name, per_layer, skipped)
        how = ", widths by measured cost" if measured else ""
        return PassResult(gm, True, f"removed {removed}/{total} FFN neurons{how}",
                          {"per_layer": per_layer, "skipped": skipped, "removed_neurons": removed_neurons})

    def _obs_widths(self, gm, ctx, groups: list[list[FfnSite]], measured: bool) -> list[int]:
        """Kept width per group: the global fraction's in each, or (measured) an allocation
        from the measured cost of each cut, removing at least as many neurons in all."""
        uniform = [kept_width(g[0].width, self.fraction, self.min_keep, self.multiple_of) for g in groups]
        if not measured:
            return uniform
        hessians = input_hessians(gm, [self._gate_points(calls) for calls in groups], ctx.calibration,
                                  [calls[0].width for calls in groups])
        candidates = [candidate_widths(calls[0].width, self.fraction, self.min_keep, self.multiple_of)
                      if tokens else [n_uniform]  # never run on calibration: no measure
                      for calls, n_uniform, (_, tokens) in zip(groups, uniform, hessians)]
        widths, _ = measured_widths(gm, [g[0].down for g in groups], [h for h, _ in hessians], candidates,
                                    uniform, ctx.calibration, ctx.original_reference or ctx.reference,
                                    sum(uniform), self.damp, ctx.progress)
        return widths

    @staticmethod
    def _gate_points(calls: list[FfnSite]) -> list:
        """Where each call's down projection reads its input (the per-neuron gate point)."""
        return [gate_point(s.down.node.args[1] if s.down.kind == "addmm" else s.down.x) for s in calls]

    def _obs_group(self, gm, ctx, calls: list[FfnSite], n_keep: int) -> torch.Tensor:
        """The n_keep neurons one FFN (all its calls) keeps, chosen by OBS; the down
        projection's weight gets the OBS update of its remaining columns."""
        site, width = calls[0], calls[0].width
        if n_keep >= width:
            return torch.arange(width)
        h, tokens = input_hessian(gm, self._gate_points(calls), ctx.calibration, width)
        if tokens == 0:
            return torch.arange(width)
        kept, w_new = obs_select(h, site.down.weight(gm), n_keep, damp=self.damp)  # weight (N, K)
        set_attr_tensor(gm, site.down.weight_node.target,
                        w_new.contiguous() if site.down.kind == "linear" else w_new.T.contiguous())
        return kept

    def _group_scores(self, gm, ctx, sites, groups) -> list[torch.Tensor]:
        live = [i for g in groups for i in g]
        points = [(self._gate_points([sites[i]])[0], sites[i].width) for i in live]
        batches = ctx.calibration[: self.max_batches]
        targets = (ctx.original_reference or ctx.reference)[: self.max_batches]
        fisher = dict(zip(live, gate_fisher(gm, batches, targets, points, ctx.progress, "FFN importance")))
        return [sum(fisher[i] for i in g) for g in groups]
