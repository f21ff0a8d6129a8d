"""Report.print: the closing fidelity line says whether the budget was met, and what it bounds."""

from __future__ import annotations

import json

from models import calibration, context, exported, fresh_copy
from rich.console import Console

from slimformer.compiler.pass_manager import PassManager
from slimformer.compiler.report import PassRecord, Report
from slimformer.passes.prune_ffn import PruneFfn


def printed(report: Report) -> str:
    console = Console(width=200, record=True, force_terminal=False)
    report.print(console)
    return console.export_text()


def fidelity(cos_min: float) -> dict:
    return {"cos_min": cos_min, "cos_mean": 0.999, "max_abs": 0.1}


def test_the_fidelity_line_marks_a_missed_budget():
    below = printed(Report("cpu-int8", "m", 0.995, final_fidelity=fidelity(0.99)))
    assert "[below budget] min cosine 0.99000" in below  # rich markup must not swallow the mark
    met = printed(Report("cpu-int8", "m", 0.995, final_fidelity=fidelity(0.996)))
    assert "[ok] min cosine 0.99600" in met and "(budget 0.995)" in met


def test_a_pruned_model_is_not_held_to_the_quantization_budget():
    passes = [PassRecord("prune_ffn", True, "", 1.0, rebased_reference=True),
              PassRecord("recover", True, "", 1.0, rebased_reference=True),
              PassRecord("quantize_int8", True, "", 1.0)]
    text = printed(Report("cpu-int8", "m", 0.995, passes, final_fidelity=fidelity(0.9)))
    assert "fidelity to the original: min cosine 0.90000" in text
    assert "below budget" not in text and "bounds the passes after recover, measured against its output" in text
    assert Report.from_dict(json.loads(Report("cpu-int8", "m", 0.995, passes).to_json())).passes == passes


def test_the_pass_manager_records_which_passes_rebase_the_reference():
    model, _, gm = exported("bert")
    ctx = context(model, calibration(model, n=2))
    ctx.report = Report("cpu-fp32", "m", 0.995)
    PassManager([PruneFfn(fraction=0.5, multiple_of=1)]).run(fresh_copy(gm), ctx)
    assert [(p.name, p.rebased_reference) for p in ctx.report.passes] == [("prune_ffn", True)]


def test_a_report_from_a_newer_or_older_version_loads():
    d = json.loads(Report("cpu-int8", "m", 0.995, [PassRecord("smooth", True, "", 1.0)]).to_json())
    d["field_from_the_future"] = 1
    d["passes"][0]["another_one"] = 2
    del d["passes"][0]["rebased_reference"]
    report = Report.from_dict(d)
    assert report.passes == [PassRecord("smooth", True, "", 1.0)] and report.target == "cpu-int8"


def test_free_text_with_brackets_is_printed_as_written():
    passes = [PassRecord("smooth", True, "split [x] off", 1.0)]
    report = Report("cpu-int8", "m", 0.995, passes, float_layers={"layer.0": "kept [fp32]"},
                    skipped_cuts={"prune_ffn: ffn": "shared [w]"})
    text = printed(report)
    assert "split [x] off" in text and "layer.0: kept [fp32]" in text and "shared [w]" in text
