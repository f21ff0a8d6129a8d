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
