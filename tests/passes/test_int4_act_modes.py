"""ChooseInt4ActModes: per-tensor int8 activations for the int4 linears where they cost little."""

from __future__ import annotations

import pytest
import torch
from models import calibration, context, exported, fresh_copy

from slimformer.kernels import naive
from slimformer.kernels.packing import pack_int4_matmulnbits, quantize_int4_rtn
from slimformer.passes.int4_act_modes import ChooseInt4ActModes, int4_to_int8, w4a8_linear
from slimformer.passes.quantize_int4 import QuantizeInt4

pytestmark = pytest.mark.usefixtures("reference_kernels")
INT4_LINEAR = torch.ops.slimformer.int4_linear.default


@pytest.fixture(scope="module")
def int4_bert():
    model, _, traced = exported("bert")
    calib = calibration(model, n=3)
    gm = fresh_copy(traced)
    QuantizeInt4(method="rtn", block_size=32).run(gm, context(model, calib))
    gm.recompile()
    return model, calib, gm


def _modes(gm) -> list[int]:
    return [n.args[-1] for n in gm.graph.nodes if n.target is w4a8_linear]


def _errors(ctx, gm) -> tuple[float, float]:
    f = ctx.fidelity(gm)
    return 1 - f.cos_min, 1 - f.cos_mean


def test_unpacked_int8_weight_stays_within_the_non_vnni_range_and_near_the_int4_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 96, generator=g)
    q, scales, zp = quantize_int4_rtn(w, 32)
    qw, scales, zp = pack_int4_matmulnbits(q, scales, zp, 32)
    w8, ch = int4_to_int8(qw, scales.half(), zp, 96, 32)
    w4 = naive.dequantize_int4_ref(qw, scales.half().float(), zp, 96, 32)
    assert w8.dtype == torch.int8 and w8.abs().max() <= 64 and w8.abs().amax(1).min() == 64
    assert (w8.float() * ch[:, None] - w4).abs().max() <= 0.5 * ch.max() + 1e-6  # one rounding step


@pytest.mark.parametrize("tolerance, expected", [(1e9, naive.ACT_PER_TENSOR_U8), (-1.0, naive.ACT_ROW_NORM_U8)])
def test_tolerance_bounds_the_choice(int4_bert, tolerance, expected):
    """No limit: every group per tensor; an impossible limit: per token everywhere."""
    model, calib, traced = int4_bert
    gm = fresh_copy(traced)
    result = ChooseInt4ActModes(tolerance=tolerance).run(gm, context(model, calib))
    gm.graph.lint()
    assert not [n for n in gm.graph.nodes if n.target is INT4_LINEAR]
    modes = _modes(gm)
    assert len(modes) == 12 and set(modes) == {expected}
    assert result.details["groups"] == 8  # q/k/v share an input: 4 groups a layer, 2 layers


def test_default_choice_keeps_the_error_within_tolerance_of_per_token(int4_bert):
    model, calib, traced = int4_bert
    ctx = context(model, calib)
    per_token = fresh_copy(traced)
    ChooseInt4ActModes(tolerance=-1.0).run(per_token, ctx)
    base = _errors(ctx, per_token)
    gm = fresh_copy(traced)
    pass_ = ChooseInt4ActModes(tolerance=0.05)
    result = pass_.run(gm, ctx)
    err = _errors(ctx, gm)
    assert all(e <= b * 1.05 + 1e-12 for e, b in zip(err, base)), (err, base)
    groups: dict = {}
    for n in gm.graph.nodes:
        if n.target is w4a8_linear:
            groups.setdefault(n.args[0], set()).add(n.args[-1])
    assert all(len(m) == 1 for m in groups.values())  # q, k and v decided together
    per_tensor = sum(1 for m in groups.values() if m == {naive.ACT_PER_TENSOR_U8})
    assert per_tensor == result.details["groups_per_tensor"]
    assert "with per-tensor activations" in result.summary
