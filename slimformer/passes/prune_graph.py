"""Graph edits shared by the pruning passes: slice a weight, find the nodes between a block's
projections, rewrite the literal sizes (head counts, widths) that the export baked into
view/reshape/expand/split, and re-derive every node's fake-tensor shape afterwards.

torch.export writes sizes that depend on the model's width as literals: `view(x, [B, T, 12, 32])`,
`expand(k, [B, 2, 2, T, 16])` (GQA's repeat_kv), `split(qkv, 768, 2)` (GPT-2), `mul(12, B)`
(DeBERTa's batch*heads). Batch and sequence stay symbolic, so a literal that equals an old
width, in a shape argument, inside the block, is that width.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from slimformer.compiler.analysis import get_attr_tensor, module_path
from slimformer.compiler.graph_utils import set_attr_tensor

aten = torch.ops.aten

# op -> index of its size argument (a list of ints/SymInts, or one int for split)
_SIZE_ARG = {
    aten.view.default: 1, aten.reshape.default: 1, aten._unsafe_view.default: 1,
    aten.expand.default: 1, aten.unflatten.int: 2, aten.split.Tensor: 1,
    aten.split_with_sizes.default: 1, aten.new_zeros.default: 1, aten.new_empty.default: 1,
    aten.new_ones.default: 1, aten.new_full.default: 1, aten.zeros.default: 0,
    aten.ones.default: 0, aten.full.default: 0, aten.empty.memory_format: 0,
    aten.repeat.default: 1,
}
_SYM_ARITH = {operator.mul, operator.floordiv, torch.sym_int}


def slice_weight(gm: GraphModule, node: Node, dim: int, keep: torch.Tensor) -> None:
    """Keeps the `keep` indices of the tensor a get_attr node reads, along `dim`."""
    t = get_attr_tensor(gm, node)
    set_attr_tensor(gm, node.target, t.index_select(dim, keep.to(t.device)))


def weight_dims(kind: str) -> tuple[int, int]:
    """(output dim, input dim) of a LinearSite's stored weight: linear holds (out, in),
    addmm/matmul hold (in, out)."""
    return (0, 1) if kind == "linear" else (1, 0)


def _closure(nodes: list[Node], step) -> set[Node]:
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(step(n))
    return seen


def ancestors(nodes: list[Node]) -> set[Node]:
    return _closure(nodes, lambda n: n.all_input_nodes)


def descendants(nodes: list[Node]) -> set[Node]:
    return _closure(nodes, lambda n: n.users)


def block_region(seeds: list[Node], sink_input: Node, prefix: str) -> set[Node]:
    """The nodes that carry the block's cut dimension: on a path from a seed (the projections
    whose outputs are cut) to `sink_input` (the input of the projection whose columns are cut),
    plus nodes of the block's own module (`prefix`) that feed the sink without reading the
    block's input (DeBERTa's batch*heads index tensors). Seeds themselves are excluded."""
    up = ancestors([sink_input])
    before_seeds = ancestors([a for s in seeds for a in s.all_input_nodes])
    down = descendants(seeds)
    region = set()
    for n in up:
        if n.op != "call_function" or n in seeds:
            continue
        if n in down or (n not in before_seeds and module_path(n).startswith(prefix)):
            region.add(n)
    # Size arithmetic (batch * heads) the region reads may have been made once for all
    # layers: it joins the region, and isolate() gives the region its own copy.
    for n in list(region):
        region.update(a for a in n.all_input_nodes if a.op == "call_function" and a.target in _SYM_ARITH)
    return region


def rewrite_sizes(gm: GraphModule, region: set[Node], mapping: dict[int, int],
                  head_dim: int | None = None) -> int:
    """Replaces, in the size arguments of the region's shape ops, the first literal that is a
    key of `mapping` (heads are the outer factor, so the first match is the head count: in
    GQA's expand [B, Hkv, n_rep, T, D] that is Hkv). Returns how many literals changed.
    A literal equal to head_dim in the last place of a >= 4-D shape is the head dim, kept."""
    changed = 0
    for n in sorted(region, key=_order(gm)):
        if n.target in _SIZE_ARG:
            i = _SIZE_ARG[n.target]
            if len(n.args) <= i:
                continue
            sizes = n.args[i]
            if isinstance(sizes, int):  # split's chunk size
                if sizes in mapping:
                    n.args = (*n.args[:i], mapping[sizes], *n.args[i + 1:])
                    changed += 1
                continue
            if not isinstance(sizes, (list, tuple)):
                continue
            new = list(sizes)
            if n.target == aten.split_with_sizes.default:  # every chunk is a cut width
                new = [mapping.get(s, s) for s in sizes]
                changed += sum(a != b for a, b in zip(new, sizes))
            else:
                for j, s in enumerate(new):
                    last_head_dim = j == len(new) - 1 and len(new) >= 4 and s == head_dim
                    if isinstance(s, int) and not isinstance(s, bool) and s in mapping and not last_head_dim:
                        new[j] = mapping[s]
                        changed += 1
                        break
            n.args = (*n.args[:i], type(sizes)(new), *n.args[i + 1:])
        elif n.target in _SYM_ARITH:
            args = list(n.args)
            for j, a in enumerate(args):
                if isinstance(a, int) and not isinstance(a, bool) and a in mapping:
                    args[j] = mapping[a]
                    changed += 1
                    break
            n.args = tuple(args)
    return changed


def isolate(gm: GraphModule, region: set[Node]) -> set[Node]:
    """Copies the region's size-arithmetic nodes that are also read outside the region, so
    that a rewrite of this block's sizes leaves other blocks' untouched. Returns the region
    with the copies in place of the shared nodes."""
    region = set(region)
    for n in sorted(region, key=_order(gm)):
        if n.target not in _SYM_ARITH:
            continue
        outside = [u for u in n.users if u not in region]
        if not outside:
            continue
        with gm.graph.inserting_after(n):
            copy = gm.graph.call_function(n.target, n.args, dict(n.kwargs))
        copy.meta = dict(n.meta)
        for u in [u for u in n.users if u in region]:
            u.replace_input_with(n, copy)
        region.discard(n)
        region.add(copy)
    return region


def _order(gm: GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index.get(n, -1)


def select_along(gm: GraphModule, tensor: Node, dim: int, keep: torch.Tensor, before: Node,
                 name: str) -> Node:
    """Inserts index_select(tensor, dim, keep) before `before` and returns it: for tensors that
    enter a block with a head dim but are computed elsewhere (T5's shared position bias)."""
    from slimformer.compiler.graph_utils import add_constant

    idx = add_constant(gm, name, keep.to(torch.long), before)
    with gm.graph.inserting_before(before):
        sel = gm.graph.call_function(aten.index_select.default, (tensor, dim, idx))
    sel.meta = {k: v for k, v in tensor.meta.items() if k != "val"}
    sel.meta["nn_module_stack"] = before.meta.get("nn_module_stack", {})
    return sel


def refresh_meta(gm: GraphModule) -> None:
    """Re-derives every node's meta['val'] (fake tensors, symbolic batch/seq) from the graph's
    current weights: the analyses read widths off it, so it must follow the cuts."""
    from torch._guards import detect_fake_mode

    placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in placeholders if isinstance(v, torch.Tensor)])
    if mode is None:
        return
    env: dict[Node, object] = {}
    with mode:
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = n.meta.get("val")
            elif n.op == "get_attr":
                t = get_attr_tensor(gm, n)
                env[n] = mode.from_tensor(t, static_shapes=True) if t is not None else None
                old = n.meta.get("val")
                if t is not None and isinstance(old, torch.Tensor) and old.shape != t.shape:
                    n.meta["val"] = t  # as add_constant records a new weight
            elif n.op == "call_function":
                args = map_arg(n.args, lambda a: env[a])
                kwargs = map_arg(n.kwargs, lambda a: env[a])
                try:
                    env[n] = n.target(*args, **kwargs)
                except Exception as e:
                    raise RuntimeError(f"node {n.name} ({module_path(n)}) no longer type-checks "
                                       f"after the cut: {type(e).__name__}: {e}") from e
                n.meta["val"] = env[n]
            else:
                env[n] = None
