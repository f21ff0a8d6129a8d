"""Pass infrastructure: small pass objects, a manager that verifies after every change.

After each pass that changed the graph the manager lints it, recompiles it, runs it on the
calibration batches and compares against the original model's outputs; a broken graph or a
NaN stops compilation with an error that names the pass.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule

from slimformer.compiler import analysis
from slimformer.compiler.numerics import Fidelity, compare, run_batches
from slimformer.compiler.report import PassRecord, Report
from slimformer.errors import PassError, SlimformerError


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool
    summary: str = ""
    details: dict = field(default_factory=dict)


class Pass:
    """A graph rewrite. Subclasses are dataclasses: their fields are the pass's options."""

    name: str = "pass"
    requires: tuple[str, ...] = ()
    # Structural passes (pruning, attention replacement) set this: once they changed the graph,
    # later passes (quantization's fidelity budget) measure against the new graph's outputs,
    # while the report keeps measuring against the original model.
    rebases_reference: bool = False

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        raise NotImplementedError

    def config(self) -> dict:
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"pass": self.name, **fields}


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    PASSES[cls.name] = cls
    return cls


def pipeline_from_json(items: list[dict]) -> list[Pass]:
    out = []
    for item in items:
        item = dict(item)
        name = item.pop("pass")
        if name not in PASSES:
            raise SlimformerError(f"unknown pass '{name}'", f"known passes: {', '.join(sorted(PASSES))}")
        out.append(PASSES[name](**item))
    return out


# How much quantization may add to the error structural passes left (see within_budget).
STRUCTURAL_SLACK = 0.1


@dataclass
class CompileContext:
    """What every pass may read: calibration inputs and the original model's outputs on them."""

    original: torch.nn.Module
    calibration: list[dict]
    reference: list[list[torch.Tensor]]
    fidelity_budget: float = 0.995
    options: dict = field(default_factory=dict)
    progress: object | None = None  # a rich Progress, or None for quiet runs
    report: Report | None = None
    # The original model's outputs; `reference` moves to the structurally compressed graph's
    # outputs after a pass with rebases_reference (None: the same as reference).
    original_reference: list[list[torch.Tensor]] | None = None
    # 1 - min cosine of the structurally compressed graph to the original, set on rebasing.
    structural_error: float | None = None
    # Inputs that recovery (least squares, distillation) fits on instead of the calibration
    # batches, and held-out inputs with the original model's outputs on them, which no pass
    # trains on: a training step is kept only as far as these agree it helped. None: not given.
    training: list[dict] | None = None
    validation: list[dict] | None = None
    validation_reference: list[list[torch.Tensor]] | None = None

    def rebase_reference(self, gm) -> None:
        if self.original_reference is None:
            self.original_reference = self.reference
        with torch.no_grad():
            self.reference = run_batches(gm, self.calibration)
        self.structural_error = 1.0 - compare(self.original_reference, self.reference, self.calibration).cos_min

    def within_budget(self, fn, max_batches: int | None = None) -> bool:
        """The quantizers' test of a candidate: min cosine to the reference >= fidelity_budget.
        After structural passes (the reference is the compressed graph) it also passes if the
        error to the original model grows by at most STRUCTURAL_SLACK of what the structure
        cost: quantization error that is small beside the pruning error is not worth float
        layers (MiniLM heads 0.25 + FFN 0.4: 9 layers went to float compute otherwise)."""
        batches = self.calibration[:max_batches]
        outs = run_batches(fn, batches)
        if compare(self.reference[:max_batches], outs, batches).ok(self.fidelity_budget):
            return True
        if self.original_reference is None or self.structural_error is None:
            return False
        error = 1.0 - compare(self.original_reference[:max_batches], outs, batches).cos_min
        return error <= self.structural_error * (1.0 + STRUCTURAL_SLACK)

    def fidelity(self, fn, max_batches: int | None = None) -> Fidelity:
        """Fidelity of a callable (a GraphModule, or anything taking the model's kwargs),
        on the first `max_batches` calibration batches (all by default)."""
        batches = self.calibration[:max_batches]
        return compare(self.reference[:max_batches], run_batches(fn, batches), batches)


class PassManager:
    def __init__(self, passes: list[Pass], dump_ir: str | Path | None = None):
        self.passes = passes
        self.dump_ir = Path(dump_ir) if dump_ir else None

    def run(self, gm: GraphModule, ctx: CompileContext) -> GraphModule:
        if self.dump_ir:
            self.dump_ir.mkdir(parents=True, exist_ok=True)
            (self.dump_ir / "00_input.txt").write_text(gm.print_readable(print_output=False))
        for i, p in enumerate(self.passes, start=1):
            start = time.perf_counter()
            try:
                result = p.run(gm, ctx)
            except SlimformerError:
                raise
            except Exception as e:
                raise PassError(p.name, f"{type(e).__name__}: {e}") from e
            gm = result.graph_module
            fidelity = None
            if result.modified:
                analysis.invalidate(gm)
                fidelity = self._verify(p, gm, ctx)
                if p.rebases_reference:
                    ctx.rebase_reference(gm)
            record = PassRecord(p.name, result.modified, result.summary,
                                time.perf_counter() - start, fidelity and fidelity.as_dict(), result.details,
                                rebased_reference=bool(result.modified and p.rebases_reference))
            if ctx.report is not None:
                ctx.report.passes.append(record)
            if self.dump_ir and result.modified:
                (self.dump_ir / f"{i:02d}_{p.name}.txt").write_text(gm.print_readable(print_output=False))
        return gm

    def _verify(self, p: Pass, gm: GraphModule, ctx: CompileContext) -> Fidelity:
        try:
            gm.graph.lint()
            gm.graph.eliminate_dead_code()
            gm.recompile()
        except Exception as e:
            raise PassError(p.name, f"the graph no longer verifies: {e}") from e
        try:  # always against the original model, also after a structural pass
            original = ctx.original_reference or ctx.reference
            fid = compare(original, run_batches(gm, ctx.calibration), ctx.calibration)
        except Exception as e:
            raise PassError(p.name, f"the rewritten graph fails to run: {type(e).__name__}: {e}") from e
        if fid.cos_min != fid.cos_min:  # NaN
            raise PassError(p.name, "the rewritten graph produces NaN outputs")
        return fid
