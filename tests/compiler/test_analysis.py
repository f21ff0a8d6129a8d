"""Analyses: linear sites and attention blocks (form, heads, GQA groups, q/k/v/o) per family."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from models import FAMILIES, FAMILY_NAMES, HEADS, HIDDEN, exported, linear_calls

from slimformer.compiler import analysis

pytestmark = pytest.mark.usefixtures("reference_kernels")

# Layer 0's attention block per family: (block path, q, k, v, o) module paths.
LAYER0 = {
    "bert": ("encoder.layer.0.attention.self", "encoder.layer.0.attention.self.query",
             "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
             "encoder.layer.0.attention.output.dense"),
    "roberta": ("encoder.layer.0.attention.self", "encoder.layer.0.attention.self.query",
                "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
                "encoder.layer.0.attention.output.dense"),
    "xlm_roberta": ("encoder.layer.0.attention.self", "encoder.layer.0.attention.self.query",
                    "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
                    "encoder.layer.0.attention.output.dense"),
    "electra": ("encoder.layer.0.attention.self", "encoder.layer.0.attention.self.query",
                "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
                "encoder.layer.0.attention.output.dense"),
    "distilbert": ("transformer.layer.0.attention", "transformer.layer.0.attention.q_lin",
                   "transformer.layer.0.attention.k_lin", "transformer.layer.0.attention.v_lin",
                   "transformer.layer.0.attention.out_lin"),
    "albert": ("encoder.albert_layer_groups.0.albert_layers.0.attention",
               *(f"encoder.albert_layer_groups.0.albert_layers.0.attention.{p}"
                 for p in ("query", "key", "value", "dense"))),
    "mpnet": ("encoder.layer.0.attention.attn", *(f"encoder.layer.0.attention.attn.{p}" for p in "qkvo")),
    "deberta_v2": ("encoder.layer.0.attention.self", "encoder.layer.0.attention.self.query_proj",
                   "encoder.layer.0.attention.self.key_proj", "encoder.layer.0.attention.self.value_proj",
                   "encoder.layer.0.attention.output.dense"),
    "t5_encoder": ("encoder.block.0.layer.0.SelfAttention",
                   *(f"encoder.block.0.layer.0.SelfAttention.{p}" for p in "qkvo")),
    "gpt2": ("h.0.attn", None, None, None, "h.0.attn.c_proj"),  # q/k/v: one fused c_attn
    "llama_gqa": ("layers.0.self_attn", *(f"layers.0.self_attn.{p}_proj" for p in "qkvo")),
    "bart": ("encoder.layers.0.self_attn", *(f"encoder.layers.0.self_attn.{p}_proj" for p in "qkv"),
             "encoder.layers.0.self_attn.out_proj"),
}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_linear_sites_match_linear_modules_called(name):
    model, example, gm = exported(name)
    sites = analysis.find_linears(gm)
    calls = linear_calls(model, example)  # one entry per nn.Linear / Conv1D call
    assert len(sites) == len(calls)
    assert Counter(s.path for s in sites) == Counter(calls)
    modules = dict(model.named_modules())
    for s in sites:
        w = s.weight(gm)
        mod = modules[s.path]
        expect = mod.weight if isinstance(mod, torch.nn.Linear) else mod.weight.t()  # Conv1D: (in, out)
        assert torch.equal(w, expect.detach()), s.path  # (out, in) as nn.Linear
        assert (s.out_features, s.in_features) == tuple(w.shape)
        if mod.bias is None:
            assert s.bias(gm) is None
        else:
            assert torch.equal(s.bias(gm), mod.bias.detach())
    kinds = {s.kind for s in sites}
    assert kinds == ({"addmm"} if name == "gpt2" else {"linear"})


def test_linear_module_path_format():
    _, _, gm = exported("bert")
    assert analysis.find_linears(gm)[0].path == "encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_attention_sites(name):
    fam = FAMILIES[name]
    _, _, gm = exported(name)
    sites = analysis.find_attention(gm)
    assert len(sites) == fam.n_attention
    for a in sites:
        assert a.form == fam.attention_form
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (fam.num_heads, fam.num_kv_heads, fam.head_dim)
        assert a.gqa_groups == fam.num_heads // fam.num_kv_heads
        assert a.o is not None
        if fam.qkv_fused:
            assert a.q is a.k is a.v is None
            assert a.extra["fused_qkv"].path.endswith("attn.c_attn")
        else:
            assert None not in (a.q, a.k, a.v)
            assert len({a.q.path, a.k.path, a.v.path, a.o.path}) == 4
            assert a.q.out_features == a.num_heads * a.head_dim
            assert a.k.out_features == a.v.out_features == a.num_kv_heads * a.head_dim
    block, q, k, v, o = LAYER0[name]
    first = sites[0]
    assert first.path == block
    assert [p and p.path for p in (first.q, first.k, first.v, first.o)] == [q, k, v, o]


def test_llama_grouped_query_attention():
    _, _, gm = exported("llama_gqa")
    a = analysis.find_attention(gm)[0]
    assert (a.num_heads, a.num_kv_heads, a.gqa_groups) == (HEADS, 2, 2)
    assert a.k.out_features == a.v.out_features == HIDDEN // 2


def test_explicit_form_records_softmax_and_scores():
    for name in ("mpnet", "deberta_v2"):
        _, _, gm = exported(name)
        for a in analysis.find_attention(gm):
            assert a.extra["softmax"].target in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)
            assert a.extra["qk"].target in (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)
            assert a.node.target in (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)


def test_albert_shared_layer_sites_share_weights():
    _, _, gm = exported("albert")
    sites = analysis.find_linears(gm)
    by_path = {}
    for s in sites:
        by_path.setdefault(s.path, set()).add(s.weight_node.target)
    shared = [p for p in by_path if Counter(s.path for s in sites)[p] == 2]
    assert len(shared) == 6  # q, k, v, dense, ffn, ffn_output, each called twice
    assert all(len(by_path[p]) == 1 for p in shared)  # one weight node read by both calls


def test_analyses_are_cached_and_invalidated():
    _, _, gm = exported("bert")
    first = analysis.find_linears(gm)
    assert analysis.find_linears(gm) is first
    att = analysis.find_attention(gm)
    assert analysis.find_attention(gm) is att
    analysis.invalidate(gm)
    again = analysis.find_linears(gm)
    assert again is not first and [s.path for s in again] == [s.path for s in first]


def test_matmul_against_constant_is_a_linear_site():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 5))

        def forward(self, input_ids):
            return torch.matmul(input_ids.float(), self.w)

    from slimformer.compiler import frontend

    gm = frontend.export(M(), {"input_ids": torch.zeros(2, 3, 8)})
    (site,) = analysis.find_linears(gm)
    assert site.kind == "matmul"
    assert site.weight(gm).shape == (5, 8) and site.out_features == 5 and site.in_features == 8
