"""prune_ffn: neurons physically removed (up rows, SwiGLU's gate rows, down columns), and the
pruned graph computes what the eager model computes with those neurons masked."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, calibration, context, exported, fresh_copy, inputs
from transformers.pytorch_utils import Conv1D

from slimformer.compiler import analysis, frontend
from slimformer.compiler.analysis import get_attr_tensor
from slimformer.compiler.blocks import find_ffns
from slimformer.compiler.numerics import compare, run_batches
from slimformer.passes.prune_ffn import PruneFfn
from slimformer.passes.prune_importance import round_keep
from slimformer.passes.prune_obs import obs_path, obs_select


def prune(family: str, fraction: float, model=None, allocation: str = "uniform", method: str = "fisher"):
    if model is None:
        model, _, gm0 = exported(family)
        gm = fresh_copy(gm0)
    else:
        gm = frontend.export(model, inputs(model))
    ctx = context(model, calibration(model))
    result = PruneFfn(fraction=fraction, multiple_of=1, min_keep=1, allocation=allocation,
                      method=method).run(gm, ctx)
    analysis.invalidate(gm)
    gm.recompile()
    return gm, result


def mask_down_columns(model, removed: dict[str, list[int]], gm) -> None:
    downs = {s.path: s.down.path for s in find_ffns(gm)}
    with torch.no_grad():
        for path, cols in removed.items():
            down = model.get_submodule(downs[path])
            if isinstance(down, Conv1D):  # (in, out)
                down.weight[cols, :] = 0
            else:
                down.weight[:, cols] = 0


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama_gqa", "t5_encoder", "albert"])
def test_pruned_ffn_equals_masked_eager_model(family):
    gm, result = prune(family, 0.5)
    removed = result.details["removed_neurons"]
    assert removed
    for site in find_ffns(gm):
        width = 128 - len(removed[site.path])
        assert site.width == width
        for up in site.ups:  # SwiGLU: gate and up both lose the rows
            assert up.out_features == width
    ref = FAMILIES[family].build()
    mask_down_columns(ref, removed, exported(family)[2])
    ev = inputs(ref, batch=2, seq=7, seed=3)
    with torch.no_grad():
        want, got, full = ref(**ev)[0], gm(**ev)[0], exported(family)[0](**ev)[0]
    err = (got - want).abs().max().item()
    assert err < 1e-4, err
    assert (full - want).abs().max().item() > 10 * err


def test_albert_shared_ffn_weights_cut_once():
    gm, result = prune("albert", 0.5)
    sites = find_ffns(gm)
    assert len(sites) == 2 and sites[0].down.weight_node.target == sites[1].down.weight_node.target
    assert get_attr_tensor(gm, sites[0].down.weight_node).shape == (64, 64)


def test_dead_neurons_go_first():
    model = FAMILIES["bert"].build()
    dead = list(range(0, 128, 4))  # 32 neurons of layer 0 whose output is never read
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight[:, dead] = 0
    _, result = prune("bert", 32 / 256, model, allocation="global")
    assert result.details["removed_neurons"] == {"encoder.layer.0": dead}


def test_uniform_allocation_cuts_every_layer_alike():
    _, result = prune("bert", 0.25)
    assert [len(v) for v in result.details["removed_neurons"].values()] == [32, 32]


def test_round_keep_adds_back_the_best_removed():
    score = torch.tensor([5.0, 0.1, 3.0, 0.2, 0.3, 4.0, 0.0, 1.0])
    keep = round_keep(torch.tensor([0, 2, 5]), score, 8, 4)
    assert keep.tolist() == [0, 2, 5, 7]  # neuron 7 (1.0) is the best of the removed


def test_obs_select_removes_redundant_columns_without_loss():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 6, generator=g, dtype=torch.float64)
    x = torch.cat([base, base[:, :2] @ torch.randn(2, 2, generator=g, dtype=torch.float64)], 1)  # 2 redundant
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    kept, w2 = obs_select(x.T @ x, w, 6, damp=1e-10)
    assert len(kept) == 6 and set(range(2, 6)) <= set(kept.tolist())  # the independent ones stay
    assert torch.allclose(x @ w2.double().T, x @ w.T, atol=1e-4)  # the others absorbed the loss
    assert (w2[:, [j for j in range(8) if j not in kept.tolist()]] == 0).all()


def test_obs_path_snapshots_equal_separate_selections():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64)
    w = torch.randn(4, 12, generator=g, dtype=torch.float64)
    path = obs_path(x.T @ x, w, [9, 5, 12], rounds=100)  # one column a step, as below
    for n in (9, 5):
        kept, w_n = obs_select(x.T @ x, w, n, rounds=100)
        assert torch.equal(path[n][0], kept) and torch.allclose(path[n][1], w_n)
    assert path[12][0].tolist() == list(range(12)) and torch.allclose(path[12][1], w.float())


@pytest.mark.parametrize("family", ["bert", "gpt2", "albert"])
def test_obs_pruning_beats_fisher_on_calibration(family):
    def cos(method):
        model, _, gm0 = exported(family)
        gm = fresh_copy(gm0)
        ctx = context(model, calibration(model))
        PruneFfn(fraction=0.5, multiple_of=1, min_keep=1, method=method).run(gm, ctx)
        gm.recompile()
        return compare(ctx.reference, run_batches(gm, ctx.calibration), ctx.calibration).cos_mean

    assert cos("obs") > cos("fisher")
