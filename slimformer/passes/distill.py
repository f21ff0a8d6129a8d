"""Distillation of a compressed graph towards the original model, on CPU, without labels.

    result = distill(gm, ctx, steps=600, lr=1e-4)

Trains every floating-point parameter of `gm` (an FX GraphModule) so that its outputs match the
original model's (`ctx.original`): mean squared error of the last hidden state (the first
output), plus, TinyBERT style, of the hidden states after each transformer layer that both
models still have (matched by module path and call order; a dropped layer has no partner and is
left out). After pruning, with sublayer_weight > 0, also of the inputs of the output
projections that lost inputs, against the same features of the unpruned graph (kept heads'
attention context, kept FFN neurons). Each term is divided by the target's variance, so the
loss is scale-free. Padding tokens do not count.

Data: the training batches (`ctx.training`, else the calibration batches), visited in a shuffled
order; the original's outputs are computed as each batch comes and kept up to a memory budget,
so a corpus of any size costs bounded memory. Held-out check: every `check_every` steps the graph is scored on `ctx.validation`
against the original, and the best parameters seen (the starting ones included) are the ones
kept. Distillation on a few hundred sentences fits them and not held-out text (MiniLM, heads
0.25 + FFN 0.4, the 258 built-in sentences: 150 steps took their pooled mean cosine to 0.99
while held-out text stayed at 0.93; 300 steps at lr 3e-4 took held-out from 0.928 to 0.922);
the check makes such a run a no-op instead of a silent loss.

Tried on MiniLM heads 0.25 + FFN 0.4 (2,000 steps, peak lr 2e-4; held-out error 0.153 as then shipped), no gain:
inputs altered on the fly and sent to the original too (15% of tokens swapped for corpus
tokens: 0.173; rows trading second halves, plus 10% swapped: 0.179); the token embedding
table held fixed (0.151 and 27% faster, but the bench's min pooled cosine fell from 0.874 to
0.850 and recall@1 from 0.990 to 0.987). With the 14,869-line corpus and inner activations
(0.1457, seed 1): a per-token cosine term besides the MSE, 0.1454 (a tie). Without inner
activations (0.1497): an exponential moving average of the weights (0.998) in place of the
last step, 0.1555. At peak lr 2e-4 (0.1451, seed 0): a term on the mean-pooled last hidden state,
the sentence embedding the bench scores (1 - cosine, weight 5 / 20), 0.161 / 0.172, and the
bench's pooled cosine did not move either (0.875 / 0.967 and 0.877 / 0.965, fp32).
With the measured FFN widths and peak lr 3e-4 (0.1304, pooled 0.898 / 0.972): the kept heads'
attention probabilities matched to the original's same heads (KL, MiniLM / TinyBERT's
attention transfer, weight 3), 0.1308 and pooled 0.888 / 0.970. After 2,000 steps the graph
fits the calibration sentences it trained on no better than the held-out fifth (token-level
cosine min / mean 0.908 / 0.964 against 0.913 / 0.956): it is under-trained, not short of text.
6,000 steps (same schedule, stretched): held-out error 0.1145, pooled 0.915 / 0.977, best step
5,900; the trained-on sentences now pull ahead (0.949 / 0.976 against 0.922 / 0.964).
12,000 steps: held-out error 0.1062, pooled 0.935 / 0.978 (fp32, torch), best step 11,400;
trained-on 0.957 / 0.979 against held-out 0.928 / 0.966. Doubling the steps again moved the
min pooled cosine (+0.020) far more than the mean (+0.0015).

Shows a progress bar on `ctx.progress` (a rich Progress) when there is one. The parameters
trained are fresh copies (the original model's tensors are never written). Quantized buffers
(int8/int4) stay as they are: call this on the float graph, before quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from slimformer.compiler import analysis
from slimformer.compiler.blocks import find_blocks
from slimformer.compiler.numerics import batch_mask, compare, flat_tensors, run_batches
from slimformer.passes.prune_report import kept_inputs, original_graph


@dataclass
class DistillResult:
    losses: list[float] = field(default_factory=list)  # every step's training loss
    kept_step: int = 0  # the step whose parameters were kept (0: the starting ones)
    held_out: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out error)

    def summary(self) -> str:
        if not self.losses:
            return "no distillation"
        text = f"distilled {len(self.losses)} steps (loss {self.losses[0]:.3g} -> {self.losses[-1]:.3g})"
        if self.held_out:
            scores = dict(self.held_out)
            text += (f", held-out error {scores[0]:.4f} -> {scores[self.kept_step]:.4f}"
                     f" (kept step {self.kept_step})")
        return text


def distill(gm: GraphModule, ctx, steps: int, lr: float = 1e-4, *, batches: list[dict] | None = None,
            intermediate: bool = True, intermediate_weight: float = 1.0, clip: float = 1.0,
            seed: int = 0, trainable=None, check_every: int = 100, decay: bool = False,
            sublayer_weight: float = 0.0) -> DistillResult:
    """Trains gm's float parameters for `steps` steps to match ctx.original.

    batches: the inputs to train on (default ctx.training, else ctx.calibration).
    intermediate: also match per-layer hidden states where layers correspond.
    trainable: a predicate on parameter names; only those it accepts train (default: all).
    check_every: steps between held-out checks (0: no checks, the last parameters stay).
    decay: warm up over the first 5% of the steps, then cosine-decay lr to a tenth (lr is then
        the peak): MiniLM heads 0.25 + FFN 0.4, 2,000 steps, held-out pooled cosine min / mean
        0.885 / 0.966 with decay from 2e-4 against 0.864 / 0.963 at a constant 1e-4.
    sublayer_weight: after pruning, also match each pruned block's inner activations (the
        kept heads' attention context, the kept FFN neurons) to the original's same features,
        read off the unpruned graph (passes/prune_report.py); 0 leaves them out.
    """
    batches = list(batches if batches is not None else (getattr(ctx, "training", None) or ctx.calibration))
    if steps <= 0 or not batches:
        return DistillResult()
    taps = _layer_taps(gm, ctx.original) if intermediate else {}
    params = _trainable(gm, trainable)
    check = _HeldOutCheck.of(ctx, params) if check_every > 0 else None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps)) if decay else None
    store: dict[str, list[torch.Tensor]] = {}
    task = ctx.progress.add_task("distillation", total=steps) if getattr(ctx, "progress", None) else None
    order = _Order(len(batches), seed)
    result = DistillResult()
    inner, inserted = None, []
    try:
        inner = _Inner.of(gm, ctx, taps) if sublayer_weight > 0 else None
        inserted = _insert_taps(gm, {**taps, **(inner.student_nodes if inner else {})}, store)
        teacher = _Teacher(ctx.original, batches, taps, inner=inner)
        if check is not None:
            check.score(gm, 0, result)
        for step in range(1, steps + 1):
            i = order.next()
            batch, (last, layers, inner_targets) = batches[i], teacher.outputs(i)
            store.clear()
            with torch.enable_grad():
                out = flat_tensors(gm(**batch))[0]
                mask = batch_mask(batch)
                loss = _mse(out, last, mask)
                for key, t in layers.items():
                    if key in store:
                        loss = loss + intermediate_weight * _mse(store[key], t, mask) / max(len(layers), 1)
                for key, t in inner_targets.items():
                    if key in store:
                        loss = loss + sublayer_weight * _mse(store[key], t, mask) / len(inner_targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            if sched is not None:
                sched.step()
            result.losses.append(float(loss.detach()))
            if check is not None and (step % check_every == 0 or step == steps):
                check.score(gm, step, result)
            if task is not None:
                ctx.progress.update(task, advance=1, description=f"distillation (loss {result.losses[-1]:.3g})")
    finally:
        _remove_taps(gm, inserted)
        if inner is not None:
            inner.remove()
        if check is not None:
            check.restore_best(result)
        for p in params:
            p.requires_grad_(False)
    return result


def lr_factor(step: int, steps: int, warmup: float = 0.05, floor: float = 0.1) -> float:
    """The lr multiplier at `step` (0-based) of `steps`: linear warm-up, then a cosine from 1
    down to `floor`. Pure function."""
    warm = max(1, int(steps * warmup))
    if step < warm:
        return (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, steps - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


class _Order:
    """Batch indices: shuffled epochs, so every batch is seen once before any is seen twice."""

    def __init__(self, n: int, seed: int):
        self.n, self.gen, self.queue = n, torch.Generator().manual_seed(seed), []

    def next(self) -> int:
        if not self.queue:
            self.queue = torch.randperm(self.n, generator=self.gen).tolist()
        return self.queue.pop()


class _Teacher:
    """The original's outputs per batch, kept while they fit in `budget` bytes: a calibration
    set revisited for many steps (tune_quantized: 150 steps over ~13 batches) runs the original
    once per batch, and a corpus of any size still costs at most the budget."""

    def __init__(self, original: torch.nn.Module, batches: list[dict], taps: dict, budget: int = 512 << 20,
                 inner: _Inner | None = None):
        self.original, self.batches, self.taps, self.budget = original, batches, taps, budget
        self.inner = inner
        self.kept: dict[int, tuple] = {}
        self.bytes = 0

    def outputs(self, i: int) -> tuple:
        """(last hidden state, {layer tap: hidden state}, {inner tap: kept features})."""
        if i in self.kept:
            return self.kept[i]
        if self.inner is not None:
            last, layers, inner = self.inner.outputs(self.batches[i])
        else:
            (last, layers), inner = _original_outputs(self.original, self.batches[i], self.taps), {}
        out = (last, layers, inner)
        size = sum(t.numel() * t.element_size() for t in [last, *layers.values(), *inner.values()])
        if self.bytes + size <= self.budget:
            self.kept[i] = out
            self.bytes += size
        return out


class _Inner:
    """The original's side when pruned blocks' inner activations are matched too: the unpruned
    graph (passes/prune_report.py) run with taps at its layer outputs and at the input of every
    output projection that lost inputs (`kept_inputs`, matched by node name), of which only the
    kept features are targets. It serves all of the original's outputs, so the original model
    does not run as well. MiniLM heads 0.25 + FFN 0.4, 2,000 steps, seed 1: held-out error
    0.1531 -> 0.1483 with the 9,259-line corpus, 0.1497 -> 0.1457 with the 14,869-line one (the
    bench's pooled cosine moved within its noise: min +0.009 / -0.011, mean +0.001 / -0.000).
    Steps took ~25% longer when the original model ran as well as the graph."""

    def __init__(self, original: GraphModule, nodes: dict[str, tuple], layers: dict[str, Node]):
        self.original, self.layer_keys = original, set(layers)
        self.student_nodes = {k: mine for k, (mine, _, _) in nodes.items()}
        self.columns = {k: cols for k, (_, _, cols) in nodes.items()}
        self.store: dict[str, torch.Tensor] = {}
        theirs = {k: node for k, (_, node, _) in nodes.items()}
        self.probes = _insert_taps(original, {**layers, **theirs}, self.store)

    @classmethod
    def of(cls, gm: GraphModule, ctx, layer_taps: dict) -> _Inner | None:
        original, kept = original_graph(ctx), kept_inputs(ctx)
        if original is None or not kept:
            return None
        analysis.invalidate(gm)
        mine = {s.node.name: s.x for s in analysis.find_linears(gm)}
        theirs = {s.node.name: s.x for s in analysis.find_linears(original)}
        nodes = {name: (mine[name], theirs[name], cols) for name, cols in kept.items()
                 if name in mine and name in theirs}
        layers = {k: n for k, n in _layer_taps(original, ctx.original).items() if k in layer_taps}
        return cls(original, nodes, layers) if nodes else None

    @torch.no_grad()
    def outputs(self, batch: dict) -> tuple:
        """As _original_outputs, plus {inner tap: the original's kept features}."""
        self.store.clear()
        last = flat_tensors(self.original(**batch))[0].detach()
        layers = {k: self.store[k].detach() for k in self.layer_keys if k in self.store}
        inner = {k: self.store[k][..., cols].contiguous() for k, cols in self.columns.items() if k in self.store}
        return last, layers, inner

    def remove(self) -> None:
        _remove_taps(self.original, self.probes)


@dataclass
class _HeldOutCheck:
    """Scores the graph on held-out batches against the original; remembers the best params."""

    batches: list[dict]
    reference: list
    params: list[torch.nn.Parameter]
    best: tuple[float, int, list[torch.Tensor]] | None = None

    @classmethod
    def of(cls, ctx, params) -> _HeldOutCheck | None:
        batches, ref = getattr(ctx, "validation", None), getattr(ctx, "validation_reference", None)
        return cls(batches, ref, params) if batches and ref else None

    @torch.no_grad()
    def score(self, gm: GraphModule, step: int, result: DistillResult) -> None:
        error = compare(self.reference, run_batches(gm, self.batches), self.batches).error()
        result.held_out.append((step, error))
        if self.best is None or error < self.best[0]:
            self.best = (error, step, [p.detach().clone() for p in self.params])

    @torch.no_grad()
    def restore_best(self, result: DistillResult) -> None:
        if self.best is None:
            return
        _, result.kept_step, saved = self.best
        for p, s in zip(self.params, saved):
            p.copy_(s)


def _trainable(gm: GraphModule, accept=None) -> list[torch.nn.Parameter]:
    """Fresh copies of gm's float parameters (they may share storage with the original model)."""
    params = []
    for name, p in list(gm.named_parameters()):
        if not p.is_floating_point() or (accept is not None and not accept(name)):
            continue
        *path, leaf = name.split(".")
        owner = gm
        for part in path:
            owner = getattr(owner, part)
        fresh = torch.nn.Parameter(p.detach().clone(), requires_grad=True)
        setattr(owner, leaf, fresh)
        params.append(fresh)
    return params


def _layer_taps(gm: GraphModule, original: torch.nn.Module) -> dict[str, object]:
    """'prefix#k' (k-th call of that layer) -> graph block output node, for layers that exist in
    the original model with as many calls in both."""
    blocks = find_blocks(gm)
    by_prefix: dict[str, list] = {}
    for b in blocks:
        by_prefix.setdefault(b.prefix, []).append(b.output)
    taps = {}
    for prefix, outs in by_prefix.items():
        try:
            original.get_submodule(prefix)
        except AttributeError:
            continue
        for k, node in enumerate(outs):
            taps[f"{prefix}#{k}"] = node
    return taps


@torch.no_grad()
def _original_outputs(original: torch.nn.Module, batch: dict, taps: dict) -> tuple:
    """(the original's first output, {tap key: the layer's output hidden state}) on one batch."""
    prefixes = sorted({k.rsplit("#", 1)[0] for k in taps})
    current, seen = {}, {}

    def make_hook(prefix):
        def hook(_m, _a, o):
            t = o[0] if isinstance(o, (tuple, list)) else o
            k = seen.get(prefix, 0)
            seen[prefix] = k + 1
            current[f"{prefix}#{k}"] = t.detach()
        return hook

    hooks = [original.get_submodule(p).register_forward_hook(make_hook(p)) for p in prefixes]
    try:
        last = flat_tensors(original(**batch))[0].detach()
    finally:
        for h in hooks:
            h.remove()
    return last, {k: v for k, v in current.items() if k in taps and isinstance(v, torch.Tensor)}


def _insert_taps(gm: GraphModule, taps: dict, store: dict) -> list:
    inserted = []
    for key, node in taps.items():
        def tap(x, key=key):
            store[key] = x
            return x
        with gm.graph.inserting_after(node):
            t = gm.graph.call_function(tap, (node,))
        t.meta = dict(node.meta)
        for u in [u for u in node.users if u is not t]:
            u.replace_input_with(node, t)
        inserted.append(t)
    gm.recompile()
    return inserted


def _remove_taps(gm: GraphModule, inserted: list) -> None:
    """Undoes _insert_taps: the tapped nodes' users read them directly again."""
    for n in inserted:
        n.replace_all_uses_with(n.args[0])
        gm.graph.erase_node(n)
    gm.recompile()
    analysis.invalidate(gm)


def _mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over real tokens, divided by the target's variance there."""
    if out.shape != target.shape:
        return out.new_zeros(())
    out, target = out.float(), target.float()
    if mask is not None and out.dim() == 3 and mask.shape == out.shape[:2]:
        keep = mask.bool()
        out, target = out[keep], target[keep]
    elif mask is not None and out.dim() == 2 and mask.numel() == out.shape[0]:  # (B * T, F) rows
        keep = mask.reshape(-1).bool()
        out, target = out[keep], target[keep]
    return (out - target).pow(2).mean() / target.var().clamp(min=1e-12)
