"""recover: the least-squares refit brings a pruned graph closer to the original; distillation
lowers its loss without touching the original model's weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from models import calibration, context, exported, fresh_copy, inputs

from slimformer.compiler import analysis
from slimformer.compiler.analysis import get_attr_tensor
from slimformer.compiler.graph_utils import capture
from slimformer.compiler.numerics import compare, run_batches
from slimformer.passes.distill import distill, lr_factor
from slimformer.passes.prune_ffn import PruneFfn
from slimformer.passes.prune_heads import PruneHeads
from slimformer.passes.prune_report import kept_inputs, original_graph
from slimformer.passes.recover import Recover, fit_batches, pruned_projections, ridge_lstsq


def pruned(family: str, heads: float = 0.5, ffn: float = 0.5):
    model, _, gm0 = exported(family)
    gm = fresh_copy(gm0)
    ctx = context(model, calibration(model, n=3))
    for p in (PruneHeads(fraction=heads), PruneFfn(fraction=ffn, multiple_of=1)):
        p.run(gm, ctx)
        analysis.invalidate(gm)
        gm.recompile()
        ctx.rebase_reference(gm)
    return model, gm, ctx


def cos_to_original(gm, ctx) -> float:
    return compare(ctx.original_reference, run_batches(gm, ctx.calibration), ctx.calibration).cos_mean


def test_ridge_lstsq_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64)
    sol = ridge_lstsq(x.T @ x, x.T @ (x @ w), 1e-8)
    assert torch.allclose(sol, w, atol=1e-5)


def test_least_squares_improves_cosine_to_the_original():
    _, gm, ctx = pruned("llama_gqa")
    before = cos_to_original(gm, ctx)
    groups = pruned_projections(gm, original_graph(ctx))
    assert len(groups) == 4  # two o_proj, two down_proj
    result = Recover(steps=0).run(gm, ctx)
    assert result.modified and "least squares" in result.summary
    after = cos_to_original(gm, ctx)
    assert after > before + 0.05, (before, after)


def test_shared_projection_refit_once_for_all_calls():
    _, gm, ctx = pruned("albert")
    groups = pruned_projections(gm, original_graph(ctx))
    assert all(len(calls) == 2 for calls in groups.values())  # ALBERT's one layer, called twice
    before = cos_to_original(gm, ctx)
    Recover(steps=0).run(gm, ctx)
    assert cos_to_original(gm, ctx) >= before
    sites = analysis.find_attention(gm)
    assert get_attr_tensor(gm, sites[0].o.weight_node) is get_attr_tensor(gm, sites[1].o.weight_node)


def projection_input(gm, name: str, batch: dict) -> torch.Tensor:
    x = next(s.x for s in analysis.find_linears(gm) if s.node.name == name)
    seen = []
    capture(gm, [x], [batch], lambda _n, t, _i: seen.append(t.detach().clone()))
    return seen[0]


@pytest.mark.parametrize("family,heads,ffn", [("bert", 0.5, 0.0), ("llama_gqa", 0.5, 0.0), ("bert", 0.0, 0.5)])
def test_kept_inputs_name_the_original_features_a_pruned_projection_still_reads(family, heads, ffn):
    _, gm, ctx = pruned(family, heads=heads, ffn=ffn)
    kept = kept_inputs(ctx)
    first = min(kept, key=lambda name: [n.name for n in gm.graph.nodes].index(name))
    batch = ctx.calibration[0]
    # the first cut block sees the original's input: its kept features are the original's, exactly
    mine, theirs = projection_input(gm, first, batch), projection_input(original_graph(ctx), first, batch)
    assert mine.shape[-1] == len(kept[first]) < theirs.shape[-1]
    assert torch.allclose(mine, theirs[..., kept[first]], atol=1e-5)


def test_distill_matches_inner_activations_and_leaves_the_original_graph_as_it_was():
    _, gm, ctx = pruned("bert")
    code = original_graph(ctx).code
    plain = distill(fresh_copy(gm), ctx, steps=2, lr=1e-4, check_every=0).losses
    inner = distill(fresh_copy(gm), ctx, steps=2, lr=1e-4, check_every=0, sublayer_weight=1.0).losses
    assert inner[0] > plain[0]  # same batch, same start: the inner terms add to the loss
    # the unpruned graph, which then serves the original's outputs, gives the model's targets
    faint = distill(fresh_copy(gm), ctx, steps=1, lr=1e-4, check_every=0, sublayer_weight=1e-9).losses
    assert abs(faint[0] - plain[0]) < 1e-4 * plain[0]
    assert original_graph(ctx).code == code


def test_distill_lowers_the_loss_and_leaves_the_original_alone():
    model, gm, ctx = pruned("gpt2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    losses = distill(gm, ctx, steps=8, lr=1e-3).losses
    assert len(losses) == 8
    assert min(losses[-3:]) < losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    assert not any(p.requires_grad for p in gm.parameters())


def with_validation(model, ctx, seed: int = 300):
    val = [inputs(model, batch=4, seq=16, seed=seed)]
    ctx.validation, ctx.validation_reference = val, run_batches(model, val)
    return val


def test_distill_keeps_the_parameters_the_held_out_check_scores_best():
    model, gm, ctx = pruned("bert")
    val = with_validation(model, ctx)
    before = run_batches(gm, val)
    result = distill(gm, ctx, steps=4, lr=1.0, check_every=1)  # a step this large wrecks the fit
    assert [s for s, _ in result.held_out] == [0, 1, 2, 3, 4]
    assert min(e for s, e in result.held_out if s) > result.held_out[0][1]
    assert result.kept_step == 0 and "kept step 0" in result.summary()
    assert torch.allclose(run_batches(gm, val)[0][0], before[0][0])


def test_distill_keeps_a_later_step_when_it_helps():
    model, gm, ctx = pruned("gpt2")
    with_validation(model, ctx, seed=100)  # the held-out batch is a training batch: it must improve
    result = distill(gm, ctx, steps=6, lr=3e-4, batches=ctx.calibration[:1], check_every=3)
    assert result.kept_step in (3, 6)
    assert dict(result.held_out)[result.kept_step] < dict(result.held_out)[0]


def test_distill_trains_on_the_training_batches():
    model, gm, ctx = pruned("bert")
    ctx.training = [inputs(model, batch=2, seq=24, seed=7)]
    seen = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        distill(gm, ctx, steps=2, lr=1e-4)
    finally:
        hook.remove()
    assert seen == [24]  # the training batch, run once by the original: kept for the second step


def test_least_squares_fits_on_the_training_batches():
    model, gm, ctx = pruned("bert")
    ctx.training = [inputs(model, batch=2, seq=24, seed=7, pad=False), inputs(model, batch=3, seq=10, seed=8, pad=False)]
    result = Recover(steps=0).run(gm, ctx)
    assert result.details["refit_tokens"] == 2 * 24 + 3 * 10  # not the calibration tokens


def test_fit_batches_spreads_a_token_budget_over_the_corpus():
    corpus = [{"input_ids": torch.full((2, 5), i), "attention_mask": torch.ones(2, 5)} for i in range(10)]
    ctx = SimpleNamespace(training=corpus, calibration=corpus[:1])
    assert fit_batches(ctx, 1000) == corpus
    picked = fit_batches(ctx, 30)  # 10 tokens a batch: 3 of them, from across the corpus
    assert [int(b["input_ids"][0, 0]) for b in picked] == [0, 3, 6]
    ctx.training = None
    assert fit_batches(ctx, 1000) == corpus[:1]


def test_lr_factor_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, 100) for s in range(100)]
    assert f[0] == 0.2 and f[4] == 1.0  # 5 warm-up steps
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert abs(f[-1] - 0.1) < 1e-3
    assert lr_factor(0, 1) == 1.0  # one step: no warm-up to speak of
