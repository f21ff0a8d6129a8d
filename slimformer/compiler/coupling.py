"""Coupled dimensions: which weight dimensions must be cut together, as a networkx graph.

Vertices are weight dimensions `("dim", attr, axis)`, cut units `("unit", i)` (one attention
block's heads, one FFN's neurons), the residual stream `("residual",)` and foreign readers
`("reader", node)`. Edges say "cut together":
- a unit links to every dimension it would cut (q/k/v rows, o columns; up rows, down columns);
- every dimension a linear reads or writes on the residual side links to the residual stream,
  which is never cut;
- a weight read by anything the units do not account for (a tied embedding's gather, an op we
  do not model) links all its dimensions to that reader.
A connected component is one cut decision: several units in it share weights (ALBERT's one
layer called N times: one cut, importance summed over the calls); a component that reaches the
residual stream or a foreign reader cannot be cut safely and is skipped, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
from torch.fx import GraphModule, Node

from slimformer.compiler.analysis import LinearSite

RESIDUAL = ("residual",)


@dataclass
class Unit:
    """One prunable block: `cuts` are (get_attr node, axis) pairs it removes indices from;
    `sides` are (get_attr node, axis) pairs its linears keep whole (the residual side)."""

    name: str
    cuts: list[tuple[Node, int]]
    sides: list[tuple[Node, int]]
    readers: set[Node]  # the ops that read the cut weights as this unit expects


@dataclass
class CutGroup:
    units: list[int]
    safe: bool
    reason: str = ""
    attrs: list[str] = field(default_factory=list)


def linear_unit(name: str, outputs_cut: list[LinearSite], inputs_cut: list[LinearSite],
                extra_cuts: list[tuple[Node, int]] = ()) -> Unit:
    """A unit that removes output rows of `outputs_cut` (and their biases) and input columns
    of `inputs_cut`."""
    cuts, sides, readers = list(extra_cuts), [], set()
    for s in outputs_cut:
        out_ax, in_ax = (0, 1) if s.kind == "linear" else (1, 0)
        cuts.append((s.weight_node, out_ax))
        sides.append((s.weight_node, in_ax))
        if s.bias_node is not None:
            cuts.append((s.bias_node, 0))
        readers.add(s.node)
    for s in inputs_cut:
        out_ax, in_ax = (0, 1) if s.kind == "linear" else (1, 0)
        cuts.append((s.weight_node, in_ax))
        sides.append((s.weight_node, out_ax))
        if s.bias_node is not None:
            sides.append((s.bias_node, 0))
        readers.add(s.node)
    return Unit(name, cuts, sides, readers)


def coupling_graph(gm: GraphModule, units: list[Unit]) -> nx.Graph:
    g = nx.Graph()
    g.add_node(RESIDUAL)
    accounted: dict[str, set[Node]] = {}
    for i, u in enumerate(units):
        g.add_node(("unit", i))
        for node, axis in u.cuts:
            g.add_edge(("unit", i), ("dim", node.target, axis))
            accounted.setdefault(node.target, set()).update(u.readers)
        for node, axis in u.sides:
            g.add_edge(RESIDUAL, ("dim", node.target, axis))
    # Every op that reads a cut weight must be one of the units' own linears.
    for n in gm.graph.nodes:
        if n.op != "get_attr" or n.target not in accounted:
            continue
        for user in n.users:
            if user not in accounted[n.target]:
                ndim = getattr(n.meta.get("val"), "ndim", 2)
                for axis in range(max(ndim, 1)):
                    g.add_edge(("reader", user.name), ("dim", n.target, axis))
    return g


def cut_groups(gm: GraphModule, units: list[Unit]) -> list[CutGroup]:
    """The units grouped into cut decisions, each marked safe or not (with why)."""
    g = coupling_graph(gm, units)
    groups = []
    for comp in nx.connected_components(g):
        members = sorted(v[1] for v in comp if v[0] == "unit")
        if not members:
            continue
        attrs = sorted({v[1] for v in comp if v[0] == "dim"})
        readers = sorted(v[1] for v in comp if v[0] == "reader")
        names = ", ".join(units[i].name for i in members[:3])
        if RESIDUAL in comp:
            groups.append(CutGroup(members, False, f"{names}: a cut weight dimension is also on the "
                                   "residual stream (shared with another role)", attrs))
        elif readers:
            groups.append(CutGroup(members, False, f"{names}: a cut weight is also read by "
                                   f"{', '.join(readers[:3])} (tied or shared outside the block)", attrs))
        else:
            groups.append(CutGroup(members, True, "", attrs))
    return sorted(groups, key=lambda c: c.units[0])
