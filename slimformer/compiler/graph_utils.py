"""Small FX editing helpers shared by the passes."""

from __future__ import annotations

import contextlib
import re

import torch
from torch.fx import GraphModule, Node


def add_constant(gm: GraphModule, name: str, tensor: torch.Tensor, before: Node) -> Node:
    """Registers `tensor` as a buffer of `gm` under a fresh name; returns a get_attr node."""
    base = re.sub(r"\W", "_", name)
    attr, i = base, 1
    while hasattr(gm, attr):
        attr, i = f"{base}_{i}", i + 1
    gm.register_buffer(attr, tensor.detach().contiguous())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(attr)
    node.meta["val"] = tensor
    return node


def attr_tensor(gm: GraphModule, target: str) -> torch.Tensor:
    """The tensor a get_attr target ("encoder.layer.0.dense_weight") points at."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_tensor(gm: GraphModule, target: str, tensor: torch.Tensor) -> None:
    """Replaces the tensor a get_attr target points at, keeping parameter-ness."""
    *path, leaf = target.split(".")
    owner = gm
    for p in path:
        owner = getattr(owner, p)
    old = getattr(owner, leaf)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, leaf, torch.nn.Parameter(tensor.detach().contiguous(), requires_grad=False))
    else:
        owner.register_buffer(leaf, tensor.detach().contiguous()) if leaf in owner._buffers \
            else setattr(owner, leaf, tensor.detach().contiguous())


def replace_node(gm: GraphModule, old: Node, target, args: tuple, kwargs: dict | None = None) -> Node:
    """Inserts `target(*args)` where `old` was, rewires its users, erases it; meta is kept."""
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, args, kwargs or {})
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def remove_unused_attrs(gm: GraphModule) -> None:
    """Drops get_attr nodes and their tensors once nothing reads them (e.g. float weights)."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        *path, leaf = name.split(".")
        owner = gm
        for p in path:
            owner = getattr(owner, p)
        with contextlib.suppress(AttributeError):
            delattr(owner, leaf)
    gm.recompile()


class _StopForward(Exception):
    """Raised by the last probe of a stop_early capture: the rest of the forward is not needed."""


@torch.no_grad()
def capture(gm: GraphModule, nodes: list[Node], batches: list[dict], on_value, stop_early: bool = False) -> None:
    """Runs the graph on `batches`, calling on_value(node, tensor, batch_index) for each node.

    Temporary recording nodes are inserted after the watched nodes and removed again. With
    stop_early each forward ends right after the last watched node (in graph order).
    """
    probes = []
    current = {"batch": 0}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(nodes, key=lambda n: order[n]) if nodes else None

    def make_probe(watched: Node):
        def probe(t):
            on_value(watched, t, current["batch"])
            if stop_early and watched is last:
                raise _StopForward
            return t
        return probe

    for n in nodes:
        with gm.graph.inserting_after(n):
            probes.append(gm.graph.call_function(make_probe(n), (n,)))
    gm.recompile()
    try:
        for i, b in enumerate(batches):
            current["batch"] = i
            with contextlib.suppress(_StopForward):
                gm(**b)
    finally:
        for p in probes:
            gm.graph.erase_node(p)
        gm.recompile()


def param_count(gm: torch.nn.Module) -> int:
    return sum(t.numel() for t in list(gm.parameters()) + list(gm.buffers()))


def size_mb(gm: torch.nn.Module) -> float:
    tensors = list(gm.parameters()) + list(gm.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6
