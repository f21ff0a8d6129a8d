"""slimformer.compile and the targets: cpu-fp32 matches torch, cpu-int8 keeps >= 0.98 cosine on
every family, the compiled model returns the original's output structure."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, FAMILY_NAMES, compiled, inputs, token_cosines

import slimformer
from slimformer import SlimformerError
from slimformer.compiler.api import default_example_inputs

pytestmark = pytest.mark.usefixtures("reference_kernels")


def _held_out(model) -> list[dict]:
    """Random inputs never seen in compilation, at other batch and sequence sizes."""
    return [inputs(model, batch=4, seq=10, seed=77), inputs(model, batch=2, seq=15, seed=78),
            inputs(model, batch=1, seq=6, seed=79, pad=False)]


def test_targets_registered():
    names = slimformer.target_names()
    assert {"cpu-fp32", "cpu-int8"} <= set(names)


def test_unknown_target_lists_valid_ones():
    model = FAMILIES["bert"].build()
    with pytest.raises(SlimformerError, match="unknown target 'tpu-int3'") as info:
        slimformer.compile(model, "tpu-int3", inputs(model))
    assert "cpu-fp32" in info.value.hint and "cpu-int8" in info.value.hint
    assert "valid targets" in str(info.value)


def test_bad_arguments_are_user_errors():
    model = FAMILIES["bert"].build()
    with pytest.raises(SlimformerError, match="fidelity must be in"):
        slimformer.compile(model, "cpu-int8", inputs(model), fidelity=1.5)
    with pytest.raises(SlimformerError, match="calibration set is empty"):
        slimformer.compile(model, "cpu-int8", inputs(model), calibration=[])


def test_misspelt_options_fail_with_a_suggestion():
    model = FAMILIES["bert"].build()
    with pytest.raises(SlimformerError, match="unknown option.*prune_head") as info:
        slimformer.compile(model, "cpu-int8", inputs(model), prune_head=0.25)
    assert "'prune_head' -> 'prune_heads'?" in info.value.hint
    # an option of another target is unknown to this one: it would do nothing here
    with pytest.raises(SlimformerError, match="unknown option.*embeddings"):
        slimformer.compile(model, "cpu-int8", inputs(model), embeddings="int4")


def test_default_example_inputs():
    model = FAMILIES["bert"].build()
    ex = default_example_inputs(model)
    assert set(ex) == {"input_ids", "attention_mask"} and ex["input_ids"].shape == (2, 16)
    assert int(ex["input_ids"].max()) < model.config.vocab_size
    with pytest.raises(SlimformerError, match="no example_inputs"):
        default_example_inputs(torch.nn.Linear(2, 2))


def test_cpu_fp32_matches_torch():
    model, cm = compiled("bert", "cpu-fp32")
    assert cm.target == "cpu-fp32" and cm.report.passes == []
    for x in _held_out(model):
        with torch.no_grad():
            ref = model(**x).last_hidden_state
        out = cm(**x).last_hidden_state
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert (out - ref).abs().max().item() <= 1e-4
    assert cm.report.final_fidelity["max_abs"] <= 1e-4


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_cpu_int8_fidelity_and_output_structure(name):
    model, cm = compiled(name, "cpu-int8")
    for x in _held_out(model):
        with torch.no_grad():
            ref = model(**x)
        out = cm(**x)
        assert type(out) is type(ref)  # e.g. BaseModelOutputWithPastAndCrossAttentions
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape
        cos = token_cosines(ref.last_hidden_state, out.last_hidden_state, x["attention_mask"])
        assert cos.min().item() >= 0.98, f"{name}: min cosine {cos.min().item():.4f}"
    # the ONNX model's inputs are the forward's arguments, with dynamic batch and sequence
    session_inputs = cm.session.get_inputs()
    assert [i.name for i in session_inputs] == [n for n in cm.input_names if n in {i.name for i in session_inputs}]
    assert set(cm.input_names) == set(inputs(model)) and "input_ids" in [i.name for i in session_inputs]
    assert all(isinstance(d, str) for i in session_inputs for d in i.shape)
    report = cm.report
    assert [p.name for p in report.passes] == ["smooth", "quantize_int8", "quantize_embeddings"]
    assert report.final_fidelity["cos_min"] >= 0.98
    # (no size check here: a tiny model's ONNX file is mostly per-node metadata, not weights)


def test_compiled_model_call_conventions():
    model, cm = compiled("bert", "cpu-int8")
    x = inputs(model, batch=2, seq=7, seed=11)
    assert cm.input_names == ["input_ids", "attention_mask"]
    by_name = cm(**x).last_hidden_state
    positional = cm(x["input_ids"], x["attention_mask"]).last_hidden_state
    assert torch.equal(by_name, positional)
    with pytest.raises(SlimformerError, match="missing inputs") as info:
        cm(input_ids=x["input_ids"])
    assert "attention_mask" in info.value.hint


def test_int8_report_contents():
    _, cm = compiled("bert", "cpu-int8")
    r = cm.report
    assert r.target == "cpu-int8" and r.model == "BertModel" and r.fidelity_budget == 0.995
    assert r.ok
    assert r.params_before and r.lowering["summary"].startswith("cpu")
    assert all(p.fidelity is not None for p in r.passes if p.modified)
    assert r.seconds_total > 0
