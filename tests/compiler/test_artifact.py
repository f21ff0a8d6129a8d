"""Artifacts: atomic writes, save/load round trip, a plain ONNX model for vanilla onnxruntime,
nothing pickled."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from models import compiled, inputs, token_cosines

import slimformer
from slimformer import SlimformerError
from slimformer.compiler.artifact import atomic_dir, check_destination
from slimformer.compiler.report import Report

pytestmark = pytest.mark.usefixtures("reference_kernels")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


def _leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_atomic_dir_success(tmp_path):
    out = tmp_path / "a" / "out"
    with atomic_dir(out) as tmp:
        assert not out.exists()
        (tmp / "f.txt").write_text("x")
    assert (out / "f.txt").read_text() == "x"
    assert _leftovers(out.parent) == []


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("disk full")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_force_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(SlimformerError, match="already exists") as info:
        check_destination(out, force=False)
    assert "--force" in info.value.hint
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # the old one survives a failure
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_destination_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SlimformerError, match="not a directory"):
        check_destination(f, force=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, reference_kernels):
    model, cm = compiled("bert", "cpu-int8")
    out = tmp_path_factory.mktemp("artifact") / "bert-int8"
    assert cm.save(out) == out
    return model, cm, out


def test_save_load_round_trip_is_identical(saved):
    model, cm, out = saved
    loaded = slimformer.load(out)
    assert isinstance(loaded, slimformer.CompiledModel)
    assert loaded.target == "cpu-int8" and loaded.input_names == cm.input_names
    for x in (inputs(model, batch=3, seq=9, seed=1), inputs(model, batch=1, seq=20, seed=2, pad=False)):
        a, b = cm(**x), loaded(**x)
        assert type(a) is type(b)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert loaded.report.to_json() == cm.report.to_json()


def test_loaded_cpu_model_flushes_denormals(saved):
    # ORT's softmax meets denormals on padded batches; flushed, MiniLM ran ~30% faster
    loaded = slimformer.load(saved[2])
    opts = loaded.session.get_session_options()
    assert opts.get_session_config_entry("session.set_denormal_as_zero") == "1"


def test_artifact_files_and_metadata(saved):
    _, cm, out = saved
    names = sorted(os.listdir(out))
    assert names == ["model.onnx", "report.json", "slimformer.json"]
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)]  # nothing pickled
    meta = json.loads((out / "slimformer.json").read_text())
    assert meta["target"] == "cpu-int8" and meta["runtime"] == "onnxruntime"
    assert meta["inputs"] == ["input_ids", "attention_mask"]
    assert meta["outputs"]["names"] == ["last_hidden_state"]
    assert meta["outputs"]["class"].endswith("BaseModelOutputWithPoolingAndCrossAttentions")
    report = Report.from_dict(json.loads((out / "report.json").read_text()))
    assert [p.name for p in report.passes] == ["smooth", "quantize_int8", "quantize_embeddings"]
    assert (out / "model.onnx").stat().st_size == len(cm.model_bytes)
    assert _leftovers(out.parent) == []


def test_onnx_runs_in_plain_onnxruntime(saved):
    model, _, out = saved
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ins = sess.get_inputs()
    assert [i.name for i in ins] == ["input_ids", "attention_mask"]  # the forward's argument names
    assert all(isinstance(d, str) for i in ins for d in i.shape)  # dynamic batch and sequence
    assert sess.get_outputs()[0].name == "last_hidden_state"
    for batch, seq in [(1, 5), (6, 23)]:
        x = inputs(model, batch=batch, seq=seq, seed=batch)
        (hidden,) = sess.run(None, {k: v.numpy() for k, v in x.items()})
        assert hidden.shape == (batch, seq, 64) and hidden.dtype == np.float32
        with torch.no_grad():
            ref = model(**x).last_hidden_state
        assert token_cosines(ref, torch.from_numpy(hidden), x["attention_mask"]).min() > 0.98


def test_save_refuses_existing_directory(saved, tmp_path):
    _, cm, _ = saved
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(SlimformerError, match="already exists"):
        cm.save(out)
    cm.save(out, force=True)
    assert (out / "model.onnx").is_file()


def test_load_errors(saved, tmp_path):
    _, _, out = saved
    with pytest.raises(SlimformerError, match="not a slimformer artifact"):
        slimformer.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("slimformer.json", "model.onnx"):
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / "report.json").write_text("{ not json")
    with pytest.raises(SlimformerError, match="corrupt artifact metadata"):
        slimformer.load(broken)
