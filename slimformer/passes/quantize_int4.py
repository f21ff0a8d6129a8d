"""INT4 weight-only quantization of every linear (W4A16), in ONNX Runtime's MatMulNBits layout.

Each linear becomes `slimformer::int4_linear` (Triton on the GPU, MatMulNBits on the CPU) with
its weight packed once by `kernels/packing.pack_int4_matmulnbits`: asymmetric 4-bit codes in
blocks of `block_size` input columns, one float32 scale and one 4-bit zero point per block.
Activations stay in float, so no SmoothQuant is needed; the quantizer is one of
  - "gptq" (default): error feedback through the inverse Hessian of the layer's calibration inputs;
  - "awq": per-input-channel scales s searched on calibration activations. The layer then
    computes (x / s) @ (W s).T: the 1/s is folded into the LayerNorm / RMSNorm making x when
    nothing else reads that output, otherwise it becomes one multiply in front of the group.
    Linears reading the same x (q/k/v) share s: their weights are searched concatenated;
  - "rtn": round to nearest, the baseline.
The math lives in int4_algorithms.py; this pass only collects activations and edits the graph.

`QuantizeEmbeddingsInt4` stores embedding tables with per-row int4 codes (cpu-int4's default:
the word embedding is half of a small encoder's bytes; int4 rows cost more fidelity than int8
rows, on MiniLM ~0.004 of pooled min cosine with each row's clip range searched).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from slimformer.compiler import analysis
from slimformer.compiler.analysis import get_attr_tensor, module_path
from slimformer.compiler.graph_utils import (
    add_constant,
    capture,
    remove_unused_attrs,
    replace_node,
    set_attr_tensor,
)
from slimformer.compiler.pass_manager import CompileContext, Pass, PassResult, register_pass
from slimformer.errors import SlimformerError
from slimformer.kernels import ops  # noqa: F401  (registers torch.ops.slimformer.*)
from slimformer.kernels.packing import pack_int4_matmulnbits, quantize_rows_int4
from slimformer.passes.int4_algorithms import (
    HessianAccumulator,
    Int4Weight,
    quantize_awq,
    quantize_gptq,
    quantize_rtn,
)
from slimformer.passes.quantize_embeddings import float_embedding_tables

aten = torch.ops.aten
METHODS = ("gptq", "awq", "rtn")
BLOCK_SIZES = (32, 64, 128, 256)  # what both the Triton kernel and MatMulNBits take


@register_pass
@dataclass
class QuantizeInt4(Pass):
    """Options: method (gptq | awq | rtn), block_size, exclude (module path substrings)."""

    name = "quantize_int4"
    method: str = "gptq"
    block_size: int = 32
    symmetric: bool = False
    damp: float = 0.01  # GPTQ: Hessian damping, a fraction of its mean diagonal
    # GPTQ: columns by decreasing Hessian diagonal, block parameters fixed up front ("static
    # groups": the packed layout is unchanged). MiniLM-L6, block 32: min cos 0.972 -> 0.981.
    act_order: bool = True
    awq_tokens: int = 2048  # AWQ: calibration tokens the scale search sees, per group
    exclude: list[str] = field(default_factory=list)
    # Block 16: MatMulNBits and the W4A8 CPU lowering take it, the Triton kernel does not (its
    # tl.dot needs 16 columns per nibble half): cpu-int4 only.
    allow_block16: bool = False

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        if self.method not in METHODS:
            raise SlimformerError(f"unknown int4 method '{self.method}'", f"use one of {', '.join(METHODS)}")
        if self.block_size not in BLOCK_SIZES and not (self.block_size == 16 and self.allow_block16):
            raise SlimformerError(f"int4 block_size {self.block_size} is not supported",
                                  f"use one of {', '.join(map(str, BLOCK_SIZES))}")
        sites = [s for s in analysis.find_linears(gm) if not any(e in s.path for e in self.exclude)]
        if not sites:
            return PassResult(gm, False, "no linear layers found")
        folds: dict[str, str] = {}
        if self.method == "gptq":  # (calibrating groups one after the other on the partly
            # quantized graph, "sequential" GPTQ, gave nothing on MiniLM at 20x the time)
            weights = self._gptq(gm, ctx, sites)
        elif self.method == "awq":
            weights, folds = self._awq(gm, ctx, sites)
        else:
            weights = [quantize_rtn(s.weight(gm), self.block_size, self.symmetric) for s in sites]
        for site, w in zip(sites, weights):
            self._swap(gm, site, w)
        remove_unused_attrs(gm)
        if ctx.report is not None:
            ctx.report.float_layers.update({f"{e}*": "excluded by option" for e in self.exclude})
        details = {"method": self.method, "block_size": self.block_size}
        if folds:
            details["awq_scales"] = folds
        return PassResult(gm, True, f"{len(sites)} linears -> int4 ({self.method}, block {self.block_size})",
                          details)

    def _swap(self, gm: GraphModule, site: analysis.LinearSite, w: Int4Weight) -> None:
        qweight, scales, zp = pack_int4_matmulnbits(w.q, w.scales, None if self.symmetric else w.zero_points,
                                                    self.block_size)
        k = site.in_features
        qn = add_constant(gm, f"{site.path}.w_int4", qweight, site.node)  # (N, nb, bs / 2) uint8
        sn = add_constant(gm, f"{site.path}.w_scales", scales.float(), site.node)  # (N, nb)
        zn = add_constant(gm, f"{site.path}.w_zp", zp, site.node) if zp is not None else None
        replace_node(gm, site.node, torch.ops.slimformer.int4_linear.default,
                     (site.x, qn, sn, zn, site.bias_node, k, self.block_size))

    def _gptq(self, gm, ctx, sites) -> list[Int4Weight]:
        hessians = {x: HessianAccumulator() for x in {s.x for s in sites}}
        capture(gm, list(hessians), ctx.calibration,
                lambda n, t, i: hessians[n].add(real_tokens(t, ctx.calibration[i])))
        groups: dict[Node, list[analysis.LinearSite]] = defaultdict(list)
        for s in sites:
            groups[s.x].append(s)
        task = _task(ctx, "GPTQ int4", len(sites))
        done: dict[Node, Int4Weight] = {}
        for x, members in groups.items():
            done.update((m.node, w) for m, w in zip(members, self._gptq_group(gm, members, hessians[x].hessian())))
            for _ in members:
                _advance(ctx, task)
        return [done[s.node] for s in sites]

    def _gptq_group(self, gm, members, hessian: torch.Tensor) -> list[Int4Weight]:
        """GPTQ treats output rows independently given H: linears sharing an input (q/k/v) are
        quantized as one stacked weight, one inverse Hessian for all of them."""
        ws = [m.weight(gm).float() for m in members]  # [(N_i, K)]
        q = quantize_gptq(torch.cat(ws), hessian, self.block_size, damp=self.damp,
                          act_order=self.act_order, symmetric=self.symmetric)
        return q.split([w.shape[0] for w in ws])

    def _awq(self, gm, ctx, sites) -> tuple[list[Int4Weight], dict[str, str]]:
        groups: dict[Node, list[analysis.LinearSite]] = defaultdict(list)
        for s in sites:
            groups[s.x].append(s)
        acts = _collect_tokens(gm, ctx, list(groups), self.awq_tokens)
        task = _task(ctx, "AWQ int4", len(groups))
        by_site: dict[Node, Int4Weight] = {}
        folds = {}
        for x, members in groups.items():
            ws = [m.weight(gm).float() for m in members]  # [(N_i, K)]
            q, s = quantize_awq(torch.cat(ws), acts[x], self.block_size, symmetric=self.symmetric)
            for m, part in zip(members, q.split([w.shape[0] for w in ws])):
                by_site[m.node] = part
            folds[", ".join(m.path for m in members)] = _fold_inverse_scale(gm, x, members, s)
            _advance(ctx, task)
        return [by_site[s.node] for s in sites], folds


def real_tokens(t: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, T, ..., K) activations -> (tokens, K) float32 without the padded positions: padding
    rows are computed but never used, and would steer the quantizer towards them."""
    t = t.detach().float()
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and t.dim() == 3 and t.shape[:2] == mask.shape:
        return t[mask.bool()]  # (tokens, K)
    return t.reshape(-1, t.shape[-1])


def _collect_tokens(gm, ctx, xs: list[Node], max_tokens: int) -> dict[Node, torch.Tensor]:
    """Per input node: its first `max_tokens` calibration tokens, (T, K) float32."""
    kept: dict[Node, list[torch.Tensor]] = defaultdict(list)
    count: dict[Node, int] = defaultdict(int)

    def record(n, t, i):
        if count[n] < max_tokens:
            t = real_tokens(t, ctx.calibration[i])[: max_tokens - count[n]]
            kept[n].append(t)
            count[n] += t.shape[0]

    capture(gm, xs, ctx.calibration, record)
    return {n: torch.cat(v) for n, v in kept.items()}


def _fold_inverse_scale(gm: GraphModule, x: Node, members, s: torch.Tensor) -> str:
    """Makes the group read x / s: folded into the norm that makes x when only the group reads
    it (free), else an elementwise multiply. Returns where it went."""
    if set(x.users) <= {m.node for m in members}:
        where = _fold_into_norm(gm, x, s)
        if where:
            return f"folded into the {where} weight"
    first = min((m.node for m in members), key=_order(gm))
    inv = add_constant(gm, f"{members[0].path}.awq_inv", (1.0 / s).to(x.meta["val"].dtype), first)
    with gm.graph.inserting_before(first):
        scaled = gm.graph.call_function(aten.mul.Tensor, (x, inv))
    scaled.meta["val"] = x.meta["val"]
    for m in members:
        m.node.replace_input_with(x, scaled)
        m.x = scaled
    return "multiply"


def _fold_into_norm(gm: GraphModule, x: Node, s: torch.Tensor) -> str | None:
    """LayerNorm (weight and bias) or RMSNorm's final `weight * h`: divide its affine by s."""
    if x.op != "call_function":
        return None
    if x.target == aten.layer_norm.default and len(x.args) >= 4:
        w, b = get_attr_tensor(gm, x.args[2]), get_attr_tensor(gm, x.args[3])
        if w is None or b is None or w.shape != s.shape or _shared(gm, x.args[2], x.args[3]):
            return None
        set_attr_tensor(gm, x.args[2].target, (w / s).to(w.dtype))
        set_attr_tensor(gm, x.args[3].target, (b / s).to(b.dtype))
        return "LayerNorm"
    if x.target == aten.mul.Tensor:
        for i in (0, 1):
            w = get_attr_tensor(gm, x.args[i])
            if w is not None and w.dim() == 1 and w.shape == s.shape and not _shared(gm, x.args[i]):
                set_attr_tensor(gm, x.args[i].target, (w / s).to(w.dtype))
                return "RMSNorm-style"
    return None


def _shared(gm: GraphModule, *attrs: Node) -> bool:
    """Is any of these tensors read by another node too (tied norms)?"""
    targets = {a.target for a in attrs}
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in targets]
    return any(len(r.users) > 1 for r in readers) or len(readers) > len(targets)


def _order(gm: GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]


def _task(ctx: CompileContext, what: str, total: int):
    return ctx.progress.add_task(what, total=total) if ctx.progress is not None else None


def _advance(ctx: CompileContext, task) -> None:
    if task is not None:
        ctx.progress.advance(task)


# ---------------------------------------------------------------------------------------------
# Embeddings


def int4_embedding(ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                   zero_points: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather packed int4 rows and their parameters; (...) ids -> (..., dim) float32, as
    packing.dequantize_rows_int4. The nibbles are split with integer division in int32, not
    with uint8 bit shifts, which the ONNX exporter mistypes (uint8 >> 4 comes out int8)."""
    rows = torch.nn.functional.embedding(ids, packed).to(torch.int32)  # (..., ceil(dim / 2))
    hi = torch.div(rows, 16, rounding_mode="floor")
    lo = rows - hi * 16  # the even columns
    q = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :dim].float()  # (..., dim)
    s = torch.nn.functional.embedding(ids, scales[:, None])  # (..., 1)
    zp = torch.nn.functional.embedding(ids, zero_points[:, None]).float()
    return (q - zp) * s


def quantize_rows_int4_clipped(table: torch.Tensor, grid: int = 20, max_shrink: float = 0.5):
    """packing.quantize_rows_int4 with each row's range shrunk by the factor in {1, 1 - 1/grid,
    .., 1 - max_shrink} that minimises the row's squared error: clipping a few large values
    buys a finer step for all the others (MiniLM's word embedding: mean relative row error
    11.5% -> 10.4%). Returns packed (V, ceil(D / 2)) uint8, scales (V,) fp32, zp (V,) uint8."""
    t = table.detach().float()  # (V, D)
    lo0, hi0 = t.amin(1).clamp(max=0.0), t.amax(1).clamp(min=0.0)  # (V,)
    best_err = torch.full_like(lo0, float("inf"))
    best_q = torch.zeros(t.shape, dtype=torch.uint8)
    best_s, best_zp = torch.ones_like(lo0), torch.zeros_like(lo0)
    for i in range(int(grid * max_shrink) + 1):
        f = 1.0 - i / grid
        scale = ((hi0 - lo0) * f / 15.0).clamp(min=1e-12)  # (V,)
        zp = torch.clamp(torch.round(-lo0 * f / scale), 0, 15)
        q = torch.clamp(torch.round(t / scale[:, None]) + zp[:, None], 0, 15)  # (V, D)
        err = ((q - zp[:, None]) * scale[:, None] - t).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q[better], best_s[better], best_zp[better] = q[better].to(torch.uint8), scale[better], zp[better]
    if t.shape[1] % 2:  # pad to whole bytes with the zero point (dequantizes to 0, sliced off)
        best_q = torch.cat((best_q, best_zp.to(torch.uint8)[:, None]), dim=1)
    packed = best_q[:, 0::2] | (best_q[:, 1::2] << 4)  # low nibble = even column, as packing.py
    return packed.contiguous(), best_s, best_zp.to(torch.uint8)


@register_pass
@dataclass
class QuantizeEmbeddingsInt4(Pass):
    """Embedding tables with >= min_rows rows -> per-row asymmetric int4 (one scale and zero
    point a row). cpu-int4 uses it by default for the word embedding; see the module docstring."""

    name = "quantize_embeddings_int4"
    min_rows: int = 1024  # position tables stay as they are (QuantizeEmbeddings may take them)
    clip: bool = True  # search each row's range (quantize_rows_int4_clipped)

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        done = {}
        for node, table in float_embedding_tables(gm, self.min_rows):
            quantize = quantize_rows_int4_clipped if self.clip else quantize_rows_int4
            packed, scales, zp = quantize(table)  # (V, ceil(D/2)), (V,), (V,)
            name = node.args[0].target
            args = (node.args[1], add_constant(gm, f"{name}_int4", packed, node),
                    add_constant(gm, f"{name}_scale", scales, node),
                    add_constant(gm, f"{name}_zp", zp, node), int(table.shape[1]))
            replace_node(gm, node, int4_embedding, args)
            done[module_path(node)] = list(table.shape)
        if not done:
            return PassResult(gm, False, "no embedding tables")
        remove_unused_attrs(gm)
        return PassResult(gm, True, f"{len(done)} embedding tables -> int4 per row", {"tables": done})
