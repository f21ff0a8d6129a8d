"""SmoothQuant-style migration of activation outliers into the weights (Xiao et al. 2023).

Per-tensor dynamic activation quantization wastes its range on a few outlier channels. For a
group of linears reading the same input x, Y = X W^T = (X diag(1/s)) (W diag(s))^T for any
per-channel s > 0: dividing outlier channels shrinks the activation range, and int8 weights
per output channel absorb the growth. s_j = max|X_j|^a / max|W_j|^(1-a); the strength a is
searched per group on calibration activations, minimising the quantized output error.

Where the division can be folded into the op that makes x (the value projection, for the
attention output projection of multi-head attention), it is free; otherwise it becomes one
elementwise multiply in front of the group.

Channels too extreme to migrate (BERT's FFN-down input has one channel at 14x the median
range in layer 0) are split off instead, as in LLM.int8 (Dettmers et al. 2022): the multiply
zeroes them for the int8 matmul, and a float matmul of just those k columns adds their share
back. On MiniLM this cut layer 0's FFN-down int8 output error 6x, at the cost of a k-column
gather and a (tokens, k) x (k, N) matmul.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from slimformer.compiler import analysis
from slimformer.compiler.graph_utils import add_constant, capture, set_attr_tensor
from slimformer.compiler.pass_manager import CompileContext, Pass, PassResult, register_pass
from slimformer.kernels.naive import (
    ACT_PER_TENSOR_U8,
    quantize_per_tensor_u8,
    quantize_per_token_i8,
)

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def smoothing_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """(K,) scales; channels that never fire keep s = 1."""
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(act_max > 0, s.clamp(min=1e-5), torch.ones_like(s))


def fake_quant_weight(w: torch.Tensor, qmax: int) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def fake_quant_act(x: torch.Tensor, act_mode: int) -> torch.Tensor:
    if act_mode == ACT_PER_TENSOR_U8:
        q, s, zp = quantize_per_tensor_u8(x)
        return (q - zp) * s
    q, s = quantize_per_token_i8(x)
    return q * s


def quant_error(xs: list[torch.Tensor], ys: list[torch.Tensor], w: torch.Tensor,
                s: torch.Tensor | None, act_mode: int, qmax: int) -> float:
    """Sum over calibration batches of ||Y - Q(X/s) Q(W s)^T||^2. xs: [(T, K)], ys: [X W^T], w: (N, K)."""
    wq = fake_quant_weight(w if s is None else w * s, qmax)
    err = 0.0
    for x, y in zip(xs, ys):
        xq = fake_quant_act(x if s is None else x / s, act_mode)
        err += (y - xq @ wq.t()).pow(2).sum().item()
    return err


@register_pass
@dataclass
class Smooth(Pass):
    """Options: alpha (None = searched per group), act_mode (the activation quantizer to fit)."""

    name = "smooth"
    alpha: float | None = None
    migrate: bool = True  # False: no migration into the weights, only the outlier split (int4)
    act_mode: int = ACT_PER_TENSOR_U8
    qmax: int = 127
    max_tokens: int = 2048  # the search sees this many calibration tokens (the range: all)
    exclude: list[str] = field(default_factory=list)
    # Outlier split: channels whose calibration range exceeds `outlier_ratio` x the median
    # channel's (at most `max_outliers`) go to a float side path, when that cuts the group's
    # quantized output error by `outlier_margin`x. (At 1.5x, MiniLM's FFN-up groups split
    # too, for little gain: the side add cost ORT its Bias+Gelu fusion, ~2.6 ms a layer.)
    split_outliers: bool = True
    outlier_ratio: float = 6.0
    max_outliers: int = 8
    outlier_margin: float = 1.75

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        linears = [s for s in analysis.find_linears(gm) if not any(e in s.path for e in self.exclude)]
        weight_uses = defaultdict(int)
        for s in analysis.find_linears(gm):
            weight_uses[s.weight_node.target] += 1
        groups: dict[Node, list[analysis.LinearSite]] = defaultdict(list)
        skipped = {}
        for s in linears:
            if weight_uses[s.weight_node.target] > 1:  # ALBERT-style sharing: one s can't suit all
                skipped[s.path] = "weight shared with other layers"
            else:
                groups[s.x].append(s)
        acts, act_max_all = self._collect(gm, ctx, list(groups))
        folds = self._value_folds(gm)
        chosen = {}
        split = {}
        for x, sites in groups.items():
            xs = acts[x]
            act_max = act_max_all[x]  # (K,) over the whole calibration set
            w_cat = torch.cat([s.weight(gm).float() for s in sites], dim=0)  # (sum N, K)
            ys = [x @ w_cat.t() for x in xs]
            best_alpha, best_err = self._search(xs, ys, w_cat, act_max)
            idx = self._outlier_channels(act_max) if value_free(folds, sites) else None
            if idx is not None:
                keep = torch.ones_like(act_max)
                keep[idx] = 0.0
                ys_rest = [y - x[:, idx] @ w_cat[:, idx].t() for x, y in zip(xs, ys)]
                alpha_s, err_s = self._search([x * keep for x in xs], ys_rest, w_cat * keep, act_max * keep)
                if err_s * self.outlier_margin < best_err:
                    s = torch.ones_like(act_max) if alpha_s is None else \
                        smoothing_scales(act_max * keep, (w_cat * keep).abs().amax(dim=0), alpha_s)
                    self._apply_split(gm, x, sites, s, idx)
                    label = ", ".join(site.path for site in sites)
                    chosen[label] = alpha_s
                    split[label] = {"channels": idx.tolist(), "error_ratio": round(best_err / max(err_s, 1e-30), 2)}
                    continue
            if best_alpha is None:
                continue
            s = smoothing_scales(act_max, w_cat.abs().amax(dim=0), best_alpha)
            self._apply(gm, x, sites, s, folds.get(sites[0].node))
            chosen[", ".join(site.path for site in sites)] = best_alpha
        gm.recompile()
        n = sum(1 for a in chosen.values() if a is not None)  # (a split alone migrates nothing)
        summary = f"{n}/{len(groups)} input groups smoothed"
        if split:
            summary += f", outlier channels split off in {len(split)}"
        return PassResult(gm, bool(chosen), summary, {"alpha": chosen, "skipped": skipped, "outliers": split})

    def _search(self, xs, ys, w_cat, act_max) -> tuple[float | None, float]:
        """The strength with the least quantized output error (None: no smoothing), and that error."""
        w_max = w_cat.abs().amax(dim=0)
        best_alpha, best_err = None, quant_error(xs, ys, w_cat, None, self.act_mode, self.qmax)
        for a in (() if not self.migrate else ALPHAS if self.alpha is None else (self.alpha,)):
            err = quant_error(xs, ys, w_cat, smoothing_scales(act_max, w_max, a), self.act_mode, self.qmax)
            if err < best_err or self.alpha is not None:
                best_alpha, best_err = a, err
        return best_alpha, best_err

    def _outlier_channels(self, act_max: torch.Tensor) -> torch.Tensor | None:
        if not self.split_outliers or act_max.numel() < 64:
            return None
        order = torch.argsort(act_max, descending=True)[: self.max_outliers]
        idx = order[act_max[order] > self.outlier_ratio * act_max.median()]
        return torch.sort(idx).values if idx.numel() else None

    def _apply_split(self, gm, x: Node, sites, s: torch.Tensor, idx: torch.Tensor) -> None:
        """x -> x * (1/s, 0 at idx) for the group; each site's output += x[..., idx] @ W[:, idx]^T."""
        first = min((site.node for site in sites), key=lambda n: _order(gm, n))
        dtype = x.meta["val"].dtype
        idx_node = add_constant(gm, f"{sites[0].path}.outlier_idx", idx.long(), first)
        with gm.graph.inserting_before(first):
            x_out = gm.graph.call_function(torch.ops.aten.index_select.default, (x, -1, idx_node))
        x_out.meta["val"] = torch.ops.aten.index_select.default(x.meta["val"], -1, idx.long())
        for site in sites:
            w = site.weight(gm).float()  # (N, K), before smoothing
            w_side = add_constant(gm, f"{site.path}.outlier_w", w[:, idx].t().contiguous().to(dtype), first)
            with gm.graph.inserting_after(site.node):
                side = gm.graph.call_function(torch.ops.aten.matmul.default, (x_out, w_side))
            side.meta["val"] = site.node.meta["val"]
            side.meta[analysis.KEEP_FLOAT] = "outlier channels of " + site.path
            with gm.graph.inserting_after(side):
                total = gm.graph.call_function(torch.ops.aten.add.Tensor, (site.node, side))
            total.meta["val"] = site.node.meta["val"]
            site.node.replace_all_uses_with(total, delete_user_cb=lambda u, t=total: u is not t)
        keep = torch.ones_like(s)
        keep[idx] = 0.0
        self._apply(gm, x, sites, s, None, inv=keep / s, zero_columns=keep)

    def _collect(self, gm, ctx, xs: list[Node]):
        """Per group input: per-channel max |x| over all calibration tokens, and the first
        `max_tokens` tokens themselves (flattened to (tokens, K)) for the strength search."""
        acts: dict[Node, list[torch.Tensor]] = defaultdict(list)
        act_max: dict[Node, torch.Tensor] = {}
        kept: dict[Node, int] = defaultdict(int)

        def record(n, t, i):
            t = t.detach().reshape(-1, t.shape[-1]).float()  # (tokens, K)
            m = t.abs().amax(dim=0)
            act_max[n] = m if n not in act_max else torch.maximum(act_max[n], m)
            if kept[n] < self.max_tokens:
                acts[n].append(t[: self.max_tokens - kept[n]])
                kept[n] += acts[n][-1].shape[0]

        capture(gm, xs, ctx.calibration, record)
        return acts, act_max

    def _value_folds(self, gm) -> dict[Node, analysis.LinearSite]:
        """o-proj node -> v-proj site, where 1/s can be folded into the value projection."""
        folds = {}
        for a in analysis.find_attention(gm):
            if a.o is not None and a.v is not None and a.num_kv_heads == a.num_heads \
                    and a.v.kind == "linear" and a.o.x.meta["val"].shape[-1] == a.v.out_features:
                folds[a.o.node] = a.v
        return folds

    def _apply(self, gm, x: Node, sites, s: torch.Tensor, value_site, inv=None, zero_columns=None) -> None:
        if zero_columns is not None:  # split-off channels: no int8 weight range spent on them
            s = s * zero_columns
        for site in sites:  # W' = W diag(s): scale the input channels
            w = analysis.get_attr_tensor(gm, site.weight_node)
            scaled = w * s if site.kind == "linear" else w * s[:, None]
            set_attr_tensor(gm, site.weight_node.target, scaled.to(w.dtype))
        if value_site is not None:  # fold 1/s into the value projection's output rows
            vw = value_site.weight(gm)
            set_attr_tensor(gm, value_site.weight_node.target, (vw / s[:, None]).to(vw.dtype))
            vb = value_site.bias(gm)
            if vb is not None:
                set_attr_tensor(gm, value_site.bias_node.target, (vb / s).to(vb.dtype))
            return
        first = min((site.node for site in sites), key=lambda n: _order(gm, n))
        inv = (1.0 / s) if inv is None else inv
        inv = add_constant(gm, f"{sites[0].path}.smooth_inv", inv.to(x.meta["val"].dtype), first)
        with gm.graph.inserting_before(first):
            scaled_x = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, inv))
        scaled_x.meta["val"] = x.meta["val"]
        for site in sites:
            site.node.replace_input_with(x, scaled_x)


def value_free(folds: dict, sites) -> bool:
    """A group whose 1/s folds into the value projection has no x to split channels off."""
    return sites[0].node not in folds


def _order(gm: GraphModule, node: Node) -> int:
    for i, n in enumerate(gm.graph.nodes):
        if n is node:
            return i
    return -1
