"""`slimformer inspect OUT`: prints the report of an artifact."""

from __future__ import annotations

import json
import shutil

from slimformer import cli


def test_inspect_prints_the_report(converted, capsys):
    out, _, _ = converted
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("cpu-int8", "smooth", "quantize_int8", "quantize_embeddings", "lowered artifact",
                   "fidelity", "budget 0.995", "MB ->"):
        assert needle in text, text
    report = json.loads((out / "report.json").read_text())
    assert f"{report['final_fidelity']['cos_min']:.5f}" in text


def test_inspect_json(converted, capsys):
    out, _, _ = converted
    assert cli.main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads((out / "report.json").read_text())


def test_inspect_missing_report(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "no report.json" in err and "hint:" in err and "Traceback" not in err


def test_inspect_corrupt_report(converted, tmp_path, capsys):
    out, _, _ = converted
    for content in ("{ not json", json.dumps({"target": "cpu-int8"}), json.dumps({"unexpected": 1})):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(out, bad)
        (bad / "report.json").write_text(content)
        assert cli.main(["inspect", str(bad)]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert "is corrupt" in err and "hint:" in err and "Traceback" not in err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "convert" in capsys.readouterr().out
