"""prune_heads: removes a global fraction of attention heads, physically.

Importance: Fisher information of a per-head gate on the output projection's input, label-free
(see prune_importance). The least important heads over all layers go, at least one per layer;
with grouped-query attention the unit is a whole KV group (one k/v head and its n_rep query
heads). A cut slices the q/k/v rows (per segment for a fused qkv projection such as GPT-2's
c_attn) and the output projection's columns, rewrites the head counts the export wrote into
view/reshape/expand, and selects the kept heads of a per-head score bias computed outside the
block (T5's and MPNet's relative position bias, shared by every layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from slimformer.compiler import analysis
from slimformer.compiler.analysis import AttentionSite, LinearSite
from slimformer.compiler.blocks import common_prefix
from slimformer.compiler.coupling import cut_groups, linear_unit
from slimformer.compiler.pass_manager import CompileContext, Pass, PassResult, register_pass
from slimformer.errors import SlimformerError
from slimformer.passes import prune_graph as pg
from slimformer.passes.prune_importance import (
    gate_fisher,
    gate_point,
    select_global,
    select_uniform,
)
from slimformer.passes.prune_report import note_after, note_before, note_kept_inputs

aten = torch.ops.aten


@dataclass
class HeadPlan:
    """One attention call and the projections a head cut touches."""

    site: AttentionSite
    per_head: list[LinearSite]  # outputs laid out (H, D): q, and DeBERTa's pos-query/key
    per_kv_head: list[LinearSite]  # outputs laid out (Hkv, D): k, v
    fused: LinearSite | None  # GPT-2's c_attn: (q | k | v) segments
    o: LinearSite
    prefix: str

    @property
    def heads(self) -> int:
        return self.site.num_heads

    @property
    def kv_heads(self) -> int:
        return self.site.num_kv_heads or self.site.num_heads

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads

    @property
    def seeds(self) -> list[Node]:
        linears = [self.fused] if self.fused else self.per_head + self.per_kv_head
        return [s.node for s in linears]


def plan_heads(gm: GraphModule, site: AttentionSite) -> tuple[HeadPlan | None, str]:
    """The cut plan of one attention call, or None and why it cannot be cut."""
    h, d = site.num_heads, site.head_dim
    hkv = site.num_kv_heads or h
    fused = site.extra.get("fused_qkv")
    if site.o is None:
        return None, "output projection not found"
    if site.o.in_features != h * d:
        return None, f"output projection reads {site.o.in_features} features, not heads x head_dim = {h * d}"
    if h % hkv:
        return None, f"{h} heads do not split into {hkv} key/value groups"
    if fused is not None:
        if hkv != h or fused.out_features != 3 * h * d:
            return None, "fused qkv projection with an unexpected layout"
        return HeadPlan(site, [], [], fused, site.o, common_prefix([fused.path, site.o.path])), ""
    if site.q is None or site.k is None or site.v is None:
        return None, "q/k/v projections not found"
    if site.q.out_features != h * d or site.k.out_features != hkv * d or site.v.out_features != hkv * d:
        return None, "q/k/v widths do not match the head layout"
    prefix = common_prefix([site.q.path, site.k.path, site.v.path, site.o.path])
    extras = _extra_per_head_linears(gm, site, prefix, h * d)
    return HeadPlan(site, [site.q, *extras], [site.k, site.v], None, site.o, prefix), ""


def _extra_per_head_linears(gm: GraphModule, site: AttentionSite, prefix: str, width: int) -> list[LinearSite]:
    """Other projections of the block split into the same heads (DeBERTa's pos_query/pos_key):
    linears of the block's module, `width` wide, feeding the attention output, and not
    upstream of the block's input (an earlier call of a shared layer)."""
    known = {s.node for s in (site.q, site.k, site.v, site.o) if s is not None}
    feeding = pg.ancestors([site.node])
    earlier = pg.ancestors([site.q.x])
    return [s for s in analysis.find_linears(gm)
            if s.node not in known and s.node in feeding and s.node not in earlier
            and s.path.startswith(prefix + ".") and s.out_features == width]


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the kept heads in an (H * D)-wide projection (head-major). Pure."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def kept_query_heads(plan: HeadPlan, keep_kv: torch.Tensor) -> torch.Tensor:
    """The query heads that the kept KV groups serve (all n_rep of each group). Pure."""
    return (keep_kv[:, None] * plan.n_rep + torch.arange(plan.n_rep)[None, :]).reshape(-1)


def apply_head_cut(gm: GraphModule, plan: HeadPlan, keep_kv: torch.Tensor, done: set[str]) -> int:
    """Cuts one attention call down to the kept KV groups (= heads without GQA). Weights are
    sliced once per attribute (`done`), a call of a shared layer only rewrites its sizes."""
    d = plan.site.head_dim
    keep_heads = kept_query_heads(plan, keep_kv)
    q_rows, kv_rows = head_rows(keep_heads, d), head_rows(keep_kv, d)
    h, hkv, h2, hkv2 = plan.heads, plan.kv_heads, len(keep_heads), len(keep_kv)

    def cut(node: Node | None, dim: int, idx: torch.Tensor) -> None:
        if node is not None and node.target not in done:
            pg.slice_weight(gm, node, dim, idx)
            done.add(node.target)

    if plan.fused is not None:
        hd = h * d
        rows = torch.cat([q_rows, hd + kv_rows, 2 * hd + kv_rows])
        cut(plan.fused.weight_node, pg.weight_dims(plan.fused.kind)[0], rows)
        cut(plan.fused.bias_node, 0, rows)
    for s, rows in [(s, q_rows) for s in plan.per_head] + [(s, kv_rows) for s in plan.per_kv_head]:
        cut(s.weight_node, pg.weight_dims(s.kind)[0], rows)
        cut(s.bias_node, 0, rows)
    cut(plan.o.weight_node, pg.weight_dims(plan.o.kind)[1], q_rows)

    sink = plan.o.node.args[1] if plan.o.kind == "addmm" else plan.o.node.args[0]
    region = pg.isolate(gm, pg.block_region(plan.seeds, sink, plan.prefix))
    mapping = {h: h2, h * d: h2 * d}
    if hkv != h:
        mapping.update({hkv: hkv2, hkv * d: hkv2 * d})
    if plan.fused is not None:
        mapping[3 * h * d] = 3 * h2 * d
    changed = pg.rewrite_sizes(gm, region, mapping, head_dim=d)
    _select_score_bias(gm, plan, keep_heads, region)
    return changed


def _select_score_bias(gm: GraphModule, plan: HeadPlan, keep_heads: torch.Tensor, region: set[Node]) -> None:
    """A (B, H, T, S) tensor added to the scores but made outside the block's projections
    (a relative position bias shared by all layers) keeps only this block's heads."""
    site, h = plan.site, plan.heads
    from_seeds = pg.descendants(plan.seeds)
    if site.form == "sdpa":
        mask = site.node.args[3] if len(site.node.args) > 3 else site.node.kwargs.get("attn_mask")
        entries = [(site.node, mask)]
    else:
        entries, n = [], site.extra["qk"]
        for _ in range(16):  # the chain from QK^T to the softmax
            users = [u for u in n.users if u.op == "call_function"]
            if not users or n is site.extra["softmax"]:
                break
            n = users[0]
            entries += [(n, a) for a in n.args if isinstance(a, Node)]
    for consumer, t in entries:
        val = t.meta.get("val") if isinstance(t, Node) else None
        if not isinstance(val, torch.Tensor) or val.dim() != 4 or t in from_seeds:
            continue
        if isinstance(val.shape[1], int) and val.shape[1] == h and h > 1:
            sel = pg.select_along(gm, t, 1, keep_heads, consumer, f"{plan.prefix}.kept_heads")
            consumer.replace_input_with(t, sel)


@register_pass
@dataclass
class PruneHeads(Pass):
    """Options: fraction of heads to remove (global), batches used for importance."""

    name = "prune_heads"
    rebases_reference = True
    fraction: float = 0.25
    allocation: str = "global"  # "global": least important over all layers; "uniform": per layer
    max_batches: int | None = 8  # calibration batches for the importance estimate

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        sites = analysis.find_attention(gm)
        if not sites:
            raise SlimformerError("--prune-heads: no attention block was found in this model",
                                  "head pruning needs q/k/v projections around scaled_dot_product_attention "
                                  "or matmul -> softmax -> matmul; drop --prune-heads")
        note_before(ctx, gm)
        skipped: dict[str, str] = {}
        plans = []
        for site in sites:
            plan, why = plan_heads(gm, site)
            if plan is None:
                skipped[site.path] = why
            else:
                plans.append(plan)
        units = [linear_unit(p.site.path, [p.fused] if p.fused else p.per_head + p.per_kv_head, [p.o])
                 for p in plans]
        groups = []
        for g in cut_groups(gm, units):
            if not g.safe:
                for i in g.units:
                    skipped[plans[i].site.path] = g.reason
            elif len({(plans[i].heads, plans[i].kv_heads, plans[i].site.head_dim) for i in g.units}) > 1:
                for i in g.units:
                    skipped[plans[i].site.path] = "shared weights used with different head layouts"
            else:
                groups.append(g.units)
        if not groups or self.fraction <= 0:
            note_after(ctx, gm, self.name, {}, skipped)
            return PassResult(gm, False, "no head could be cut", {"skipped": skipped})
        scores = self._group_scores(gm, ctx, plans, groups)
        if self.allocation == "uniform":
            keep = select_uniform(scores, self.fraction, min_keep=1)
        else:
            keep = select_global(scores, self.fraction, min_keep=1,
                                 unit_cost=[plans[g[0]].n_rep for g in groups])
        done: set[str] = set()
        per_layer, removed, removed_heads = {}, 0, {}
        for members, kept in zip(groups, keep):
            p0 = plans[members[0]]
            if len(kept) == p0.kv_heads:
                continue
            for i in members:
                apply_head_cut(gm, plans[i], kept, done)
                note_kept_inputs(ctx, plans[i].o.node.name,
                                 head_rows(kept_query_heads(plans[i], kept), plans[i].site.head_dim))
            removed += (p0.kv_heads - len(kept)) * p0.n_rep * len(members)
            unit = "KV groups" if p0.n_rep > 1 else "heads"
            gone = sorted(set(range(p0.kv_heads)) - set(kept.tolist()))
            removed_heads[p0.site.path] = [g * p0.n_rep + r for g in gone for r in range(p0.n_rep)]
            calls = f" (shared by {len(members)} calls)" if len(members) > 1 else ""
            per_layer[p0.site.path] = f"kept {len(kept)}/{p0.kv_heads} {unit}{calls}, removed {gone}"
        if not per_layer:
            note_after(ctx, gm, self.name, {}, skipped)
            return PassResult(gm, False, "fraction too small to remove a head", {"skipped": skipped})
        pg.refresh_meta(gm)
        gm.recompile()
        note_after(ctx, gm, self.name, per_layer, skipped)
        total = sum(plans[g[0]].heads * len(g) for g in groups)
        return PassResult(gm, True, f"removed {removed}/{total} heads",
                          {"per_layer": per_layer, "skipped": skipped, "removed_heads": removed_heads})

    def _group_scores(self, gm, ctx, plans, groups) -> list[torch.Tensor]:
        """Per group, (KV groups,) importance: head Fisher summed over the group's calls and
        over the query heads of each KV group."""
        live = [i for g in groups for i in g]
        points = [(gate_point(plans[i].o.node.args[1] if plans[i].o.kind == "addmm" else plans[i].o.x),
                   plans[i].heads) for i in live]
        batches = ctx.calibration[: self.max_batches]
        targets = (ctx.original_reference or ctx.reference)[: self.max_batches]
        fisher = dict(zip(live, gate_fisher(gm, batches, targets, points, ctx.progress, "head importance")))
        out = []
        for g in groups:
            p = plans[g[0]]
            per_head = sum(fisher[i] for i in g)
            out.append(per_head.view(p.kv_heads, p.n_rep).sum(1))
        return out

