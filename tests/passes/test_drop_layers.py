"""drop_layers: by index the graph equals the eager model without those layers; by importance
an identity layer goes first; bad specs and drops that leave no layer are errors."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, calibration, context, exported, fresh_copy, inputs

from slimformer.compiler import analysis, frontend
from slimformer.compiler.blocks import find_blocks
from slimformer.errors import SlimformerError
from slimformer.passes.drop_layers import DropLayers, parse_drop_spec


def run(gm, model, **options):
    result = DropLayers(**options).run(gm, context(model, calibration(model)))
    analysis.invalidate(gm)
    gm.recompile()
    return result


@pytest.mark.parametrize("family, layers", [("bert", "encoder.layer"), ("llama_gqa", "layers"),
                                            ("t5_encoder", "encoder.block")])
def test_drop_by_index_equals_eager_model_without_the_layer(family, layers):
    model, _, gm0 = exported(family)
    gm = fresh_copy(gm0)
    drop = 0  # T5: layer 0 computes the position bias the other layers read; it must survive
    result = run(gm, model, indices=[drop])
    assert result.details["dropped"] == [drop]
    assert len(find_blocks(gm)) == 1 and len(analysis.find_attention(gm)) == 1
    ref = FAMILIES[family].build()
    *path, leaf = layers.split(".")
    owner = ref.get_submodule(".".join(path)) if path else ref
    kept = [m for i, m in enumerate(getattr(owner, leaf)) if i != drop]
    if family == "t5_encoder":  # T5's first block owns the relative bias table
        kept[0].layer[0].SelfAttention.has_relative_attention_bias = True
        kept[0].layer[0].SelfAttention.relative_attention_bias = getattr(owner, leaf)[0].layer[0].SelfAttention.relative_attention_bias
    setattr(owner, leaf, torch.nn.ModuleList(kept))
    ev = inputs(ref, batch=2, seq=10, seed=4)
    with torch.no_grad():
        want, got = ref(**ev)[0], gm(**ev)[0]
    assert (got - want).abs().max().item() < 1e-4


def test_identity_layer_is_the_least_important():
    model = FAMILIES["llama_gqa"].build()
    with torch.no_grad():  # pre-norm residual: layer 1 adds zero, it is the identity
        model.layers[1].self_attn.o_proj.weight.zero_()
        model.layers[1].mlp.down_proj.weight.zero_()
    gm = frontend.export(model, inputs(model))
    result = run(gm, model, count=1)
    assert result.details["dropped"] == [1]
    assert result.details["costs"][1] < 1e-6 < result.details["costs"][0]


def test_a_drop_that_leaves_no_layer_is_an_error():
    model, _, gm0 = exported("bert")
    with pytest.raises(SlimformerError, match="would leave none"):
        run(fresh_copy(gm0), model, count=2)
    with pytest.raises(SlimformerError, match="would leave none"):
        run(fresh_copy(gm0), model, indices=[0, 1])
    with pytest.raises(SlimformerError, match="out of range"):
        run(fresh_copy(gm0), model, indices=[5])


@pytest.mark.parametrize("spec, want", [(2, (2, None)), ("3", (3, None)), ("1,0", (None, [0, 1])),
                                        ([4, 2], (None, [2, 4])), ("0", (0, None))])
def test_parse_drop_spec(spec, want):
    assert parse_drop_spec(spec) == want


@pytest.mark.parametrize("spec", ["a,b", "-1", "1,1", "", "x", -2, True, 1.5])
def test_bad_drop_spec_is_an_error(spec):
    with pytest.raises(SlimformerError, match="--drop-layers"):
        parse_drop_spec(spec)
