"""prune_heads: heads physically removed, and the pruned graph computes exactly what the eager
model computes with the same heads masked (their output-projection columns zeroed)."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, calibration, context, exported, fresh_copy, inputs
from transformers.pytorch_utils import Conv1D

from slimformer.compiler import analysis, frontend
from slimformer.compiler.analysis import get_attr_tensor
from slimformer.errors import SlimformerError
from slimformer.passes.prune_heads import PruneHeads, head_rows
from slimformer.passes.prune_importance import select_global


def masked_model(family: str, removed: dict[str, list[int]], head_dim: int) -> torch.nn.Module:
    """The eager model with the removed heads' output-projection columns zeroed."""
    model = FAMILIES[family].build()
    _, _, gm = exported(family)
    o_paths = {a.path: a.o.path for a in analysis.find_attention(gm)}
    with torch.no_grad():
        for site_path, heads in removed.items():
            proj = model.get_submodule(o_paths[site_path])
            cols = head_rows(torch.tensor(heads), head_dim)
            if isinstance(proj, Conv1D):  # GPT-2: weight is (in, out)
                proj.weight[cols, :] = 0
            else:
                proj.weight[:, cols] = 0
    return model


def prune(family: str, fraction: float, allocation: str = "global"):
    model, _, gm0 = exported(family)
    gm = fresh_copy(gm0)
    ctx = context(model, calibration(model))
    result = PruneHeads(fraction=fraction, allocation=allocation).run(gm, ctx)
    analysis.invalidate(gm)
    gm.recompile()
    return gm, result, ctx


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama_gqa", "t5_encoder", "deberta_v2", "mpnet", "albert"])
def test_pruned_graph_equals_masked_eager_model(family):
    fam = FAMILIES[family]
    gm, result, _ = prune(family, 0.5)
    assert result.modified
    removed = result.details["removed_heads"]
    assert removed
    sites = analysis.find_attention(gm)
    before = {a.path: a for a in analysis.find_attention(exported(family)[2])}
    for site in sites:  # the head counts the analysis reads off the new graph shrank as reported
        gone = len(removed.get(site.path, []))
        assert site.num_heads == before[site.path].num_heads - gone
        assert site.o.in_features == site.num_heads * fam.head_dim
    # Another batch and sequence length than the trace: batch/seq stay symbolic after the cut.
    ev = inputs(exported(family)[0], batch=2, seq=9, seed=7)
    ref_model = masked_model(family, removed, fam.head_dim)
    with torch.no_grad():
        want = ref_model(**ev)[0]
        full = exported(family)[0](**ev)[0]
        got = gm(**ev)[0]
    err = (got - want).abs().max().item()
    assert err < 1e-4, err
    assert (full - want).abs().max().item() > 10 * err  # the masked heads mattered


def test_gqa_prunes_whole_kv_groups():
    gm, result, _ = prune("llama_gqa", 0.5)
    for heads in result.details["removed_heads"].values():
        assert len(heads) == 2 and heads[0] // 2 == heads[1] // 2  # both query heads of one group
    for site in analysis.find_attention(gm):
        assert (site.num_heads, site.num_kv_heads) == (2, 1)
        assert get_attr_tensor(gm, site.k.weight_node).shape[0] == 16  # one KV head of 16 dims


def test_fused_qkv_is_cut_per_segment():
    gm, result, _ = prune("gpt2", 0.5)
    for site in analysis.find_attention(gm):
        fused = site.extra["fused_qkv"]
        assert get_attr_tensor(gm, fused.weight_node).shape[1] == 3 * site.num_heads * 16


def test_albert_shared_layer_cut_once_for_every_call():
    gm, result, _ = prune("albert", 0.5)
    sites = analysis.find_attention(gm)
    assert len(sites) == 2 and sites[0].q.weight_node.target == sites[1].q.weight_node.target
    assert sites[0].num_heads == sites[1].num_heads == 2
    assert get_attr_tensor(gm, sites[0].q.weight_node).shape == (32, 64)
    assert "shared by 2 calls" in next(iter(result.details["per_layer"].values()))


def test_dead_head_has_no_importance_and_goes_first():
    model = FAMILIES["bert"].build()
    with torch.no_grad():
        dense = model.encoder.layer[1].attention.output.dense
        dense.weight[:, 2 * 16:3 * 16] = 0  # head 2 of layer 1 writes nothing
    gm = frontend.export(model, inputs(model))
    ctx = context(model, calibration(model))
    result = PruneHeads(fraction=0.125).run(gm, ctx)  # one head of 8
    assert result.details["removed_heads"] == {"encoder.layer.1.attention.self": [2]}


def test_no_attention_is_an_error():
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    model = Mlp().eval()
    gm = frontend.export(model, {"x": torch.randn(2, 4, 8)})
    ctx = context(model, [{"x": torch.randn(2, 4, 8)}])
    with pytest.raises(SlimformerError, match="no attention"):
        PruneHeads(fraction=0.25).run(gm, ctx)


def test_global_selection_keeps_one_per_group_and_counts_group_cost():
    scores = [torch.tensor([0.1, 0.2, 5.0]), torch.tensor([0.01, 0.02])]
    keep = select_global(scores, 0.8)
    assert [k.tolist() for k in keep] == [[2], [1]]  # budget 4 of 5, but one unit stays per group
    keep = select_global(scores, 0.5, unit_cost=[1, 2])  # group 1's units cost 2 heads each
    assert [k.tolist() for k in keep] == [[1, 2], [1]]  # budget 3 of 7: 2 + 1


def test_uniform_allocation_cuts_every_layer_alike():
    _, result, _ = prune("bert", 0.5, allocation="uniform")
    removed = result.details["removed_heads"]
    assert len(removed) == 2 and all(len(v) == 2 for v in removed.values())  # 2 of 4 heads each
