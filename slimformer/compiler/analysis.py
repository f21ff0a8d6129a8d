"""Analyses over the ATen FX graph, cached on the GraphModule and dropped when a pass changes it.

- linear ops: `aten.linear`, `aten.addmm` (GPT-2's Conv1D), matmul against a constant weight;
- attention blocks: `scaled_dot_product_attention` and the matmul -> softmax -> matmul form,
  with their q/k/v/o projections, head count, head dim and GQA groups.
Every site is named by its module path (`encoder.layer.3.attention.self.query`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

# Ops that move data around without mixing channels: walked through to find projections.
_PASSTHROUGH = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.unflatten.int,
    aten.flatten.using_ints, aten.mul.Tensor, aten.div.Tensor, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.to.dtype, aten._to_copy.default,
    aten.slice.Tensor, aten.dropout.default, aten.alias.default,
}
# The elementwise ops of a rotary position embedding: q * cos + cat(-q2, q1) * sin.
_ROTARY = {aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.cat.default}
_MATMULS = {aten.matmul.default, aten.bmm.default}


def module_path(node: Node) -> str:
    """The innermost module a node came from, e.g. 'encoder.layer.0.attention.self.query'."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self__.", "")


def get_attr_tensor(gm: GraphModule, node: Node | None) -> torch.Tensor | None:
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


@dataclass
class LinearSite:
    """y = x @ W.T + b, whatever aten op spells it. `weight` is (out, in) as nn.Linear."""

    node: Node
    kind: str  # "linear" | "addmm" | "matmul"
    x: Node
    weight_node: Node
    bias_node: Node | None
    path: str

    def weight(self, gm: GraphModule) -> torch.Tensor:
        w = get_attr_tensor(gm, self.weight_node)
        return w if self.kind == "linear" else w.t()  # addmm/matmul hold (in, out)

    def bias(self, gm: GraphModule) -> torch.Tensor | None:
        return get_attr_tensor(gm, self.bias_node)

    @property
    def out_features(self) -> int:
        return self.node.meta["val"].shape[-1]

    @property
    def in_features(self) -> int:
        return self.x.meta["val"].shape[-1]


# node.meta key: a matmul against a constant that passes must leave in float (its value says why)
KEEP_FLOAT = "slimformer_keep_float"


def find_linears(gm: GraphModule) -> list[LinearSite]:
    return _cached(gm, "linears", _find_linears)


def _find_linears(gm: GraphModule) -> list[LinearSite]:
    sites = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or KEEP_FLOAT in n.meta:
            continue
        if n.target == aten.linear.default:
            x, w = n.args[0], n.args[1]
            b = n.args[2] if len(n.args) > 2 else None
            if get_attr_tensor(gm, w) is not None:
                sites.append(LinearSite(n, "linear", x, w, b, module_path(n)))
        elif n.target == aten.addmm.default:
            b, x, w = n.args[:3]
            if get_attr_tensor(gm, w) is not None and get_attr_tensor(gm, b) is not None \
                    and len(n.args) == 3 and not n.kwargs:
                sites.append(LinearSite(n, "addmm", x, w, b, module_path(n)))
        elif n.target == aten.matmul.default:
            x, w = n.args
            t = get_attr_tensor(gm, w)
            if t is not None and t.dim() == 2:
                sites.append(LinearSite(n, "matmul", x, w, None, module_path(n)))
    return sites


@dataclass
class AttentionSite:
    """One attention block: the score/softmax/value computation and its projections."""

    node: Node  # the SDPA node, or the final matmul of the explicit form
    form: str  # "sdpa" | "matmul_softmax"
    path: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: LinearSite | None = None
    k: LinearSite | None = None
    v: LinearSite | None = None
    o: LinearSite | None = None
    extra: dict = field(default_factory=dict)

    @property
    def gqa_groups(self) -> int:
        return self.num_heads // max(self.num_kv_heads, 1)


def find_attention(gm: GraphModule) -> list[AttentionSite]:
    return _cached(gm, "attention", _find_attention)


def _producer_linear(node: Node, by_node: dict[Node, LinearSite], depth: int = 12) -> LinearSite | None:
    """Walk up through reshapes/transposes/scalings to the linear that made `node`; failing
    that, through a rotary embedding (`q * cos + rotate_half(q) * sin`) to the one linear it
    rotates."""
    start = node
    for _ in range(depth):
        if node in by_node:
            return by_node[node]
        if not isinstance(node, Node) or node.op != "call_function" or node.target not in _PASSTHROUGH:
            break
        node = node.args[0]
    return _through_rotary(start, by_node)


def _through_rotary(node: Node, by_node: dict[Node, LinearSite], max_nodes: int = 48) -> LinearSite | None:
    """Breadth-first up through data movement and the elementwise ops of RoPE; the linear
    reached, if exactly one is (cos/sin tables come from positions, not from a linear)."""
    found, seen, queue = {}, set(), [node]
    while queue and len(seen) < max_nodes:
        n = queue.pop(0)
        if not isinstance(n, Node) or n in seen:
            continue
        seen.add(n)
        if n in by_node:
            found[n] = by_node[n]
            continue
        if n.op != "call_function" or n.target not in _PASSTHROUGH | _ROTARY:
            continue
        for a in n.args:
            queue.extend(a if isinstance(a, (list, tuple)) else [a])
    return next(iter(found.values())) if len(found) == 1 else None


def _consumer_linear(node: Node, by_x: dict[Node, LinearSite], depth: int = 8) -> LinearSite | None:
    """Walk down a single-use chain of reshapes to the linear that reads `node`."""
    for _ in range(depth):
        if node in by_x:
            return by_x[node]
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _PASSTHROUGH:
            return None
        node = users[0]
    return by_x.get(node)


def _find_attention(gm: GraphModule) -> list[AttentionSite]:
    linears = find_linears(gm)
    by_node = {s.node: s for s in linears}
    by_x: dict[Node, LinearSite] = {}
    for s in linears:
        by_x.setdefault(s.x, s)
    sites = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target == aten.scaled_dot_product_attention.default:
            q, k, v = n.args[:3]
            qs = q.meta["val"].shape  # (B, H, T, D); k, v: (B, Hkv, S, D), or repeated to H
            head_dim = int(qs[-1])
            site = AttentionSite(
                n, "sdpa", module_path(n), int(qs[1]), 0, head_dim,
                _producer_linear(q, by_node), _producer_linear(k, by_node),
                _producer_linear(v, by_node), _consumer_linear(n, by_x))
        elif n.target == aten._softmax.default or n.target == aten.softmax.int:
            # explicit form: scores = matmul(q, k^T) [*/ scale, + mask] -> softmax [-> dropout,
            # view] -> matmul(p, v); 4-D (B, H, T, D) operands, or 3-D (B*H, T, D) as DeBERTa
            pv = _find_down(n, _MATMULS)
            qk = _find_up(n.args[0], _MATMULS)
            if pv is None or qk is None:
                continue
            q, k = qk.args
            v = pv.args[1]
            head_dim = int(q.meta["val"].shape[-1])
            heads = _heads(n, head_dim, score=True) or _heads(q, head_dim)
            if not heads:
                continue
            site = AttentionSite(
                pv, "matmul_softmax", module_path(pv), heads, 0, head_dim,
                _producer_linear(q, by_node), _producer_linear(k, by_node),
                _producer_linear(v, by_node), _consumer_linear(pv, by_x),
                extra={"softmax": n, "qk": qk})
        else:
            continue
        site.num_kv_heads = _kv_heads(site, k, v)
        if site.q is None and site.k is None and site.v is None:
            fused = _fused_qkv(q, by_node)
            if fused is not None:  # GPT-2's c_attn: one linear, split into q, k, v
                site.extra["fused_qkv"] = fused
        sites.append(site)
    return sites


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _heads(node: Node, head_dim: int, score: bool = False, depth: int = 12) -> int | None:
    """Head count from the nearest (B, H, T, D) tensor up a data-movement chain (or the
    nearest (B, H, T, S) score tensor with `score`). Sequence dims are symbolic, heads static."""
    best = None
    for _ in range(depth):
        shape = _shape(node)
        if shape is not None and len(shape) == 4 and isinstance(shape[1], int) \
                and (score or shape[3] == head_dim):
            best = shape[1] if best is None else min(best, shape[1])
            if score:
                return best
        if not isinstance(node, Node) or node.op != "call_function" or node.target not in _PASSTHROUGH:
            break
        node = node.args[0]
    return best


def _kv_heads(site: AttentionSite, k: Node, v: Node) -> int:
    """Key/value heads: from the k/v projection's width where one was found, else from the
    smallest head dim on the way up (grouped-query attention repeats k/v to H heads)."""
    for proj in (site.k, site.v):
        if proj is not None and proj.out_features % site.head_dim == 0:
            return proj.out_features // site.head_dim
    found = [h for h in (_heads(k, site.head_dim), _heads(v, site.head_dim)) if h]
    return min(found) if found else site.num_heads


def _fused_qkv(q: Node, by_node: dict[Node, LinearSite], depth: int = 12) -> LinearSite | None:
    """q read from one chunk of a fused projection: getitem(split(linear)) through reshapes."""
    import operator

    for _ in range(depth):
        if not isinstance(q, Node) or q.op != "call_function":
            return None
        if q.target is operator.getitem:
            split = q.args[0]
            if isinstance(split, Node) and split.target in (aten.split.Tensor, aten.split_with_sizes.default,
                                                            aten.chunk.default, aten.unbind.int):
                return _producer_linear(split.args[0], by_node)
            return None
        if q.target not in _PASSTHROUGH:
            return None
        q = q.args[0]
    return None


def _find_down(node: Node, targets: set, depth: int = 6) -> Node | None:
    """The op in `targets` reading `node` as its first operand, through a single-use chain."""
    for _ in range(depth):
        hit = next((u for u in node.users if u.target in targets and u.args[0] is node), None)
        if hit is not None:
            return hit
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _PASSTHROUGH:
            return None
        node = users[0]
    return None


def _find_up(node: Node, targets: set, depth: int = 6) -> Node | None:
    for _ in range(depth):
        if not isinstance(node, Node) or node.op != "call_function":
            return None
        if node.target in targets:
            return node
        node = node.args[0]
    return None


def _cached(gm: GraphModule, key: str, fn):
    cache = gm.meta.setdefault("analyses", {})
    if key not in cache:
        cache[key] = fn(gm)
    return cache[key]


def invalidate(gm: GraphModule) -> None:
    gm.meta.pop("analyses", None)


def copy_graph(gm: GraphModule) -> GraphModule:
    """A deep copy a pass may edit or run; gm's cached analyses are dropped first (they hold
    fake tensors, which cannot be copied) and recomputed on demand."""
    import copy
    import warnings

    invalidate(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree LeafSpec deprecation
        return copy.deepcopy(gm)
