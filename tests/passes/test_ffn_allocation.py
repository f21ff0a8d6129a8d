"""ffn_allocation: per-FFN widths from the measured cost of each cut (knapsack over the FFNs)."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, calibration, context, inputs

from slimformer.compiler import frontend
from slimformer.compiler.blocks import find_ffns
from slimformer.compiler.numerics import run_batches
from slimformer.passes.ffn_allocation import candidate_widths, kept_width, knapsack, measured_widths
from slimformer.passes.prune_ffn import PruneFfn
from slimformer.passes.prune_obs import input_hessian


def test_knapsack_takes_the_cheapest_widths_within_budget():
    costs = [{2: 5.0, 4: 1.0, 6: 0.0}, {2: 0.1, 4: 0.05, 6: 0.0}]
    assert knapsack(costs, 8) == [6, 2]  # 0.1, against 1.05 for the uniform (4, 4)
    assert knapsack(costs, 12) == [6, 6]
    with pytest.raises(ValueError, match="budget of 3"):
        knapsack(costs, 3)


def test_candidates_surround_the_global_share():
    assert kept_width(1536, 0.4, 8, 8) == 928
    assert candidate_widths(1536, 0.4, 8, 8) == [616, 768, 928, 1080, 1232]
    assert candidate_widths(64, 0.1, 8, 8) == [48, 56, 64]  # shares below 0 clip to no cut


def bert_with_a_quiet_first_ffn():
    """Tiny BERT whose first FFN barely reaches the residual stream: cutting it is cheap."""
    model = FAMILIES["bert"].build()
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.mul_(0.01)
    return model


def test_measured_allocation_cuts_the_cheap_ffn_deeper():
    model = bert_with_a_quiet_first_ffn()
    gm = frontend.export(model, inputs(model))
    result = PruneFfn(fraction=0.25, multiple_of=1, min_keep=1).run(gm, context(model, calibration(model)))
    removed = {k: len(v) for k, v in result.details["removed_neurons"].items()}
    assert removed["encoder.layer.0"] > removed["encoder.layer.1"]
    assert result.summary.endswith("widths by measured cost")
    assert sum(removed.values()) >= 2 * int(0.25 * find_ffns(gm)[0].width)  # no less than uniform


def test_measuring_leaves_the_graph_as_it_was():
    model = bert_with_a_quiet_first_ffn()
    gm = frontend.export(model, inputs(model))
    batches = calibration(model)
    before = run_batches(gm, batches)
    sites = find_ffns(gm)
    hessians = [input_hessian(gm, [s.down.x], batches, s.width)[0] for s in sites]
    widths, costs = measured_widths(gm, [s.down for s in sites], hessians, [[16, 64, 128]] * 2, [64, 64],
                                    batches, before, budget=128, damp=0.1)  # FFNs 128 wide
    after = run_batches(gm, batches)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(before, after))
    assert sum(widths) <= 128 and costs[0][64] < costs[1][64]
    assert costs[1][16] > costs[1][64] > costs[1][128] == 0  # a deeper cut costs more


def test_an_ffn_too_small_to_cut_keeps_its_width():
    model = FAMILIES["bert"].build()
    gm = frontend.export(model, inputs(model))
    result = PruneFfn(fraction=0.01, multiple_of=64, min_keep=1).run(gm, context(model, calibration(model)))
    assert not result.modified and "too small" in result.summary  # 128 wide: every share rounds to 128


def test_allocation_must_suit_the_method():
    model = FAMILIES["bert"].build()
    gm = frontend.export(model, inputs(model))
    with pytest.raises(ValueError, match="prune_ffn: allocation 'measured' does not go with method 'fisher'"):
        PruneFfn(method="fisher", allocation="measured").run(gm, context(model, calibration(model)))
