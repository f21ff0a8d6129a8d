"""TuneQuantized: distilling LayerNorms, biases and int4 block scales around fixed int4 codes."""

from __future__ import annotations

import pytest
import torch
from models import calibration, context, exported, fresh_copy, inputs, token_cosines

from slimformer.passes.quantize_int4 import QuantizeInt4
from slimformer.passes.tune_quantized import TuneQuantized

pytestmark = pytest.mark.usefixtures("reference_kernels")
INT4_LINEAR = torch.ops.slimformer.int4_linear.default


def _int4_graph(model, traced, calib, jitter: float = 0.0):
    """int4 RTN; with `jitter`, every block scale off by up to that fraction (a poor quantizer,
    which the tuning should repair: the random tiny models quantize almost losslessly)."""
    gm = fresh_copy(traced)
    QuantizeInt4(method="rtn", block_size=32).run(gm, context(model, calib))
    g = torch.Generator().manual_seed(0)
    for n in gm.graph.nodes:
        if n.target == INT4_LINEAR and jitter:
            s = getattr(gm, n.args[2].target)
            s.mul_(1 + jitter * (2 * torch.rand(s.shape, generator=g) - 1))
    gm.recompile()
    return gm


def _worst_cos(model, gm, batches) -> float:
    with torch.no_grad():
        return min(token_cosines(model(**b)[0], gm(**b)[0], b["attention_mask"]).min().item() for b in batches)


def test_tuning_moves_scales_not_codes_and_lowers_the_error():
    model, _, traced = exported("bert")
    calib = calibration(model, n=5)
    gm = _int4_graph(model, traced, calib, jitter=0.3)
    nodes = [n for n in gm.graph.nodes if n.target == INT4_LINEAR]
    codes = {n.args[1].target: getattr(gm, n.args[1].target).clone() for n in nodes}
    scales = {n.args[2].target: getattr(gm, n.args[2].target).clone() for n in nodes}
    n_params = len(list(gm.parameters()))
    held = [inputs(model, batch=4, seq=12, seed=s) for s in (41, 42)]
    before = _worst_cos(model, gm, calib), _worst_cos(model, gm, held)

    result = TuneQuantized(steps=60, lr=3e-3).run(gm, context(model, calib))

    gm.graph.lint()
    assert result.modified and "60 steps on 12 int4 linears" in result.summary, result.summary
    assert [n for n in gm.graph.nodes if n.target == INT4_LINEAR] == nodes  # back to the op
    assert len(list(gm.parameters())) == n_params  # the factors are folded away
    for name, q in codes.items():
        assert torch.equal(getattr(gm, name), q)  # int4 codes untouched
    moved = [not torch.equal(getattr(gm, name), s) for name, s in scales.items()]
    assert all(moved)
    after = _worst_cos(model, gm, calib), _worst_cos(model, gm, held)
    assert 1 - after[0] < 0.8 * (1 - before[0])  # fits the calibration text...
    assert after[1] > before[1]  # ...and what it never saw


def test_tuning_that_hurts_is_reverted():
    model, _, traced = exported("bert")
    calib = calibration(model, n=5)
    gm = _int4_graph(model, traced, calib)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    result = TuneQuantized(steps=10, lr=0.5).run(gm, context(model, calib))  # a wild step size
    assert not result.modified and "reverted" in result.summary
    assert state.keys() == gm.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in gm.state_dict().items())


def test_nothing_to_tune():
    model, _, traced = exported("bert")
    gm = fresh_copy(traced)
    assert not TuneQuantized(steps=5).run(gm, context(model, calibration(model, n=1))).modified
    gm = _int4_graph(model, traced, calibration(model, n=1))
    result = TuneQuantized(steps=0).run(gm, context(model, calibration(model, n=1)))
    assert not result.modified and "off" in result.summary
