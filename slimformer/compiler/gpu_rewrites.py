"""Rewrites of the runtime copy of a compiled graph on a CUDA device (TorchCompiledModel).

They touch only the per-device copy that runs, never the saved program, and keep the
arithmetic: the int8 results are bit-identical, fp16 / int4 differ at most by summation order.

1. `fold_smoothing`: SmoothQuant leaves `x * c` (a per-channel constant) in front of an input
   group that it could not fold into a producer (BERT: the q/k/v input, the FFN-up and
   FFN-down inputs: 3 per layer). When only int8 linears read the product, their quantization
   prologue multiplies instead: one elementwise launch and a write + read of x less.
2. `fuse_siblings`: linears that read the same x (q, k, v) become one linear on concatenated
   weights and a split: one launch instead of three (fp16), one quantization of x and one
   GEMM instead of three each (int8), wider GEMMs that fill the GPU better. Applies to the
   fp16 baseline (aten.linear) as well, so cuda-fp16 and cuda-int8 stay comparable.
3. slimformer's linears are called as plain Python functions (ops.int8_linear_impl,
   int4_linear_impl), not through torch's custom-op dispatcher: ~20-40 us less host time a
   call when the forward is not replayed from a CUDA graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from slimformer.compiler.graph_utils import add_constant, attr_tensor, remove_unused_attrs
from slimformer.kernels import ops

INT8_OP = torch.ops.slimformer.int8_linear.default
INT4_OP = torch.ops.slimformer.int4_linear.default
LINEAR = torch.ops.aten.linear.default
MUL = torch.ops.aten.mul.Tensor


def rewrite_for_gpu(gm: GraphModule) -> dict:
    """All three rewrites, in place; returns what changed (for reports and tests)."""
    stats = {"smoothing_folded": fold_smoothing(gm)}
    stats["siblings_fused"] = fuse_siblings(gm)
    stats["direct_calls"] = direct_calls(gm)
    remove_unused_attrs(gm)  # the unfused weights: not kept twice on the GPU
    gm.graph.lint()
    return stats


def _const(gm: GraphModule, a) -> torch.Tensor | None:
    return attr_tensor(gm, a.target) if isinstance(a, Node) and a.op == "get_attr" else None


def _is_int8(n: Node) -> bool:
    return n.op == "call_function" and n.target in (INT8_OP, ops.int8_linear_impl)


def fold_smoothing(gm: GraphModule) -> int:
    """mul(x, c) with c a (K,) constant, read only by int8 linears -> their `smooth` argument."""
    folded = 0
    for m in list(gm.graph.nodes):
        if m.op != "call_function" or m.target != MUL or len(m.args) != 2 or not m.users:
            continue
        x, c = m.args
        if _const(gm, x) is not None:
            x, c = c, x
        c_t = _const(gm, c)
        if c_t is None or c_t.dim() != 1 or not isinstance(x, Node) or _const(gm, x) is not None:
            continue
        users = list(m.users)
        if not all(_is_int8(u) and u.target is INT8_OP and u.args[0] is m and m not in u.args[1:]
                   and not u.kwargs and attr_tensor_shape(gm, u.args[1])[1] == c_t.numel()
                   for u in users):
            continue
        for u in users:
            with gm.graph.inserting_before(u):
                new = gm.graph.call_function(ops.int8_linear_impl, (x, *u.args[1:5]), {"smooth": c})
            new.meta = dict(u.meta)
            u.replace_all_uses_with(new)
            gm.graph.erase_node(u)
        gm.graph.erase_node(m)
        folded += 1
    return folded


def attr_tensor_shape(gm: GraphModule, a) -> tuple:
    t = _const(gm, a)
    return tuple(t.shape) if t is not None else (None, None)


@dataclass
class _Kind:
    """How one family of linear nodes concatenates: which args are per-output-row weights
    (concatenated along dim 0, reshaped to (N, -1) first), which must be equal."""

    weights: tuple[int, ...]  # arg positions of (N, ...) constants (None allowed: all or none)
    n_of: int  # arg position whose dim 0 is N
    fn: object  # what the fused node calls


def _kind(gm: GraphModule, n: Node) -> tuple[_Kind, tuple] | None:
    """(kind, grouping key) for a fusable linear node, else None."""
    if n.op != "call_function":
        return None
    args = tuple(n.args)
    if n.target in (INT8_OP, ops.int8_linear_impl) and len(args) == 5:
        kind, key = _Kind((1, 2, 3), 1, ops.int8_linear_impl), (args[4], n.kwargs.get("smooth"))
    elif n.target in (INT4_OP, ops.int4_linear_impl) and len(args) == 7 and not n.kwargs:
        kind, key = _Kind((1, 2, 3, 4), 1, ops.int4_linear_impl), (args[5], args[6])
    elif n.target == LINEAR and not n.kwargs and len(args) in (2, 3):
        args = (*args, None) if len(args) == 2 else args
        kind, key = _Kind((1, 2), 1, LINEAR), ()
    else:
        return None
    if any(a is not None and _const(gm, a) is None for a in (args[i] for i in kind.weights)):
        return None  # weights must be constants to concatenate
    present = tuple(args[i] is not None for i in kind.weights)
    if _const(gm, args[kind.n_of]).dim() < 2:
        return None
    return kind, (n.target if n.target is not INT8_OP else ops.int8_linear_impl, *key, present)


def fuse_siblings(gm: GraphModule) -> int:
    """Linears of one kind reading the same input -> one linear + split_with_sizes."""
    groups: dict[tuple, list[Node]] = {}
    kinds = {}
    for n in gm.graph.nodes:
        k = _kind(gm, n)
        if k is None or not isinstance(n.args[0], Node):
            continue
        kinds[n] = k[0]
        groups.setdefault((n.args[0], k[1]), []).append(n)
    fused = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for members in groups.values():
        if len(members) < 2:
            continue
        kind = kinds[members[0]]
        first = min(members, key=order.__getitem__)
        args = [(*m.args, None) if len(m.args) == 2 else tuple(m.args) for m in members]
        sizes = [int(_const(gm, a[kind.n_of]).shape[0]) for a in args]
        new_args = list(args[0])
        for i in kind.weights:
            if args[0][i] is None:
                continue
            ts = [_const(gm, a[i]) for a in args]
            cat = torch.cat([t.reshape(sz, -1) if t.dim() != 1 else t for t, sz in zip(ts, sizes)])
            if ts[0].dim() == 3:  # int4 qweight (N, n_blocks, block / 2)
                cat = cat.reshape(sum(sizes), *ts[0].shape[1:])
            new_args[i] = add_constant(gm, f"{members[0].args[kind.n_of].target}_fused", cat, first)
        with gm.graph.inserting_before(first):
            node = gm.graph.call_function(kind.fn, tuple(new_args), dict(members[0].kwargs))
            parts = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (node, sizes, -1))
            outs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
        for m, out in zip(members, outs):
            m.replace_all_uses_with(out)
            for u in list(out.users):  # the parts are strided slices: views must not assume
                if u.target == torch.ops.aten.view.default:  # contiguity (reshape copies if needed)
                    u.target = torch.ops.aten.reshape.default
            gm.graph.erase_node(m)
        fused += 1
    return fused


def direct_calls(gm: GraphModule) -> int:
    """The remaining slimformer linear ops -> their plain Python bodies (no dispatcher)."""
    n_calls = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is INT8_OP:
            n.target = ops.int8_linear_impl
            n_calls += 1
        elif n.op == "call_function" and n.target is INT4_OP:
            n.target = ops.int4_linear_impl
            n_calls += 1
    return n_calls
