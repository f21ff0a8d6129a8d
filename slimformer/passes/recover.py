"""recover: repairs a pruned graph without labels.

(a) Always: a least-squares refit of every pruned block's output projection (attention o-proj,
    FFN down-proj) so that, on the training tokens (ctx.training when given, else the
    calibration tokens; fit_batches), the residual stream right after it matches
    the original graph's there (Kwon et al. 2022's layer-wise reconstruction, ridge-regularised;
    the target is the original sum minus the pruned graph's residual input, so each refit also
    absorbs what the layers before it lost). Projections are refit in execution order, each on
    inputs that already see the earlier refits. Undone if it lowers fidelity on the held-out
    batches (ctx.validation; the first calibration batches when there are none).
(b) With steps > 0: distillation of all float parameters towards the original's hidden states
    and, inside each pruned block, towards the original's kept heads' context and kept FFN
    neurons (passes/distill.py), on ctx.training when given, keeping the parameters that scored
    best on the held-out batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from slimformer.compiler import analysis
from slimformer.compiler.analysis import LinearSite, get_attr_tensor
from slimformer.compiler.blocks import find_ffns
from slimformer.compiler.graph_utils import capture, set_attr_tensor
from slimformer.compiler.numerics import batch_mask, compare, run_batches
from slimformer.compiler.pass_manager import CompileContext, Pass, PassResult, register_pass
from slimformer.passes.prune_report import note_after, original_graph

aten = torch.ops.aten


def ridge_lstsq(xtx: torch.Tensor, xty: torch.Tensor, ridge: float,
                prior: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_B ||X B - Y||^2 + lam ||B - prior||^2 from the normal equations (prior: 0 when
    None); lam = ridge * mean of diag(X^T X). xtx: (K, K), xty, prior: (K, N) -> (K, N).
    Shrinking towards the pruned weights rather than towards zero keeps what the calibration
    tokens do not pin down (a few thousand tokens against ~1000 inputs). Pure function."""
    k = xtx.shape[0]
    lam = ridge * xtx.diagonal().mean().clamp(min=1e-12)
    a = xtx + lam * torch.eye(k, dtype=xtx.dtype)
    b = xty if prior is None else xty + lam * prior.to(xty.dtype)
    return torch.linalg.solve(a, b)


def output_projections(gm: GraphModule) -> list[LinearSite]:
    """Attention output and FFN down projections, in execution order."""
    sites = [a.o for a in analysis.find_attention(gm) if a.o is not None]
    sites += [f.down for f in find_ffns(gm)]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    seen, out = set(), []
    for s in sorted(sites, key=lambda s: order[s.node]):
        if s.node not in seen:
            seen.add(s.node)
            out.append(s)
    return out


def pruned_projections(gm: GraphModule, original: GraphModule) -> dict[str, list[LinearSite]]:
    """Weight attribute -> its calls (execution order) among the output projections that read
    fewer features than the same node of the original graph."""
    before = {s.node.name: s for s in analysis.find_linears(original)}
    groups: dict[str, list[LinearSite]] = {}
    for s in output_projections(gm):
        o = before.get(s.node.name)
        if o is not None and o.in_features != s.in_features:
            groups.setdefault(s.weight_node.target, []).append(s)
    return groups


_IDENTITY = {aten.dropout.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
             aten.clone.default, aten.alias.default}


def residual_add(site: LinearSite) -> tuple[Node, Node] | None:
    """(the add that puts the projection's output on the residual stream, the residual operand),
    through dropout/reshapes; None when the output goes elsewhere first."""
    n = site.node
    for _ in range(4):
        users = list(n.users)
        if len(users) != 1:
            return None
        u = users[0]
        if u.target in (aten.add.Tensor, aten.add_.Tensor) and len(u.args) >= 2:
            other = u.args[1] if u.args[0] is n else u.args[0]
            ok = isinstance(other, Node) and other.meta.get("val") is not None \
                and tuple(other.meta["val"].shape) == tuple(u.meta["val"].shape)
            return (u, other) if ok else None
        if u.target not in _IDENTITY:
            return None
        n = u
    return None


def capture_values(gm: GraphModule, nodes: list[Node], batches: list[dict], stop_early: bool = True) -> dict:
    """{(node name, batch index): value} of `nodes` over `batches`; with stop_early each
    forward ends right after the last of them."""
    values = {}

    def record(n, t, i):
        values[(n.name, i)] = t.detach().float()

    capture(gm, nodes, batches, record, stop_early=stop_early)
    return values


def refit_targets(original: GraphModule, calls: list[LinearSite], batches: list[dict]) -> dict:
    """What each of one projection's calls should output, from the original graph: where the
    output joins the residual stream, the original sum there (the current residual is
    subtracted later, so the refit also absorbs the error upstream layers left on the stream);
    else the original projection's own output. Returns {(node name, batch): tensor}."""
    by_name = {n.name: n for n in original.graph.nodes}
    watch = []
    for s in calls:
        res = residual_add(s)
        name = res[0].name if res else s.node.name
        if name in by_name:
            watch.append(by_name[name])
    return capture_values(original, list(dict.fromkeys(watch)), batches)


@torch.no_grad()
def refit_projection(gm: GraphModule, calls: list[LinearSite], original: GraphModule, batches: list[dict],
                     ridge: float) -> int:
    """Refits one (possibly shared) projection so that, over the batches' real tokens, each
    call's output matches the original's (refit_targets). The normal equations are summed batch
    by batch as the graph runs: memory holds one projection's targets, not every activation.
    Returns the tokens used."""
    site = calls[0]
    sinks = [s.node.args[1] if s.kind == "addmm" else s.node.args[0] for s in calls]
    plans = []  # (sink, residual node or None, target node name)
    for s, sink in zip(calls, sinks):
        res = residual_add(s)
        plans.append((sink, res[1] if res else None, res[0].name if res else s.node.name))
    targets = refit_targets(original, calls, batches)
    watch = list(dict.fromkeys([p[0] for p in plans] + [p[1] for p in plans if p[1] is not None]))
    k_in = site.in_features + (1 if site.bias_node is not None else 0)
    acc = {"xtx": torch.zeros(k_in, k_in, dtype=torch.float64), "xty": None, "tokens": 0}
    pending: dict[str, torch.Tensor] = {}  # the watched values of the batch now running

    def add(bi: int, values: dict) -> None:
        for sink, resid, target in plans:
            y = targets.pop((target, bi), None)
            if y is None:
                continue
            if resid is not None:
                y = y - values[resid.name]
            x = values[sink.name].reshape(-1, site.in_features)  # (tokens, K)
            y = y.reshape(x.shape[0], -1)  # (tokens, N)
            keep = _token_mask(batches[bi], x.shape[0])
            if keep is not None:
                x, y = x[keep], y[keep]
            if site.bias_node is not None:
                x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
            # One batch's products in float32 (a few hundred tokens), their sum over tens of
            # thousands of tokens in float64, where the normal equations need the precision.
            acc["xtx"] += (x.T @ x).double()
            xty = (x.T @ y).double()
            acc["xty"] = xty if acc["xty"] is None else acc["xty"] + xty
            acc["tokens"] += x.shape[0]

    def record(n: Node, t: torch.Tensor, bi: int) -> None:
        # Graph order: every watched node of a batch runs before stop_early ends its forward.
        pending[n.name] = t.detach().float()
        if all(w.name in pending for w in watch):
            add(bi, pending)
            pending.clear()

    capture(gm, watch, batches, record, stop_early=True)
    if acc["xty"] is None:
        return 0
    w0 = get_attr_tensor(gm, site.weight_node)
    prior = w0.T if site.kind == "linear" else w0  # (K, N)
    if site.bias_node is not None:
        prior = torch.cat([prior, get_attr_tensor(gm, site.bias_node)[None, :]])
    sol = ridge_lstsq(acc["xtx"], acc["xty"], ridge, prior.double()).float()  # (K [+1], N)
    w, b = (sol[:-1], sol[-1]) if site.bias_node is not None else (sol, None)
    set_attr_tensor(gm, site.weight_node.target, w.T.contiguous() if site.kind == "linear" else w)
    if b is not None:
        set_attr_tensor(gm, site.bias_node.target, b)
    return acc["tokens"]


def fit_batches(ctx: CompileContext, max_tokens: int) -> list[dict]:
    """What recovery fits on: the training inputs when given (a corpus generalises where a few
    hundred calibration sentences are fitted: MiniLM heads 0.25 + FFN 0.4, least squares on the
    258 built-in calibration sentences gave held-out pooled cosine min 0.756 / mean 0.928, on
    those plus 131k tokens of the built-in corpus 0.842 / 0.942), else the calibration inputs; evenly
    spaced batches of them up to `max_tokens` real tokens, which bounds time and memory."""
    batches = getattr(ctx, "training", None) or ctx.calibration
    total = sum(_real_tokens(b) for b in batches)
    if total <= max_tokens:
        return list(batches)
    keep = max(1, int(len(batches) * max_tokens / total))
    return [batches[int(i * len(batches) / keep)] for i in range(keep)]


def _real_tokens(batch: dict) -> int:
    m = batch_mask(batch)
    if m is not None:
        return int(m.sum())
    t = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return int(t.numel()) if t is not None else 0


def _token_mask(batch: dict, rows: int) -> torch.Tensor | None:
    m = batch_mask(batch)
    if m is None or m.numel() != rows:
        return None
    return m.reshape(-1).bool()


@register_pass
@dataclass
class Recover(Pass):
    """Options: steps (distillation steps, 0 = least squares only), lr, ridge."""

    name = "recover"
    rebases_reference = True
    steps: int = 0
    # Distillation's peak lr (warm-up, then cosine decay; distill's `decay`). MiniLM heads 0.25 +
    # FFN 0.4, 2,000 steps, held-out error: 0.145 at 2e-4, 0.141 at 3e-4, 0.138 at 5e-4, 0.157
    # at 8e-4, 0.174 at 1.2e-3; 3e-4 keeps a margin below where it turns. With the measured FFN
    # widths (ffn_allocation): 0.1304 at 3e-4, 0.1308 at 5e-4.
    lr: float = 3e-4
    ridge: float = 0.2  # MiniLM heads 0.25 + FFN 0.4: held-out pooled cos mean 0.9254 at 0.05
    check_batches: int = 4  # without held-out batches: the calibration batches that decide it
    # Least squares fits on at most this many real tokens; its time grows with them (MiniLM
    # heads 0.25 + FFN 0.4: 156 s for 131k tokens here, with a conversion alongside).
    fit_tokens: int = 1 << 16
    # Distillation also matches the pruned blocks' inner activations (kept heads' context, kept
    # FFN neurons) to the original's, with this weight (distill's sublayer_weight; 0: off).
    sublayer_weight: float = 1.0

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        original = original_graph(ctx)
        groups = pruned_projections(gm, original) if original is not None else {}
        summary, details = [], {}
        if groups:
            base = _fidelity_to_original(gm, ctx, self.check_batches)
            saved = {a: (get_attr_tensor(gm, c[0].weight_node).clone(),
                         None if c[0].bias_node is None else get_attr_tensor(gm, c[0].bias_node).clone())
                     for a, c in groups.items()}
            task = ctx.progress.add_task("least squares", total=len(groups)) if ctx.progress else None
            batches = fit_batches(ctx, self.fit_tokens)
            tokens = 0
            for calls in groups.values():  # execution order: later refits see earlier ones
                tokens = max(tokens, refit_projection(gm, calls, original, batches, self.ridge))
                if task is not None:
                    ctx.progress.advance(task)
            after = _fidelity_to_original(gm, ctx, self.check_batches)
            if after.cos_mean < base.cos_mean:  # the refit overfit the calibration set: undo it
                for attr, (w, b) in saved.items():
                    set_attr_tensor(gm, attr, w)
                    if b is not None:
                        set_attr_tensor(gm, groups[attr][0].bias_node.target, b)
                summary.append(f"least squares did not help ({after.cos_mean:.4f} < {base.cos_mean:.4f}), undone")
            else:
                summary.append(f"least squares refit {len(groups)} projections on {tokens} tokens "
                               f"(cos mean {base.cos_mean:.4f} -> {after.cos_mean:.4f})")
            details["refit"] = sorted(groups)
            details["refit_tokens"] = tokens
        if self.steps > 0:
            from slimformer.passes.distill import distill

            result = distill(gm, ctx, self.steps, lr=self.lr, decay=True, sublayer_weight=self.sublayer_weight)
            summary.append(result.summary())
            details["distill_loss"] = [result.losses[0], result.losses[-1]]
            details["distill_kept_step"] = result.kept_step
            details["distill_held_out_error"] = [[s, round(e, 5)] for s, e in result.held_out]
        if not summary:
            return PassResult(gm, False, "nothing was pruned")
        note_after(ctx, gm, self.name, {}, {})
        return PassResult(gm, True, "; ".join(summary), details)


def _fidelity_to_original(gm: GraphModule, ctx: CompileContext, batches: int | None = None):
    """On the held-out batches when there are some (all of them), else the first calibration
    batches: the refit is fitted on the calibration set, so that is a weak check."""
    if ctx.validation and ctx.validation_reference:
        return compare(ctx.validation_reference, run_batches(gm, ctx.validation), ctx.validation)
    ref = (ctx.original_reference or ctx.reference)[:batches]
    return compare(ref, run_batches(gm, ctx.calibration[:batches]), ctx.calibration[:batches])
