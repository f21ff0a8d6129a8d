"""CPU lowering details that are about speed or size: they must not change what is computed."""

from __future__ import annotations

import onnx
import pytest
import torch
from models import calibration, compiled, context, exported, fresh_copy, inputs

from slimformer.compiler.compiled import OutputSpec
from slimformer.compiler.cpu_targets import cpu_int8_pipeline, lower_to_onnx
from slimformer.compiler.pass_manager import PassManager

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture(scope="module")
def int8_bert():
    """(model, padded held-out inputs, the cpu-int8 pipeline's graph, its lowered ONNX model)."""
    model, _, traced = exported("bert")
    calib = calibration(model, n=2)
    gm = PassManager(cpu_int8_pipeline({})).run(fresh_copy(traced), context(model, calib))
    x = inputs(model, batch=3, seq=12, seed=5)  # padded rows: the mask matters
    with torch.no_grad():
        outputs = OutputSpec.of(model(**x))
    compiled = lower_to_onnx("cpu-int8")(fresh_copy(gm), context(model, [x]), outputs, {})
    return model, x, gm, compiled


def test_onnx_computes_what_the_graph_computes(int8_bert):
    """q/k/v fused into one matmul, the mask added instead of Where: the same numbers."""
    _, x, gm, compiled = int8_bert
    assert x["attention_mask"].min() == 0
    with torch.no_grad():
        ref = gm(**x).last_hidden_state
    out = compiled(**x).last_hidden_state
    keep = x["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=0, atol=2e-3 * ref.abs().max().item())


def test_shared_input_linears_run_as_one(int8_bert):
    _, _, gm, compiled = int8_bert
    graph = onnx.load_from_string(compiled.model_bytes).graph
    int8_linears = sum(1 for n in gm.graph.nodes if n.target == torch.ops.slimformer.int8_linear.default)
    dqmm = [n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"]
    layers = 2
    assert len(dqmm) == int8_linears - 2 * layers  # q, k, v: one matmul a layer
    # the mask is made additive once: one Where builds it, shared by the layers
    assert len([n for n in graph.node if n.op_type == "Where"]) <= 1


def test_attention_runs_as_one_kernel(int8_bert):
    """Encoder self-attention is one MultiHeadAttention node a layer: no head Transposes, no
    score MatMul / Softmax of its own (test_onnx_computes_what_the_graph_computes: the same
    numbers, padded rows included)."""
    graph = onnx.load_from_string(int8_bert[3].model_bytes).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MultiHeadAttention") == 2  # one per layer
    assert "Softmax" not in ops and "Transpose" not in ops


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_decoder_attention_matches(name):
    """Decoders hand SDPA their causal pattern inside a bool mask, which MultiHeadAttention takes
    as its additive bias (Llama's grouped k/v heads arrive repeated): the same numbers."""
    model, cm = compiled(name, "cpu-fp32")
    ops = [n.op_type for n in onnx.load_from_string(cm.model_bytes).graph.node]
    assert ops.count("MultiHeadAttention") == 2
    for seed, seq in ((3, 9), (4, 14)):
        x = inputs(model, batch=2, seq=seq, seed=seed)
        with torch.no_grad():
            ref = model(**x).last_hidden_state
        keep = x["attention_mask"].bool()
        torch.testing.assert_close(cm(**x).last_hidden_state[keep], ref[keep], rtol=0, atol=1e-4)


def test_sdpa_outside_multihead_attention_keeps_the_explicit_form():
    """is_causal=True, dropout, grouped k/v heads, a float or per-head mask: matmul -> softmax
    -> matmul."""
    from slimformer.compiler.lower_onnx import mha_fits

    q, kv = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    assert mha_fits(q, q, q) and mha_fits(q, q, q, torch.ones(2, 1, 6, 6, dtype=torch.bool))
    assert not mha_fits(q, q, q, is_causal=True)
    assert not mha_fits(q, q, q, dropout_p=0.1)
    assert not mha_fits(q, kv, kv, enable_gqa=True)
    assert not mha_fits(q, q, q, torch.zeros(2, 1, 6, 6))
    assert not mha_fits(q, q, q, torch.ones(2, 4, 6, 6, dtype=torch.bool))
    assert not mha_fits(q.half(), q.half(), q.half())


def test_no_per_node_metadata(int8_bert):
    """The exporter's stack traces would be most of a small model's file."""
    graph = onnx.load_from_string(int8_bert[3].model_bytes).graph
    assert not any(n.metadata_props or n.doc_string for n in graph.node)
