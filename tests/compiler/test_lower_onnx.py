"""CPU lowering details that are about speed or size: they must not change what is computed."""

from __future__ import annotations

import onnx
import pytest
import torch
from models import calibration, context, exported, fresh_copy, inputs

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
    # the mask is added to the scores: one Where builds the additive mask, shared by the layers
    assert len([n for n in graph.node if n.op_type == "Where"]) <= 1


def test_no_per_node_metadata(int8_bert):
    """The exporter's stack traces would be most of a small model's file."""
    graph = onnx.load_from_string(int8_bert[3].model_bytes).graph
    assert not any(n.metadata_props or n.doc_string for n in graph.node)
