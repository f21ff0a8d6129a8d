"""replace_attention on the tiny model families: what is replaced, what is skipped and why,
exactness of local attention within one window, hybrid against local, causality read from the
masks, layer selection, option validation, and the cpu-fp32 ONNX lowering of every kind."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, calibration, context, exported, fresh_copy, inputs

from slimformer.compiler.pass_manager import PassManager
from slimformer.errors import SlimformerError
from slimformer.passes.attention_pipeline import attention_passes, parse_layers
from slimformer.passes.replace_attention import ReplaceAttention

pytestmark = pytest.mark.usefixtures("reference_kernels", "one_torch_thread")


def _run(name: str, **kw):
    model, _, gm = exported(name)
    gm = fresh_copy(gm)
    ctx = context(model, calibration(model, n=2))
    gm = PassManager([ReplaceAttention(**kw)]).run(gm, ctx)
    return gm, ctx.report.passes[-1]


def _ops(gm) -> list[str]:
    return [n.target.__name__.split(".")[0] for n in gm.graph.nodes
            if n.op == "call_function" and "slimformer" in str(n.target)]


def _sdpa_count(gm) -> int:
    return sum(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama_gqa"])
def test_local_attention_is_exact_within_one_window(name):
    gm, record = _run(name, kind="local", window=64, global_tokens=1, transfer_steps=0)
    assert _sdpa_count(gm) == 0 and _ops(gm) == ["block_sparse_attention"] * 2
    assert record.fidelity["cos_min"] > 0.99999
    causal = {layer["causal"] for layer in record.details["layers"].values()}
    assert causal == {FAMILIES[name].decoder}


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_linear_attention_with_hedgehog_and_recovery(name):
    gm, record = _run(name, kind="linear", transfer_steps=30, recover_steps=6, recover_lr=1e-3)
    assert _sdpa_count(gm) == 0 and _ops(gm) == ["linear_attention"] * 2
    assert record.fidelity["cos_min"] > 0.95
    layer = next(iter(record.details["layers"].values()))
    assert layer["causal"] == FAMILIES[name].decoder
    assert layer["loss_end"] <= layer["loss_start"] + 1e-6  # Hedgehog's fit did not get worse
    rec = record.details["recover"]
    assert rec["steps"] == 6 and rec["loss_end"] >= 0


@pytest.mark.parametrize("name", ["bert", "llama_gqa"])
def test_hybrid_attention_beats_local_at_the_same_window(name):
    """hybrid = local's pattern + the far keys through Hedgehog linear attention: with the same
    window (4 tokens, 16-token inputs: most keys are far) it keeps more of the model than local."""
    common = dict(window=4, global_tokens=1, transfer_steps=10, transfer_lr=1e-3, feature_dim=16)
    gm, hybrid = _run(name, kind="hybrid", hedgehog_steps=30, **common)
    _, local = _run(name, kind="local", **common)
    assert _sdpa_count(gm) == 0 and _ops(gm) == ["hybrid_attention"] * 2
    assert 1 - hybrid.fidelity["cos_min"] < 0.8 * (1 - local.fidelity["cos_min"]), (hybrid.fidelity, local.fidelity)
    layer = next(iter(hybrid.details["layers"].values()))
    assert layer["causal"] == FAMILIES[name].decoder and layer["features"] == 32
    assert layer["loss_end"] < layer["loss_start"]
    assert "hybrid (window 4, 1 global" in hybrid.summary
    gains = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("hedgehog_g")]
    assert len(gains) == 2  # the learned far-key weights live in the graph


def test_short_window_with_global_token_transfer_and_recovery():
    model, _, traced = exported("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, record = _run("bert", kind="local", window=4, global_tokens=1, transfer_steps=10, transfer_lr=1e-3,
                      recover_steps=4, recover_lr=1e-3)
    assert record.fidelity["cos_min"] > 0.98
    layer = record.details["layers"]["encoder.layer.0.attention.self"]
    assert layer["mse_end"] < layer["mse_start"]  # the per-layer projection fit ran and helped
    assert record.details["recover"]["steps"] == 4
    # training worked on copies: the original model (the reference) is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_distillation_that_hurts_is_undone():
    """recover_steps with an absurd learning rate wrecks the model: the pass puts the
    transferred weights back, and says so."""
    common = dict(kind="local", window=4, global_tokens=1, transfer_steps=0)
    _, plain = _run("bert", **common)
    _, wrecked = _run("bert", recover_steps=3, recover_lr=1.0, **common)
    rec = wrecked.details["recover"]
    assert "reverted" in rec and rec["calibration_cos_min"][1] < rec["calibration_cos_min"][0]
    assert wrecked.fidelity["cos_min"] == pytest.approx(plain.fidelity["cos_min"], abs=1e-6)


def test_layer_selection_keeps_the_rest_in_softmax():
    gm, record = _run("bert", kind="local", window=4, layers=[1, 7], transfer_steps=0)
    assert _sdpa_count(gm) == 1 and _ops(gm) == ["block_sparse_attention"]
    assert list(record.details["layers"]) == ["encoder.layer.1.attention.self"]
    assert "layer 7" in record.details["skipped"]


def test_auto_layers_take_the_least_sensitive_within_the_floor():
    gm, loose = _run("bert", kind="local", window=2, global_tokens=0, min_cos=1e-3, transfer_steps=0)
    alone = loose.details["auto"]["alone"]  # each layer replaced by itself: its min cosine
    assert _ops(gm) == ["block_sparse_attention"] * 2 and len(alone) == 2
    both, best = loose.fidelity["cos_min"], max(alone, key=alone.get)
    assert both < alone[best] < 1  # two layers cost more than the cheaper one alone
    floor = (both + alone[best]) / 2
    gm, mid = _run("bert", kind="local", window=2, global_tokens=0, min_cos=floor, transfer_steps=0)
    assert _sdpa_count(gm) == 1 and list(mid.details["layers"]) == [best]
    assert mid.fidelity["cos_min"] >= floor and "kept in softmax" in str(mid.details["skipped"])
    gm, none = _run("bert", kind="local", window=2, global_tokens=0, min_cos=1.0, transfer_steps=0)
    assert not none.modified and _sdpa_count(gm) == 2


def test_auto_layers_train_each_feature_map_once(monkeypatch):
    from slimformer.passes import feature_maps
    calls = []
    train = feature_maps.train_hedgehog
    monkeypatch.setattr(feature_maps, "train_hedgehog", lambda *a, **k: calls.append(1) or train(*a, **k))
    gm, record = _run("bert", kind="linear", min_cos=1e-3, transfer_steps=5)
    # 2 layers alone, then both together and the final rewrite reuse what was trained
    assert len(calls) == 2 and _ops(gm) == ["linear_attention"] * 2
    assert all("loss_end" in layer for layer in record.details["layers"].values())
    # the reuse is exact: the same graph as replacing both layers directly
    direct, _ = _run("bert", kind="linear", transfer_steps=5)
    model, _, _ = exported("bert")
    batch = inputs(model)
    torch.testing.assert_close(gm(**batch), direct(**batch), rtol=0, atol=0)


@pytest.mark.parametrize("name, reason", [("mpnet", "matmul_softmax"), ("t5_encoder", "float mask")])
def test_unsupported_forms_are_skipped_with_a_reason(name, reason):
    gm, record = _run(name, kind="linear", transfer_steps=2)
    assert not record.modified and not _ops(gm)
    assert all(reason in why for why in record.details["skipped"].values())


def test_parse_layers():
    assert parse_layers("2-5") == parse_layers("2,3,4,5") == parse_layers([5, 4, 3, 2]) == [2, 3, 4, 5]
    assert parse_layers("0,3-4") == [0, 3, 4] and parse_layers(1) == [1] and parse_layers(None) is None


@pytest.mark.parametrize("options, needle", [
    ({"attention": "sparse"}, "linear, local"),
    ({"attention": "local", "attention_window": 0}, "attention_window"),
    ({"attention": "local", "global_tokens": -1}, "global_tokens"),
    ({"attention": "local", "attention_layers": "2-x"}, "attention_layers"),
    ({"attention": "local", "attention_layers": "5-2"}, "empty"),
    ({"attention": "linear", "attention_layers": [-1]}, "attention_layers"),
    ({"attention": "linear", "attention_window": 64}, "'hybrid' only"),
    ({"attention": "hybrid", "attention_feature_map": "elu"}, "needs Hedgehog"),
    ({"attention": "hybrid", "attention_feature_dim": 0}, "attention_feature_dim"),
    ({"attention": "linear", "attention_feature_map": "relu"}, "hedgehog"),
    ({"attention": "local", "attention_feature_dim": 64}, "attention='linear'"),
    ({"attention": "linear", "attention_feature_map": "elu", "attention_feature_dim": 64}, "Hedgehog"),
    ({"attention": "linear", "attention_feature_dim": 0}, "attention_feature_dim"),
    ({"attention": "local", "attention_min_cos": 0.9}, "'auto' only"),
    ({"attention": "local", "attention_layers": "auto", "attention_min_cos": 1.5}, "(0, 1]"),
])
def test_bad_options_fail_early_with_a_hint(options, needle):
    with pytest.raises(SlimformerError) as e:
        attention_passes(options)
    assert needle in str(e.value) and e.value.hint


@pytest.mark.parametrize("name, kind", [("gpt2", "linear"), ("bert", "hybrid")])  # local: tests/cli
def test_cpu_fp32_lowering_runs_longer_padded_inputs(name, kind):
    """ONNX Runtime runs the lowered ops (ONNX export costs ~20 s each: one kind here, the other
    in the CLI test) at a length other than the traced one, with padding; linear with more
    Hedgehog features than the head dim (phi: 2 x 24 features for head dim 8)."""
    import slimformer

    model = FAMILIES[name].build()
    opts = {"attention": kind, "attention_recover_steps": 0}
    if kind != "linear":
        opts.update(attention_window=4, global_tokens=1)
    if kind != "local":
        opts.update(attention_transfer_steps=5, attention_feature_dim=24)
    compiled = slimformer.compile(model, "cpu-fp32", inputs(model), calibration(model, n=1), **opts)
    assert compiled.report.passes[0].name == "replace_attention"
    assert compiled.report.final_fidelity["cos_min"] > 0.9
    if kind != "local":
        layers = compiled.report.passes[0].details["layers"].values()
        assert layers and all(layer["features"] == 48 for layer in layers)
    x = inputs(model, batch=2, seq=41, seed=5)
    out = compiled(**x).last_hidden_state
    assert out.shape[:2] == (2, 41) and torch.isfinite(out).all()
