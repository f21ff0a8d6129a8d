"""QuantizeInt4: linears -> slimformer::int4_linear in MatMulNBits packing (GPTQ, AWQ, RTN),
and QuantizeEmbeddingsInt4 (per-row int4 tables)."""

from __future__ import annotations

import pytest
import torch
from models import calibration, context, exported, fresh_copy, token_cosines

from slimformer.compiler import analysis
from slimformer.errors import SlimformerError
from slimformer.kernels import naive
from slimformer.kernels.packing import dequantize_rows_int4, quantize_rows_int4
from slimformer.passes.quantize_int4 import (
    QuantizeEmbeddingsInt4,
    QuantizeInt4,
    int4_embedding,
    real_tokens,
)

pytestmark = pytest.mark.usefixtures("reference_kernels")
INT4_LINEAR = torch.ops.slimformer.int4_linear.default
aten = torch.ops.aten


def quantized(family: str, **opts):
    """(model, calibration, original float graph, quantized graph, PassResult)."""
    if opts.get("method") == "awq":
        opts.setdefault("awq_tokens", 256)  # the scale search's cost grows with the tokens
    model, _, traced = exported(family)
    calib = calibration(model, n=2)
    float_gm = fresh_copy(traced)
    gm = fresh_copy(traced)
    result = QuantizeInt4(**opts).run(gm, context(model, calib))
    analysis.invalidate(gm)  # as the pass manager does after a pass
    gm.graph.lint()
    gm.recompile()
    return model, calib, float_gm, gm, result


def min_cos(model, gm, batches) -> float:
    out = []
    for b in batches:
        with torch.no_grad():
            ref, got = model(**b).last_hidden_state, gm(**b).last_hidden_state
        out.append(token_cosines(ref, got, b["attention_mask"]).min().item())
    return min(out)


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_every_linear_becomes_int4_linear(method):
    model, calib, float_gm, gm, result = quantized("bert", method=method)
    n_linears = len(analysis.find_linears(float_gm))
    nodes = [n for n in gm.graph.nodes if n.target == INT4_LINEAR]
    assert result.modified and len(nodes) == n_linears == 12
    assert not analysis.find_linears(gm)
    for n in nodes:
        x, qweight, scales, zp, bias, k, bs = n.args
        q, s, z = (getattr(gm, a.target) for a in (qweight, scales, zp))
        n_out = n.meta["val"].shape[-1]
        nb = k // 32
        assert bs == 32 and k in (64, 128) and x.meta["val"].shape[-1] == k
        assert q.dtype == torch.uint8 and q.shape == (n_out, nb, 16)  # (N, n_blocks, bs / 2)
        assert s.dtype == torch.float32 and s.shape == (n_out, nb)
        assert z.dtype == torch.uint8 and z.shape == (n_out, nb // 2)  # two zero points a byte
        assert bias is not None
    # the float weights are gone from the module
    names = set(dict(gm.named_parameters())) | set(dict(gm.named_buffers()))
    assert not {s.weight_node.target for s in analysis.find_linears(float_gm)} & names
    assert min_cos(model, gm, calib) > 0.995


def test_packed_weight_is_the_gptq_weight():
    """The op's weight dequantizes to the original within one quantization step per block."""
    model, calib, float_gm, gm, _ = quantized("llama_gqa")
    w = {s.path: s.weight(float_gm) for s in analysis.find_linears(float_gm)}
    for n in gm.graph.nodes:
        if n.target != INT4_LINEAR:
            continue
        _, qw, sc, zp, _, k, bs = n.args
        s = getattr(gm, sc.target)
        deq = naive.dequantize_int4_ref(getattr(gm, qw.target), s, getattr(gm, zp.target), k, bs)
        ref = w[analysis.module_path(n)]
        step = s.repeat_interleave(bs, dim=1)[:, :k]  # (N, K) scale of each weight's block
        # GPTQ moves weights by their neighbours' error, so allow a few steps, not half of one
        assert ((deq - ref).abs() <= 4 * step + 1e-6).float().mean() > 0.99


def test_gptq_beats_round_to_nearest():
    model, calib, _, gptq_gm, _ = quantized("llama_gqa", method="gptq")
    rtn_gm = quantized("llama_gqa", method="rtn")[3]
    assert min_cos(model, gptq_gm, calib) > min_cos(model, rtn_gm, calib)


def test_gpt2_conv1d_weights():
    """GPT-2's Conv1D is addmm with a (K, N) weight, and c_attn's output is split three ways."""
    model, calib, float_gm, gm, _ = quantized("gpt2")
    assert sum(1 for n in gm.graph.nodes if n.target == INT4_LINEAR) == len(analysis.find_linears(float_gm))
    assert min_cos(model, gm, calib) > 0.99


def test_awq_folds_into_rmsnorm_and_shares_scales():
    """Llama: q/k/v (and gate/up) read one RMSNorm output only, so 1/s goes into the norm's
    weight; o_proj and down_proj read activations that other nodes do not: a multiply."""
    model, calib, _, gm, result = quantized("llama_gqa", method="awq")
    where = result.details["awq_scales"]
    qkv = [k for k in where if "q_proj" in k]
    assert len(qkv) == 2 and all("k_proj" in k and "v_proj" in k for k in qkv)  # one group
    assert all(where[k].startswith("folded into the RMSNorm") for k in qkv)
    assert all(where[k] == "multiply" for k in where if "o_proj" in k)
    ops = [n for n in gm.graph.nodes if n.target == INT4_LINEAR]
    by_path = {analysis.module_path(n): n for n in ops}
    layer0 = [by_path[f"layers.0.self_attn.{p}_proj"].args[0] for p in "qkv"]
    assert layer0[0] is layer0[1] is layer0[2]  # one input, one shared scale
    assert min_cos(model, gm, calib) > 0.99


def test_awq_on_bert_inserts_a_multiply():
    """BERT's LayerNorm output also feeds the residual: the scale cannot go into the norm."""
    model, calib, float_gm, gm, result = quantized("bert", method="awq")
    assert set(result.details["awq_scales"].values()) == {"multiply"}
    n_mul = sum(1 for n in gm.graph.nodes if n.target == aten.mul.Tensor)
    n_mul_before = sum(1 for n in float_gm.graph.nodes if n.target == aten.mul.Tensor)
    assert n_mul - n_mul_before == 8  # (qkv, o, up, down) x 2 layers
    assert min_cos(model, gm, calib) > 0.995


def test_exclude_keeps_float_and_bad_options_fail():
    model, calib, float_gm, gm, result = quantized("bert", method="rtn", exclude=["intermediate"])
    paths = [s.path for s in analysis.find_linears(gm)]
    assert paths == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    with pytest.raises(SlimformerError, match="unknown int4 method"):
        QuantizeInt4(method="nf4").run(fresh_copy(float_gm), context(model, calib))
    with pytest.raises(SlimformerError, match="block_size 48"):
        QuantizeInt4(block_size=48).run(fresh_copy(float_gm), context(model, calib))


def test_real_tokens_drops_padding():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = real_tokens(t, {"attention_mask": mask})
    assert out.shape == (4, 4) and torch.equal(out[3], t[1, 0])
    assert real_tokens(t, {}).shape == (6, 4)


def test_int4_embeddings():
    model, _, traced = exported("bert")
    calib = calibration(model, n=1)
    gm = fresh_copy(traced)
    table = model.embeddings.word_embeddings.weight.detach()  # (256, 64)
    result = QuantizeEmbeddingsInt4(min_rows=128).run(gm, context(model, calib))
    assert result.modified and list(result.details["tables"].values()) == [[256, 64]]
    gm.recompile()
    node = next(n for n in gm.graph.nodes if n.target is int4_embedding)
    packed, scales, zp = (getattr(gm, a.target) for a in node.args[1:4])
    assert packed.shape == (256, 32) and packed.dtype == torch.uint8
    ids = torch.tensor([[3, 7, 255]])
    rows = int4_embedding(ids, packed, scales, zp, 64)
    torch.testing.assert_close(rows[0], dequantize_rows_int4(packed, scales, zp, 64)[ids[0]])
    err = (dequantize_rows_int4(packed, scales, zp, 64) - table).pow(2).sum(1)  # (V,)
    p, s, z = quantize_rows_int4(table)  # min/max range: never a better row than the search
    assert (err <= (dequantize_rows_int4(p, s, z, 64) - table).pow(2).sum(1) + 1e-9).all()
    assert min_cos(model, gm, calib) > 0.99
