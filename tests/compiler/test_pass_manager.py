"""Pass manager: verification after every change, errors naming the pass, the report, JSON
pipelines, --dump-ir."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from models import calibration, context, exported, fresh_copy

from slimformer import SlimformerError
from slimformer.compiler import analysis
from slimformer.compiler.cpu_targets import cpu_int8_pipeline
from slimformer.compiler.graph_utils import set_attr_tensor
from slimformer.compiler.pass_manager import (
    PASSES,
    Pass,
    PassManager,
    PassResult,
    pipeline_from_json,
)
from slimformer.errors import PassError

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture
def graph():
    """A fresh copy of the traced tiny BERT and a context on 2 calibration batches."""
    model, _, gm = exported("bert")
    return fresh_copy(gm), context(model, calibration(model, n=2))


@dataclass
class ScaleWeight(Pass):
    """Multiplies the first linear's weight by `factor` (1.0: a change that changes nothing)."""

    name = "scale_weight"
    factor: float = 1.0

    def run(self, gm, ctx):
        site = analysis.find_linears(gm)[0]
        set_attr_tensor(gm, site.weight_node.target, site.weight(gm) * self.factor)
        return PassResult(gm, True, f"scaled by {self.factor}", {"path": site.path})


class Noop(Pass):
    name = "noop"

    def run(self, gm, ctx):
        return PassResult(gm, False, "nothing to do")


class WrongShape(Pass):
    """Swaps the first linear's weight for one of the wrong shape: the graph fails to run."""

    name = "wrong_shape"

    def run(self, gm, ctx):
        site = analysis.find_linears(gm)[0]
        set_attr_tensor(gm, site.weight_node.target, torch.zeros(3, 5))
        return PassResult(gm, True, "broke it")


class UseBeforeDef(Pass):
    """Makes the first linear read a node defined after it: the graph no longer lints."""

    name = "use_before_def"

    def run(self, gm, ctx):
        site = analysis.find_linears(gm)[0]
        later = analysis.find_linears(gm)[1].node
        site.node.args = (later, *site.node.args[1:])
        return PassResult(gm, True, "reordered")


class Crash(Pass):
    name = "crash"

    def run(self, gm, ctx):
        raise ValueError("boom")


class Raises(Pass):
    name = "raises_user_error"

    def run(self, gm, ctx):
        raise SlimformerError("a user-facing problem", "do something else")


def test_broken_graph_names_the_pass(graph):
    gm, ctx = graph
    with pytest.raises(PassError) as info:
        PassManager([Noop(), WrongShape(), ScaleWeight()]).run(gm, ctx)
    assert info.value.pass_name == "wrong_shape"
    assert "pass 'wrong_shape' failed" in str(info.value)
    assert "fails to run" in str(info.value)
    assert [p.name for p in ctx.report.passes] == ["noop"]  # nothing after the failure ran


def test_unlintable_graph_names_the_pass(graph):
    gm, ctx = graph
    with pytest.raises(PassError) as info:
        PassManager([UseBeforeDef()]).run(gm, ctx)
    assert info.value.pass_name == "use_before_def"
    assert "no longer verifies" in str(info.value)


def test_nan_output_is_caught(graph):
    gm, ctx = graph
    with pytest.raises(PassError, match="NaN") as info:
        PassManager([ScaleWeight(float("nan"))]).run(gm, ctx)
    assert info.value.pass_name == "scale_weight"


def test_exception_in_pass_is_wrapped_with_its_name(graph):
    gm, ctx = graph
    with pytest.raises(PassError, match=r"pass 'crash' failed: ValueError: boom") as info:
        PassManager([Crash()]).run(gm, ctx)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(SlimformerError, match="a user-facing problem") as info:  # passed through
        PassManager([Raises()]).run(gm, ctx)
    assert not isinstance(info.value, PassError)


def test_report_records_each_pass(graph):
    gm, ctx = graph
    out = PassManager([Noop(), ScaleWeight(1.0), ScaleWeight(1.01)]).run(gm, ctx)
    assert isinstance(out, torch.fx.GraphModule)
    recs = ctx.report.passes
    assert [(r.name, r.modified) for r in recs] == [("noop", False), ("scale_weight", True),
                                                    ("scale_weight", True)]
    assert recs[0].fidelity is None and recs[0].summary == "nothing to do"
    assert recs[1].fidelity["cos_min"] > 0.999999 and recs[1].fidelity["max_abs"] < 1e-5
    assert recs[2].fidelity["max_abs"] > recs[1].fidelity["max_abs"]
    assert recs[1].details == {"path": "encoder.layer.0.attention.self.query"}
    assert all(r.seconds >= 0 for r in recs)
    assert json.loads(ctx.report.to_json())["passes"][1]["name"] == "scale_weight"


def test_pipeline_json_round_trip():
    pipeline = cpu_int8_pipeline({"smooth_alpha": 0.5, "gptq": False})
    configs = [p.config() for p in pipeline]
    assert [c["pass"] for c in configs] == ["smooth", "quantize_int8", "quantize_embeddings"]
    assert configs[0]["alpha"] == 0.5 and configs[1]["gptq"] is False
    text = json.dumps(configs)
    again = pipeline_from_json(json.loads(text))
    assert [type(p) for p in again] == [type(p) for p in pipeline]
    assert [p.config() for p in again] == configs
    assert all(name in PASSES for name in ("smooth", "quantize_int8", "quantize_embeddings"))


def test_unknown_pass_in_json_lists_known_ones():
    with pytest.raises(SlimformerError, match="unknown pass 'nope'") as info:
        pipeline_from_json([{"pass": "nope"}])
    assert "quantize_int8" in info.value.hint


def test_dump_ir_writes_graph_after_each_changing_pass(graph, tmp_path):
    gm, ctx = graph
    dump = tmp_path / "ir"
    PassManager([Noop(), ScaleWeight(1.0)], dump_ir=dump).run(gm, ctx)
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["00_input.txt", "02_scale_weight.txt"]
    text = (dump / "02_scale_weight.txt").read_text()
    assert "aten.linear" in text and "def forward" in text


@dataclass
class StructuralScale(Pass):
    """A stand-in for a pruning pass: it changes what the model computes, on purpose."""

    name = "structural_scale"
    rebases_reference = True
    factor: float = 5.0

    def run(self, gm, ctx):
        site = next(s for s in analysis.find_linears(gm) if "intermediate" in s.path)
        set_attr_tensor(gm, site.weight_node.target, site.weight(gm) * self.factor)
        return PassResult(gm, True, f"scaled {site.path}")


class MeasureOnly(Pass):
    """Records the fidelity a later pass sees (its budget's reference) and changes nothing."""

    name = "measure_only"
    seen: list = []

    def run(self, gm, ctx):
        MeasureOnly.seen.append(ctx.fidelity(gm).cos_min)
        return PassResult(gm, False, "measured")


def test_structural_pass_rebases_the_budget_reference_not_the_report(graph):
    gm, ctx = graph
    MeasureOnly.seen = []
    PassManager([StructuralScale(), MeasureOnly(), ScaleWeight(factor=1.0)]).run(gm, ctx)
    assert MeasureOnly.seen[0] > 0.99999  # later passes compare with the rebased graph ...
    structural, _, unchanged = ctx.report.passes
    assert structural.fidelity["cos_min"] < 0.999  # ... the report with the original model
    assert unchanged.fidelity["cos_min"] == pytest.approx(structural.fidelity["cos_min"], abs=1e-6)


def test_after_structural_passes_the_budget_allows_a_small_share_of_the_structural_error(graph):
    """Without structural passes: the budget alone. After them: a candidate that misses the
    budget against the compressed graph still passes while its error to the original stays
    within STRUCTURAL_SLACK of the structural error."""
    from slimformer.compiler.numerics import compare, run_batches
    from slimformer.compiler.pass_manager import STRUCTURAL_SLACK

    gm, ctx = graph
    site = next(s for s in analysis.find_linears(gm) if "output.dense" in s.path and "attention" not in s.path)

    def with_noise(w, scale: float):
        g = torch.Generator().manual_seed(0)
        set_attr_tensor(gm, site.weight_node.target, w + scale * w.std() * torch.randn(w.shape, generator=g))
        gm.recompile()

    w = site.weight(gm).clone()
    with_noise(w, 10.0)
    assert ctx.fidelity(gm).cos_min < ctx.fidelity_budget
    assert not ctx.within_budget(gm) and ctx.structural_error is None  # the plain budget
    with_noise(w, 0.0)
    PassManager([StructuralScale(factor=30.0)]).run(gm, ctx)
    assert ctx.structural_error > 1 - ctx.fidelity_budget
    w = site.weight(gm).clone()
    outcomes = set()
    for scale in (0.0, 0.03, 0.06, 0.12, 0.25, 0.5, 1.0):
        with_noise(w, scale)
        to_compressed = ctx.fidelity(gm).cos_min
        to_original = compare(ctx.original_reference, run_batches(gm, ctx.calibration), ctx.calibration).cos_min
        by_slack = 1 - to_original <= ctx.structural_error * (1 + STRUCTURAL_SLACK)
        assert ctx.within_budget(gm) == (to_compressed >= ctx.fidelity_budget or by_slack)
        outcomes.add((to_compressed >= ctx.fidelity_budget, by_slack))
    assert (False, True) in outcomes and (False, False) in outcomes, outcomes  # the slack decided both ways
