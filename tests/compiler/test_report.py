"""Report.print: the closing fidelity line says whether the budget was met, and what it bounds."""

from __future__ import annotations

from rich.console import Console

from slimformer.compiler.report import Report


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
    report = Report("cpu-int8", "m", 0.995, final_fidelity=fidelity(0.9), flops_before=2e9, flops_after=1e9)
    text = printed(report)
    assert "fidelity to the original: min cosine 0.90000" in text
    assert "below budget" not in text and "measured against the pruned model" in text
