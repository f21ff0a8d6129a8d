"""Distillation of a compressed graph towards the original model, on CPU, without labels.

    losses = distill(gm, ctx, steps=200, lr=5e-5)

Trains every floating-point parameter of `gm` (an FX GraphModule) so that its outputs match the
original model's (`ctx.original`) on the calibration batches (`ctx.calibration`): mean squared
error of the last hidden state (the first output), plus, TinyBERT style, of the hidden states
after each transformer layer that both models still have (matched by module path and call
order; a dropped layer has no partner and is left out). Each term is divided by the target's
variance, so the loss is scale-free. Padding tokens do not count. Shows a progress bar on
`ctx.progress` (a rich Progress) when there is one. Returns the loss of every step.

The original's outputs are computed once, up front; the parameters trained are fresh copies
(the original model's tensors are never written). Quantized buffers (int8/int4) stay as they
are: call this on the float graph, before quantization.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from slimformer.compiler.blocks import find_blocks
from slimformer.compiler.numerics import batch_mask, flat_tensors


def distill(gm: GraphModule, ctx, steps: int, lr: float = 5e-5, *, batches: list[dict] | None = None,
            intermediate: bool = True, intermediate_weight: float = 1.0, clip: float = 1.0,
            seed: int = 0, trainable=None) -> list[float]:
    """Trains gm's float parameters for `steps` steps to match ctx.original; returns losses.

    batches: the inputs to train on (default ctx.calibration), cycled.
    intermediate: also match per-layer hidden states where layers correspond.
    trainable: a predicate on parameter names; only those it accepts train (default: all).
    """
    batches = list(batches if batches is not None else ctx.calibration)
    if steps <= 0 or not batches:
        return []
    taps = _layer_taps(gm, ctx.original) if intermediate else {}
    targets = _original_outputs(ctx.original, batches, taps)
    params = _trainable(gm, trainable)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    store: dict[str, list[torch.Tensor]] = {}
    inserted = _insert_taps(gm, taps, store)
    task = ctx.progress.add_task("distillation", total=steps) if getattr(ctx, "progress", None) else None
    gen = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for step in range(steps):
            i = int(torch.randint(len(batches), (1,), generator=gen)) if step >= len(batches) else step
            batch, (last, layers) = batches[i], targets[i]
            store.clear()
            with torch.enable_grad():
                out = flat_tensors(gm(**batch))[0]
                mask = batch_mask(batch)
                loss = _mse(out, last, mask)
                for key, t in layers.items():
                    if key in store:
                        loss = loss + intermediate_weight * _mse(store[key], t, mask) / max(len(layers), 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            losses.append(float(loss.detach()))
            if task is not None:
                ctx.progress.update(task, advance=1, description=f"distillation (loss {losses[-1]:.3g})")
    finally:
        for n in inserted:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
        gm.recompile()
        for p in params:
            p.requires_grad_(False)
    return losses


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
def _original_outputs(original: torch.nn.Module, batches: list[dict], taps: dict) -> list[tuple]:
    """Per batch: (the original's first output, {tap key: the layer's output hidden state})."""
    prefixes = sorted({k.rsplit("#", 1)[0] for k in taps})
    out, seen = [], {}

    def make_hook(prefix):
        def hook(_m, _a, o):
            t = o[0] if isinstance(o, (tuple, list)) else o
            k = seen.get(prefix, 0)
            seen[prefix] = k + 1
            current[f"{prefix}#{k}"] = t.detach()
        return hook

    hooks = [original.get_submodule(p).register_forward_hook(make_hook(p)) for p in prefixes]
    try:
        for b in batches:
            current, seen = {}, {}
            last = flat_tensors(original(**b))[0].detach()
            layers = {k: v for k, v in current.items() if k in taps and isinstance(v, torch.Tensor)}
            out.append((last, layers))
    finally:
        for h in hooks:
            h.remove()
    return out


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


def _mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over real tokens, divided by the target's variance there."""
    if out.shape != target.shape:
        return out.new_zeros(())
    out, target = out.float(), target.float()
    if mask is not None and out.dim() == 3 and mask.shape == out.shape[:2]:
        keep = mask.bool()
        out, target = out[keep], target[keep]
    return (out - target).pow(2).mean() / target.var().clamp(min=1e-12)
