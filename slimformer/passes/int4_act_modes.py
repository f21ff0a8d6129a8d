"""cpu-int4 (W4A8): which int4 linears may take per-tensor int8 activations.

ONNX Runtime runs cpu-int4's linears as int8 matmuls: the packed int4 weight is unpacked to
int8 per output channel at session start (lower_onnx.int4_group_as_int8_matmul), and
DynamicQuantizeMatMul quantizes the activations, one scale per tensor. Per-token precision costs
a row normalisation around it (Abs, ReduceMax, Div before, Mul after): about 15% of MiniLM's
run time at batch 1. Per-tensor everywhere lost too much on MiniLM (mean cosine 0.9898 < 0.99
with the LayerNorm-fed inputs per tensor), per-token everywhere leaves that time on the table.

cpu-int8 decides this against its 0.995 budget; the int4 targets never reach it, so here the
choice is relative. Per-token everywhere is the reference; input groups (q/k/v read one input)
then switch to per-tensor, least sensitive first, as long as the error (1 - cosine, the min
and the mean over the calibration set, each) grows by at most `tolerance` of its per-token
value. The int4 codes, scales and the file's bytes do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from slimformer.compiler.analysis import module_path
from slimformer.compiler.graph_utils import (
    add_constant,
    attr_tensor,
    remove_unused_attrs,
    replace_node,
)
from slimformer.compiler.pass_manager import CompileContext, Pass, PassResult, register_pass
from slimformer.kernels import naive, ops  # noqa: F401  (ops registers torch.ops.slimformer.*)
from slimformer.kernels.naive import ACT_PER_TENSOR_U8, ACT_ROW_NORM_U8
from slimformer.passes.quantize import QMAX_CPU

INT4_LINEAR = torch.ops.slimformer.int4_linear.default


def int4_to_int8(qweight, scales16, zero_points, K: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed int4 weight (fp16 block scales) as int8 per output channel, |w| <= 64 (x86
    without VNNI saturates u8 x s8 pair sums past that): (w8 (N, K) int8, ch_scale (N,) fp32).
    The same arithmetic as lower_onnx's unpacking in the file."""
    w = naive.dequantize_int4_ref(qweight, scales16.float(), zero_points, K, block_size)  # (N, K)
    ch_scale = w.abs().amax(1).clamp(min=1e-12) / QMAX_CPU
    w8 = torch.clamp(torch.round(w / ch_scale[:, None]), -QMAX_CPU, QMAX_CPU).to(torch.int8)
    return w8, ch_scale


def w4a8_linear(x, qweight, scales16, zero_points, bias, K: int, block_size: int, ch_scale, w8, act_mode: int):
    """int4-stored weight, int8 compute: what ONNX Runtime runs for cpu-int4. The file keeps
    qweight / scales16 / zero_points (lower_onnx unpacks them at session start); w8 is the
    compile-time copy of that unpacking, so calibration runs do not redo it."""
    return naive.int8_linear_ref(x, w8, ch_scale, bias, act_mode)


def _error(f) -> tuple[float, float]:
    return 1.0 - f.cos_min, 1.0 - f.cos_mean


@register_pass
@dataclass
class ChooseInt4ActModes(Pass):
    """int4_linear -> w4a8_linear with per-tensor or per-token (row-normalised) activations."""

    name = "int4_act_modes"
    tolerance: float = 0.05  # allowed growth of the error over per-token everywhere
    sensitivity_batches: int = 2  # groups are ranked on a subset, the choice checked on all

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        nodes = [n for n in gm.graph.nodes if n.target is INT4_LINEAR]
        if not nodes:
            return PassResult(gm, False, "no int4 linears")
        swapped = [to_w4a8(gm, n, ACT_ROW_NORM_U8) for n in nodes]
        remove_unused_attrs(gm)
        groups: dict[Node, list[Node]] = {}
        for n in swapped:
            groups.setdefault(n.args[0], []).append(n)
        gm.recompile()
        base = _error(ctx.fidelity(gm))
        # Each group's cost, alone: per tensor on it, per token everywhere else.
        ranked = []
        for x, members in groups.items():
            _set_mode(members, ACT_PER_TENSOR_U8)
            gm.recompile()
            err = _error(ctx.fidelity(gm, self.sensitivity_batches))
            ranked.append((err[0] + err[1], x))
            _set_mode(members, ACT_ROW_NORM_U8)
        ranked.sort(key=lambda r: r[0])
        order = [x for _, x in ranked]
        # The longest prefix of that order within tolerance (bisection: error grows with it).
        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            for i, x in enumerate(order):
                _set_mode(groups[x], ACT_PER_TENSOR_U8 if i < mid else ACT_ROW_NORM_U8)
            gm.recompile()
            err = _error(ctx.fidelity(gm))
            if all(e <= b * (1 + self.tolerance) for e, b in zip(err, base)):
                lo = mid
            else:
                hi = mid - 1
        for i, x in enumerate(order):
            _set_mode(groups[x], ACT_PER_TENSOR_U8 if i < lo else ACT_ROW_NORM_U8)
        gm.recompile()
        modes = {module_path(n): n.args[-1] for n in swapped}
        per_tensor = sum(1 for n in swapped if n.args[-1] == ACT_PER_TENSOR_U8)
        return PassResult(gm, True, f"{per_tensor}/{len(swapped)} int4 linears with per-tensor activations",
                          {"act_modes": modes, "groups_per_tensor": lo, "groups": len(order)})


def to_w4a8(gm: GraphModule, node: Node, act_mode: int) -> Node:
    """int4_linear -> w4a8_linear(..., act_mode), in place; fp16 block scales from here on."""
    x, qw, sc, zp, bias, k, bs = node.args
    scales16 = attr_tensor(gm, sc.target).half()  # the file stores fp16 block scales
    w8, ch = int4_to_int8(attr_tensor(gm, qw.target), scales16,
                          attr_tensor(gm, zp.target) if zp is not None else None, k, bs)
    sc16 = add_constant(gm, f"{sc.target}_fp16", scales16, node)
    ch_node = add_constant(gm, f"{qw.target}_ch_scale", ch, node)
    w8_node = add_constant(gm, f"{qw.target}_w8", w8, node)
    return replace_node(gm, node, w4a8_linear, (x, qw, sc16, zp, bias, k, bs, ch_node, w8_node, act_mode))


def _set_mode(nodes: list[Node], mode: int) -> None:
    for n in nodes:
        n.args = (*n.args[:-1], mode)
