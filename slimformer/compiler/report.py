"""The report: what each pass changed, how long it took, and the fidelity after it.

Saved as `report.json` in every artifact and printed by `slimformer convert` / `inspect`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from rich.console import Console
from rich.markup import escape
from rich.table import Table


@dataclass
class PassRecord:
    name: str
    modified: bool
    summary: str
    seconds: float
    fidelity: dict | None = None  # Fidelity.as_dict() after the pass
    details: dict = field(default_factory=dict)
    rebased_reference: bool = False  # later passes' fidelity budget is measured against its output


@dataclass
class Report:
    target: str
    model: str
    fidelity_budget: float
    passes: list[PassRecord] = field(default_factory=list)
    size_before_mb: float | None = None
    size_after_mb: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    float_layers: dict = field(default_factory=dict)  # path -> why it stayed in float
    final_fidelity: dict | None = None  # measured on the lowered artifact
    lowering: dict = field(default_factory=dict)
    seconds_total: float = 0.0
    # Structured compression (pruning): what was removed per layer, cuts skipped and why,
    # and the graph's FLOPs (one 128-token sequence) and parameters before/after the cuts.
    structure: dict = field(default_factory=dict)  # layer path -> ["prune_heads: kept 9/12 ...", ...]
    skipped_cuts: dict = field(default_factory=dict)  # "pass: what" -> why it was not cut
    flops_before: float | None = None
    flops_after: float | None = None
    params_before_structure: int | None = None
    params_after_structure: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        """Fields this version does not know (a report written by a newer slimformer) are
        dropped, missing ones take their defaults (an older one)."""
        d = _known(cls, d)
        d["passes"] = [PassRecord(**_known(PassRecord, p)) for p in d.get("passes", [])]
        return cls(**d)

    @property
    def ok(self) -> bool:
        f = self.final_fidelity
        return f is not None and f["cos_min"] >= self.fidelity_budget

    def print(self, console: Console | None = None) -> None:
        """Free text (summaries, paths, reasons) goes through `escape`: rich reads a bracketed
        word such as "[x]" as markup and prints nothing for it."""
        console = console or Console()
        table = Table(title=f"slimformer: {self.model} -> {self.target}", title_justify="left")
        for col in ("pass", "changed", "time", "cos min", "cos mean", "max abs"):
            table.add_column(col, justify="right" if col not in ("pass", "changed") else "left")
        for p in self.passes:
            f = p.fidelity or {}
            table.add_row(
                p.name, escape(p.summary) if p.modified else "[dim]nothing[/dim]", f"{p.seconds:.1f}s",
                _fmt(f.get("cos_min")), _fmt(f.get("cos_mean")), _fmt(f.get("max_abs"), ".2e"))
        if self.final_fidelity:
            f = self.final_fidelity
            table.add_row("[bold]lowered artifact[/bold]", escape(self.lowering.get("summary", "")), "",
                          _fmt(f["cos_min"]), _fmt(f["cos_mean"]), _fmt(f["max_abs"], ".2e"))
        console.print(table)
        if self.size_before_mb is not None and self.size_after_mb is not None:
            console.print(f"size: {self.size_before_mb:.1f} MB -> {self.size_after_mb:.1f} MB "
                          f"({self.size_before_mb / max(self.size_after_mb, 1e-9):.1f}x smaller)")
        self._print_structure(console)
        if self.float_layers:
            console.print(f"kept in float ({len(self.float_layers)}):")
            for path, why in self.float_layers.items():
                console.print(escape(f"  {path}: {why}"))
        if self.final_fidelity:
            f = self.final_fidelity
            numbers = f"min cosine {f['cos_min']:.5f}, mean {f['cos_mean']:.5f}, max abs {f['max_abs']:.3g}"
            rebased = [p.name for p in self.passes if p.rebased_reference]
            if rebased:  # pruned or rewritten: the budget bounds only the passes after the last of them
                console.print(f"fidelity to the original: {numbers} (the budget {self.fidelity_budget} "
                              f"bounds the passes after {rebased[-1]}, measured against its output)")
            else:
                mark = f"[green]{escape('[ok]')}[/green]" if self.ok else f"[red]{escape('[below budget]')}[/red]"
                console.print(f"fidelity {mark} {numbers} (budget {self.fidelity_budget})")

    def _print_structure(self, console: Console) -> None:
        if not self.structure and not self.skipped_cuts and self.flops_before is None:
            return
        if self.structure:
            table = Table(title="structured compression", title_justify="left")
            table.add_column("layer")
            table.add_column("removed")
            for layer, items in self.structure.items():
                table.add_row(escape(layer), escape("; ".join(items)))
            console.print(table)
        if self.flops_before is not None and self.flops_after is not None:
            console.print(f"FLOPs (one 128-token sequence): {self.flops_before / 1e9:.3f} G -> "
                          f"{self.flops_after / 1e9:.3f} G ({self.flops_after / max(self.flops_before, 1):.0%})")
        if self.params_before_structure is not None and self.params_after_structure is not None:
            console.print(f"parameters: {self.params_before_structure:,} -> {self.params_after_structure:,} "
                          f"({self.params_after_structure / max(self.params_before_structure, 1):.0%})")
        for what, why in self.skipped_cuts.items():
            console.print(escape(f"  not cut: {what}: {why}"))


def _fmt(v, spec: str = ".5f") -> str:
    return "-" if v is None else format(v, spec)


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}
