"""`slimformer convert`: a working conversion, and for every bad input a non-zero exit, a
message with a hint, no traceback, and no output directory (nor temp directory) left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import convert_args
from transformers import AutoModel, AutoTokenizer

import slimformer
from slimformer import cli

REPO = Path(__file__).resolve().parents[2]
FAST = ("--target", "cpu-fp32")  # no passes: reaches the exporter and the writer soonest


def _flat(text: str) -> str:
    return " ".join(text.split())


def _assert_clean_failure(capsys, rc, out: Path, *needles: str) -> str:
    """Non-zero exit, 'error: ...' and 'hint: ...' on stderr, no traceback, nothing written."""
    captured = capsys.readouterr()
    err = _flat(captured.err)
    assert rc not in (0, None), err
    assert "error:" in err and "hint:" in err, err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    return err


def _copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- the working conversion

def test_convert_writes_a_complete_artifact(converted, tiny_model_dir):
    out, dump, stdout = converted
    names = set(os.listdir(out))
    assert {"model.onnx", "report.json", "slimformer.json", "config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".bin"))]
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "cpu-int8" and report["final_fidelity"]["cos_min"] >= report["fidelity_budget"]
    assert f"wrote {out}/model.onnx" in _flat(stdout)
    assert "quantize_int8" in stdout
    assert sorted(p.name for p in dump.iterdir()) == [
        "00_input.txt", "01_smooth.txt", "02_quantize_int8.txt", "03_quantize_embeddings.txt"]
    assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]

    # the artifact, with its tokenizer, reproduces the original model
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModel.from_pretrained(tiny_model_dir).eval()
    enc = tok(["A held-out sentence about the weather.", "Another one, somewhat longer than the first."],
              padding=True, return_tensors="pt")
    compiled = slimformer.load(out)
    got = compiled(**{k: enc[k] for k in compiled.input_names}).last_hidden_state
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    mask = enc["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(ref[mask], got[mask], dim=-1)
    assert cos.min() > 0.99


def test_targets_command(capsys):
    assert cli.main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "cpu-fp32" in out and "cpu-int8" in out


# ---------------------------------------------------------------- bad inputs

def test_unknown_target(tiny_model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--target", "tpu-int3"))
    _assert_clean_failure(capsys, rc, out, "unknown target 'tpu-int3'", "cpu-fp32", "cpu-int8")


def test_model_directory_missing(calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(convert_args(tmp_path / "no-such-model", out, calib_file))
    _assert_clean_failure(capsys, rc, out, "does not exist", "Hugging Face model directory")


def test_path_with_brackets_is_printed_verbatim(calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(convert_args(tmp_path / "[/x] [red]model", out, calib_file))
    _assert_clean_failure(capsys, rc, out, "[/x] [red]model does not exist")  # not read as markup


def test_config_json_corrupt(tiny_model_dir, calib_file, tmp_path, capsys):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    (model / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    out = tmp_path / "out"
    rc = cli.main(convert_args(model, out, calib_file))
    _assert_clean_failure(capsys, rc, out, "config.json is not valid JSON")


def test_config_json_not_a_model(tiny_model_dir, calib_file, tmp_path, capsys):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    out = tmp_path / "out"
    rc = cli.main(convert_args(model, out, calib_file))
    _assert_clean_failure(capsys, rc, out, "not a usable model config")


def test_weights_truncated(tiny_model_dir, calib_file, tmp_path, capsys):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    rc = cli.main(convert_args(model, out, calib_file))
    _assert_clean_failure(capsys, rc, out, "cannot load the weights", "truncated or corrupt")


def test_model_code_fails_to_import(tiny_model_dir, calib_file, tmp_path, capsys, monkeypatch):
    """An ImportError inside transformers (e.g. a local kernels.py shadowing the `kernels`
    package it imports) is not blamed on the weight file."""
    def broken(*_a, **_k):
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels' (/x/kernels.py)")

    monkeypatch.setattr(AutoModel, "from_pretrained", broken)
    out = tmp_path / "out"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file))
    err = _assert_clean_failure(capsys, rc, out, "failed to import its code", "shadows it")
    assert "truncated" not in err


def test_weights_missing(tiny_model_dir, calib_file, tmp_path, capsys):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    (model / "model.safetensors").unlink()
    out = tmp_path / "out"
    rc = cli.main(convert_args(model, out, calib_file))
    _assert_clean_failure(capsys, rc, out, "has no weights")


@pytest.mark.parametrize("content, needle", [
    (b"", "is empty"),
    (b"\n   \n\n", "is empty"),
    (b"caf\xe9 au lait\n\xff\xfe broken bytes\n", "cannot read calibration file"),  # Latin-1, not UTF-8
])
def test_calibration_file_unusable(tiny_model_dir, tmp_path, capsys, content, needle):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    out = tmp_path / "out"
    rc = cli.main(convert_args(tiny_model_dir, out, calib))
    _assert_clean_failure(capsys, rc, out, needle)


def test_calibration_file_missing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(convert_args(tiny_model_dir, out, tmp_path / "nope.txt"))
    _assert_clean_failure(capsys, rc, out, "does not exist", "UTF-8 text file")


def test_calibration_path_is_a_directory(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(convert_args(tiny_model_dir, out, tmp_path))
    _assert_clean_failure(capsys, rc, out, "cannot read calibration file")


def test_fidelity_out_of_range(tiny_model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--fidelity", "1.5"))
    _assert_clean_failure(capsys, rc, out, "--fidelity must be in (0, 1]")


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30522, 8)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        x = self.emb(input_ids)
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


def test_untraceable_model(tiny_model_dir, calib_file, tmp_path, capsys, monkeypatch):
    import slimformer.convert

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(slimformer.convert, "load_model_dir", lambda d: (Branchy().eval(), tok))
    out = tmp_path / "out"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file))
    _assert_clean_failure(capsys, rc, out, "cannot trace Branchy", "data-dependent control flow",
                          "if x.sum() > 0:", "torch.cond")


# ---------------------------------------------------------------- the output directory

def test_out_dir_exists_is_refused(converted, tiny_model_dir, calib_file, capsys):
    out, _, _ = converted
    before = sorted(os.listdir(out))
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file))
    err = _flat(capsys.readouterr().err)
    assert rc == 1 and "already exists" in err and "--force" in err
    assert sorted(os.listdir(out)) == before


def _existing(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out


def _assert_untouched(out: Path) -> None:
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_force_with_failing_load_keeps_old_output(tiny_model_dir, calib_file, tmp_path, capsys):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    (model / "config.json").write_text("{ nope")
    out = _existing(tmp_path)
    rc = cli.main(convert_args(model, out, calib_file, "--force"))
    assert rc == 1 and "not valid JSON" in _flat(capsys.readouterr().err)
    _assert_untouched(out)


def _fail_onnx_export(*args, **kwargs):
    raise RuntimeError("simulated exporter crash")


def test_failure_in_onnx_export_leaves_nothing(tiny_model_dir, calib_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", _fail_onnx_export)
    out = tmp_path / "out"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, *FAST))
    _assert_clean_failure(capsys, rc, out, "ONNX export failed", "simulated exporter crash", "--dump-ir")
    assert list(tmp_path.iterdir()) == []


def test_force_with_failing_conversion_keeps_old_output(tiny_model_dir, calib_file, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", _fail_onnx_export)
    out = _existing(tmp_path)
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--force", *FAST))
    assert rc == 1 and "ONNX export failed" in _flat(capsys.readouterr().err)
    _assert_untouched(out)


def test_failure_while_writing_leaves_nothing(tiny_model_dir, calib_file, tmp_path, capsys, monkeypatch):
    """The artifact is half written (model.onnx is there) when the disk fills up."""
    from slimformer.compiler.compiled import OnnxCompiledModel

    real_write = OnnxCompiledModel._write

    def write_then_fail(self, tmp):
        real_write(self, tmp)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(OnnxCompiledModel, "_write", write_then_fail)
    out = _existing(tmp_path)
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--force", *FAST))
    err = _flat(capsys.readouterr().err)
    assert rc not in (0, None) and "No space left on device" in err and "Traceback" not in err
    _assert_untouched(out)


def test_interrupt_leaves_nothing(tiny_model_dir, calib_file, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupt)
    out = tmp_path / "out"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, *FAST))
    assert rc == 130 and "nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- a real process

def test_subprocess_error_has_no_traceback(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SLIMFORMER_KERNELS": "reference", "COLUMNS": "300"}
    proc = subprocess.run(
        [sys.executable, "-m", "slimformer.cli", "convert", str(tmp_path / "missing"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 1
    err = _flat(proc.stderr)
    assert "error: model directory" in err and "does not exist" in err and "hint:" in err
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "slimformer.cli", "convert", tiny_model_dir, "--out",
                           str(out), "--target", "nope"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert proc.returncode == 1 and "valid targets" in _flat(proc.stderr) and "Traceback" not in proc.stderr
    assert not out.exists()


def test_training_text_is_batched_by_length(tiny_model_dir):
    from slimformer.convert import by_length

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["a much longer sentence than the others here", "short", "a medium sentence", "tiny"]
    ordered = by_length(tokenizer, texts)
    assert sorted(ordered) == sorted(texts)
    lengths = [len(tokenizer(t)["input_ids"]) for t in ordered]
    assert lengths == sorted(lengths) and ordered[-1] == texts[0]
