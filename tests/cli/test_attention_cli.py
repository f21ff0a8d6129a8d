"""`slimformer convert --attention ...`: a local-attention conversion that writes a plain ONNX
model ONNX Runtime runs at a new length, and clean failures for bad attention flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import convert_args

from slimformer import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_convert_with_local_attention(tiny_model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "tiny-local"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--target", "cpu-fp32", "--attention", "local",
                               "--attention-window", "8", "--global-tokens", "1", "--attention-layers", "1"))
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "replace_attention" in stdout
    report = json.loads((out / "report.json").read_text())
    record = next(p for p in report["passes"] if p["name"] == "replace_attention")
    assert "1 attention block(s) -> local (window 8, 1 global)" in record["summary"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(1000, 2000, (1, 45)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    hidden = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    assert hidden.shape[:2] == (1, 45) and np.isfinite(hidden).all()


def test_convert_with_auto_layers(tiny_model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "tiny-auto"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--target", "cpu-fp32", "--attention", "local",
                               "--attention-window", "2", "--global-tokens", "0", "--attention-layers", "auto",
                               "--attention-min-cos", "0.5"))
    assert rc == 0, capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    record = next(p for p in report["passes"] if p["name"] == "replace_attention")
    auto = record["details"]["auto"]
    assert auto["min_cos"] == 0.5 and len(auto["alone"]) == 2  # each layer tried alone, then together
    assert "2 attention block(s) -> local" in record["summary"]


def test_bad_attention_flags_fail_cleanly(tiny_model_dir, calib_file, tmp_path, capsys):
    for flags, needle in ((["--attention", "local", "--attention-window", "0"], "attention_window"),
                          (["--attention", "local", "--global-tokens", "-2"], "global_tokens"),
                          (["--attention", "linear", "--attention-layers", "3-1"], "attention_layers"),
                          (["--attention", "local", "--attention-min-cos", "0.9"], "attention_layers='auto'"),
                          (["--attention", "local", "--attention-features", "64"], "attention_feature_dim"),
                          (["--attention", "hybrid", "--attention-window", "0"], "attention_window"),
                          (["--attention", "local", "--attention-layers", "auto", "--attention-min-cos", "2"],
                           "attention_min_cos")):
        out = tmp_path / "never"
        rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--target", "cpu-fp32", *flags))
        captured = capsys.readouterr()
        assert rc not in (0, None) and needle in captured.err and "hint:" in captured.err, captured.err
        assert "Traceback" not in captured.err and not out.exists()
