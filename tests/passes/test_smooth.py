"""Smooth (SmoothQuant): a float-exact rewrite that lowers int8 quantization error."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, calibration, context, exported, fresh_copy, inputs

from slimformer.compiler import analysis, frontend
from slimformer.kernels.naive import ACT_PER_TENSOR_U8, ACT_ROW_NORM_U8
from slimformer.passes.quantize import QMAX_CPU, QuantizeInt8
from slimformer.passes.smooth import Smooth, quant_error, smoothing_scales

pytestmark = pytest.mark.usefixtures("reference_kernels")


class Outliers(torch.nn.Module):
    """Embedding -> LayerNorm with three outlier channels -> MLP: the SmoothQuant setting."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(100, 64)
        self.ln = torch.nn.LayerNorm(64)
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)
        with torch.no_grad():
            self.ln.weight[[3, 17, 40]] = 40.0

    def forward(self, input_ids, attention_mask=None):
        return self.fc2(torch.relu(self.fc1(self.ln(self.emb(input_ids)))))


def _ids(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (4, 16), generator=g)}


def _rel_err(gm, ctx) -> float:
    num = den = 0.0
    with torch.no_grad():
        for b, ref in zip(ctx.calibration, ctx.reference):
            num += (gm(**b) - ref[0]).pow(2).sum().item()
            den += ref[0].pow(2).sum().item()
    return (num / den) ** 0.5



def test_scales_math():
    act = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scales(act, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0]))  # a channel that never fires: 1
    x, wm = torch.randn(10, 3), torch.randn(5, 3)
    torch.testing.assert_close((x / s) @ (wm * s).t(), x @ wm.t())  # the identity Smooth relies on


def test_scales_lower_error_on_outlier_channels():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    x[:, 5] *= 50
    w = torch.randn(16, 32) * 0.1
    y = x @ w.t()
    s = smoothing_scales(x.abs().amax(0), w.abs().amax(0), 0.5)
    assert quant_error([x], [y], w, s, ACT_PER_TENSOR_U8, 127) < 0.5 * quant_error([x], [y], w, None, ACT_PER_TENSOR_U8, 127)


@pytest.mark.parametrize("act_mode", [ACT_PER_TENSOR_U8, ACT_ROW_NORM_U8])
def test_smooth_keeps_float_outputs_and_lowers_quantization_error(act_mode):
    model = Outliers().eval()
    ctx = context(model, [_ids(i) for i in range(3)])
    gm = frontend.export(model, ctx.calibration[0])
    quant = QuantizeInt8(act_mode=act_mode, qmax=QMAX_CPU, gptq=False, sensitivity=False)
    plain = quant.run(fresh_copy(gm), ctx).graph_module

    result = Smooth(act_mode=act_mode, qmax=QMAX_CPU).run(gm, ctx)
    assert result.modified and set(result.details["alpha"]) == {"fc1", "fc2"}
    assert _rel_err(result.graph_module, ctx) < 1e-5  # the float graph is unchanged
    smoothed = quant.run(result.graph_module, ctx).graph_module
    assert _rel_err(smoothed, ctx) < 0.75 * _rel_err(plain, ctx)


def test_bert_stays_equivalent_and_folds_into_value_projection():
    model, _, traced = exported("bert")
    gm = fresh_copy(traced)
    ctx = context(model, calibration(model, n=2))
    result = Smooth(act_mode=ACT_ROW_NORM_U8, qmax=QMAX_CPU).run(gm, ctx)
    assert result.modified
    held = inputs(model, batch=3, seq=9, seed=5)
    with torch.no_grad():
        diff = (model(**held).last_hidden_state - gm(**held).last_hidden_state).abs().max().item()
    assert diff < 1e-4
    buffers = {name for name, _ in gm.named_buffers()}
    assert "encoder_layer_0_intermediate_dense_smooth_inv" in buffers
    assert "encoder.layer.0.attention.output.dense" in result.details["alpha"]
    # 1/s is folded into the value projection: no multiply in front of the o-projection
    assert not any("attention_output_dense_smooth_inv" in b for b in buffers)


def test_exclude_option():
    model, _, traced = exported("bert")
    gm = fresh_copy(traced)
    ctx = context(model, calibration(model, n=1))
    result = Smooth(alpha=0.5, exclude=["intermediate", "output.dense"]).run(gm, ctx)
    assert result.details["alpha"]  # the fixed alpha applies to every remaining group
    assert set(result.details["alpha"].values()) == {0.5}
    assert not any("intermediate" in k or "output.dense" in k for k in result.details["alpha"])


def test_albert_shared_weights_not_smoothed_inconsistently():
    model = FAMILIES["albert"].build()
    gm = frontend.export(model, inputs(model))
    before = {n: t.clone() for n, t in gm.named_parameters()}
    ctx = context(model, calibration(model, n=2))
    result = Smooth(act_mode=ACT_ROW_NORM_U8, qmax=QMAX_CPU).run(gm, ctx)
    skipped = result.details["skipped"]
    layer = "encoder.albert_layer_groups.0.albert_layers.0"
    assert f"{layer}.attention.query" in skipped and f"{layer}.ffn" in skipped
    shared = [n for n in before if "albert_layer_groups" in n]
    assert shared and all(torch.equal(before[n], dict(gm.named_parameters())[n]) for n in shared)
    held = inputs(model, batch=2, seq=10, seed=9)
    with torch.no_grad():
        diff = (model(**held).last_hidden_state - gm(**held).last_hidden_state).abs().max().item()
    assert diff < 1e-4


class OneHotChannel(Outliers):
    """fc2's input has one channel 60x the others: too far out to migrate into the weights."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.fc1.weight[7] *= 60.0
            self.fc1.bias[7] = 5.0


def test_outlier_channels_split_to_a_float_side_path():
    model = OneHotChannel().eval()
    ctx = context(model, [_ids(i) for i in range(3)])
    gm = frontend.export(model, ctx.calibration[0])
    quant = QuantizeInt8(act_mode=ACT_ROW_NORM_U8, qmax=QMAX_CPU, gptq=True, sensitivity=False)
    no_split = Smooth(act_mode=ACT_ROW_NORM_U8, qmax=QMAX_CPU, split_outliers=False).run(fresh_copy(gm), ctx)
    plain = quant.run(no_split.graph_module, ctx).graph_module

    result = Smooth(act_mode=ACT_ROW_NORM_U8, qmax=QMAX_CPU).run(gm, ctx)
    assert result.details["outliers"]["fc2"]["channels"] == [7]
    assert _rel_err(result.graph_module, ctx) < 1e-5  # still the same float function
    side = [n for n in gm.graph.nodes if n.meta.get(analysis.KEEP_FLOAT) == "outlier channels of fc2"]
    assert len(side) == 1 and side[0].target == torch.ops.aten.matmul.default
    split = quant.run(result.graph_module, ctx).graph_module
    assert side[0] in split.graph.nodes  # the side path is not quantized
    assert _rel_err(split, ctx) < 0.5 * _rel_err(plain, ctx)


def test_split_without_migration():
    """migrate=False (the int4 targets): weights keep their ranges, outliers are still split."""
    model = OneHotChannel().eval()
    ctx = context(model, [_ids(i) for i in range(3)])
    gm = frontend.export(model, ctx.calibration[0])
    result = Smooth(act_mode=ACT_ROW_NORM_U8, qmax=QMAX_CPU, migrate=False).run(gm, ctx)
    assert result.details["outliers"]["fc2"]["channels"] == [7]
    assert set(result.details["alpha"].values()) == {None}  # no strength: nothing migrated
    assert _rel_err(result.graph_module, ctx) < 1e-5
    w = dict(gm.named_parameters())["fc2.weight"]
    keep = [i for i in range(128) if i != 7]  # the kept columns are the original weights
    torch.testing.assert_close(w[:, keep], model.fc2.weight[:, keep])
    assert (w[:, 7] == 0).all()
