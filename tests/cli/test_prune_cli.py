"""`slimformer convert` with the pruning flags: a smaller artifact with a report of the cuts;
bad values fail before anything is loaded, with nothing written."""

from __future__ import annotations

import json

import pytest
from conftest import convert_args

import slimformer
from slimformer import cli
from slimformer.compiler.report import Report
from slimformer.errors import SlimformerError


def test_pruned_conversion_reports_the_cuts(tiny_model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--target", "cpu-fp32",
                               "--prune-heads", "0.5", "--prune-ffn", "0.5", "--recover-steps", "3"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads((out / "report.json").read_text())
    report = Report.from_dict(data)  # round trip with the new fields
    assert [p.name for p in report.passes][:3] == ["prune_heads", "prune_ffn", "recover"]
    assert all(p.fidelity is not None for p in report.passes[:3])
    assert report.flops_after < 0.75 * report.flops_before
    assert report.params_after_structure < report.params_before_structure
    assert any("prune_heads: kept 2/4 heads" in "; ".join(v) for v in report.structure.values())
    assert "structured compression" in captured.out and "FLOPs" in captured.out
    model = slimformer.load(out)
    assert model.report.structure == report.structure


@pytest.mark.parametrize("flags, needle", [
    (["--prune-heads", "1.5"], "--prune-heads must be in [0, 1)"),
    (["--prune-ffn", "-0.1"], "--prune-ffn must be in [0, 1)"),
    (["--drop-layers", "a,b"], "--drop-layers"),
    (["--drop-layers", "2"], "would leave none"),  # the tiny BERT has 2 layers: found once loaded
])
def test_bad_pruning_values_fail_cleanly(tiny_model_dir, calib_file, tmp_path, capsys, flags, needle):
    out = tmp_path / "never"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--target", "cpu-fp32", *flags))
    err = " ".join(capsys.readouterr().err.split())
    assert rc not in (0, None)
    assert "error:" in err and needle in err, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_compile_checks_fractions_before_tracing():
    import torch

    with pytest.raises(SlimformerError, match=r"--prune-heads must be in \[0, 1\)"):
        slimformer.compile(torch.nn.Linear(2, 2), "cpu-fp32", {"input": torch.zeros(2, 2)}, prune_heads=1.0)


def test_distillation_on_a_training_text_with_a_held_out_check(tiny_model_dir, calib_file, tmp_path, capsys):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(f"Sentence number {i} about {w}." for i, w in enumerate(
        ["rivers", "trains", "bread", "music", "rain", "chess", "glass", "maps"] * 3)) + "\n")
    out = tmp_path / "distilled"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--target", "cpu-fp32", "--prune-ffn", "0.5",
                               "--recover-steps", "4", "--train-text", str(train)))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    recover = next(p for p in Report.from_dict(json.loads((out / "report.json").read_text())).passes
                   if p.name == "recover")
    assert "held-out error" in recover.summary
    steps = [s for s, _ in recover.details["distill_held_out_error"]]
    assert steps[0] == 0 and steps[-1] == 4 and recover.details["distill_kept_step"] in steps


@pytest.mark.parametrize("flags, needle", [
    (["--attention", "local", "--train-text", "TRAIN"], "no recovery runs"),
    (["--drop-layers", "1", "--train-text", "TRAIN"], "no recovery runs"),
    (["--prune-ffn", "0.5", "--recover-steps", "2", "--train-text", "MISSING"], "training text file"),
])
def test_bad_training_text_fails_cleanly(tiny_model_dir, calib_file, tmp_path, capsys, flags, needle):
    (tmp_path / "train.txt").write_text("one line\n")
    flags = [str(tmp_path / "train.txt") if f == "TRAIN" else str(tmp_path / "missing.txt") if f == "MISSING"
             else f for f in flags]
    out = tmp_path / "never"
    rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--target", "cpu-fp32", *flags))
    err = " ".join(capsys.readouterr().err.split())
    assert rc not in (0, None)
    assert "error:" in err and needle in err, err
    assert not out.exists()
