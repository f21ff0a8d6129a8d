"""Analyses for structured compression: feed-forward blocks and transformer layers.

- FFN sites: a down projection whose input is computed elementwise (activation, SwiGLU's
  product, GPT-2's tanh-GELU, dropout, views) from one or more up projections of the same
  width, and read by nothing else: its neurons can be removed as rows of the ups and columns
  of the down.
- Layer blocks: the contiguous runs of nodes of one transformer layer (module paths such as
  `encoder.layer.3`, `h.3`, `layers.3`, `encoder.block.3`); a shared layer called twice
  (ALBERT) gives two blocks. Each block has one residual-stream input and output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from slimformer.compiler import analysis
from slimformer.compiler.analysis import LinearSite, module_path

aten = torch.ops.aten

# Ops that act on each FFN neuron separately (or only move data): neurons survive them.
_ELEMENTWISE = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default,
    aten.tanh.default, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor,
    aten.pow.Tensor_Scalar, aten.dropout.default, aten.clone.default, aten.contiguous.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.to.dtype,
    aten._to_copy.default, aten.alias.default, aten.erf.default, aten.neg.default,
    aten.clamp.default, aten.hardtanh.default, aten.leaky_relu.default, aten.mish.default,
}


@dataclass
class FfnSite:
    down: LinearSite
    ups: list[LinearSite]
    path: str  # common module prefix, e.g. "encoder.layer.0"
    inner: set = field(default_factory=set)  # nodes between the ups and the down

    @property
    def width(self) -> int:
        return self.down.in_features


def find_ffns(gm: GraphModule) -> list[FfnSite]:
    return analysis._cached(gm, "ffns", _find_ffns)


def _attention_linears(gm: GraphModule) -> set[Node]:
    out = set()
    for a in analysis.find_attention(gm):
        for s in (a.q, a.k, a.v, a.o, a.extra.get("fused_qkv")):
            if s is not None:
                out.add(s.node)
    return out


def _find_ffns(gm: GraphModule) -> list[FfnSite]:
    linears = analysis.find_linears(gm)
    by_node = {s.node: s for s in linears}
    in_attention = _attention_linears(gm)
    sites = []
    for down in linears:
        if down.node in in_attention:
            continue
        ups, inner, ok = [], set(), True
        stack, seen = [down.x], set()
        while stack and ok:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in by_node:
                ups.append(by_node[n])
                continue
            if not isinstance(n.meta.get("val"), torch.Tensor):
                continue  # sizes (SymInts) of a view
            if n.op == "get_attr" and n.meta["val"].numel() == 1:
                continue  # a scalar constant
            if n.op != "call_function" or n.target not in _ELEMENTWISE:
                ok = False
                break
            inner.add(n)
            stack.extend(n.all_input_nodes)
        if not ok or not ups or any(u.node in in_attention for u in ups):
            continue
        width = down.in_features
        if any(u.out_features != width for u in ups) or width < 2:
            continue
        # The hidden activation must be private to this block (not returned, not read elsewhere).
        private = inner | {down.node} | {u.node for u in ups}
        if any(u not in private for n in inner for u in n.users):
            continue
        if any(user not in private for u in ups for user in u.node.users):
            continue
        paths = [down.path] + [u.path for u in ups]
        sites.append(FfnSite(down, ups, common_prefix(paths), inner))
    return sites


def common_prefix(paths: list[str]) -> str:
    """The longest dotted module path all `paths` start with."""
    parts = [p.split(".") for p in paths]
    out = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_prefix(path: str) -> str | None:
    """'encoder.layer.3.attention.self' -> 'encoder.layer.3'; 'h.0.attn' -> 'h.0'."""
    m = _LAYER.match(path)
    return m.group(1) if m else None


@dataclass
class Block:
    prefix: str
    index: int  # position among all blocks, in execution order
    nodes: list[Node]
    input: Node
    output: Node

    @property
    def name(self) -> str:
        return f"{self.prefix}" if self.index is None else f"{self.prefix}#{self.index}"


def find_blocks(gm: GraphModule) -> list[Block]:
    return analysis._cached(gm, "blocks", _find_blocks)


def _find_blocks(gm: GraphModule) -> list[Block]:
    prefixes = {layer_prefix(a.path) for a in analysis.find_attention(gm)} - {None}
    if not prefixes:
        return []
    runs: list[tuple[str, list[Node]]] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        path = module_path(n)
        prefix = next((p for p in prefixes if path == p or path.startswith(p + ".")), None)
        if prefix is None:
            if n.meta.get("nn_module_stack") and runs and isinstance(n.meta.get("val"), torch.Tensor):
                runs.append(((), []))  # a real op outside every layer ends the current run
            continue
        call = (prefix, _call_key(n, prefix))
        if runs and runs[-1][0] == call:
            runs[-1][1].append(n)
        else:
            runs.append((call, [n]))
    blocks = []
    for call, nodes in runs:
        prefix = call[0] if call else ""
        if not prefix:
            continue
        block = _block(prefix, len(blocks), nodes)
        if block is not None:
            blocks.append(block)
    return blocks


def _call_key(node: Node, prefix: str) -> str:
    """Which call of the layer module made `node`: torch.export keys a shared module's second
    call '...albert_layers.0@1'."""
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        if path.replace("L['self'].", "").replace("L__self__.", "") == prefix:
            return key
    return ""


def _block(prefix: str, index: int, nodes: list[Node]) -> Block | None:
    """The residual input (the latest-made outside tensor of the output's shape) and output
    (the last node read outside the run with the hidden states' shape) of one layer call."""
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users) and _is_tensor(n)]
    if not outputs:
        return None
    out = None
    for n in reversed(outputs):
        if n.meta["val"].dim() == 3:
            out = n
            break
    if out is None:
        return None
    shape = tuple(out.meta["val"].shape)
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside and _is_tensor(a)
              and tuple(a.meta["val"].shape) == shape and a.meta["val"].is_floating_point()}
    if not inputs:
        return None
    inp = max(inputs, key=lambda a: order[a])
    return Block(prefix, index, nodes, inp, out)


def _is_tensor(n: Node) -> bool:
    return isinstance(n.meta.get("val"), torch.Tensor)
