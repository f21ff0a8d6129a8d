"""cpu-int4: int4 linears lowered to ONNX Runtime's com.microsoft MatMulNBits; the ONNX model
runs in vanilla onnxruntime and computes what the PyTorch graph computes."""

from __future__ import annotations

import onnx
import pytest
import torch
import transformers as tf
from models import calibration, context, exported, fresh_copy, inputs, token_cosines

import slimformer
from slimformer.compiler.compiled import OnnxCompiledModel, OutputSpec
from slimformer.compiler.cuda_targets import CPU_INT4_BLOCK, cpu_int4_pipeline, lower_cpu_int4
from slimformer.compiler.frontend import export as exported_graph
from slimformer.compiler.pass_manager import PassManager

pytestmark = pytest.mark.usefixtures("reference_kernels")  # the CPU target never runs Triton


@pytest.fixture(scope="module")
def int4_graph():
    """(model, held-out inputs, the cpu-int4 pipeline's PyTorch graph for MatMulNBits, its
    output on them)."""
    model, _, traced = exported("bert")
    calib = calibration(model, n=2)
    gm = PassManager(cpu_int4_pipeline({"int4_compute": "matmulnbits"})).run(fresh_copy(traced),
                                                                            context(model, calib))
    x = inputs(model, batch=3, seq=12, seed=5)
    with torch.no_grad():
        return model, x, gm, gm(**x).last_hidden_state


def lower(model, gm, x, **options) -> OnnxCompiledModel:
    with torch.no_grad():
        outputs = OutputSpec.of(model(**x))
    ctx = context(model, [x])
    return lower_cpu_int4(fresh_copy(gm), ctx, outputs, options)  # lowering edits the graph


def nodes(compiled: OnnxCompiledModel, op: str) -> list:
    return [n for n in onnx.load_from_string(compiled.model_bytes).graph.node if n.op_type == op]


@pytest.mark.parametrize("level", [0, 4])
def test_onnx_matches_the_pytorch_graph(int4_graph, level):
    model, x, gm, y_torch = int4_graph
    compiled = lower(model, gm, x, accuracy_level=level, int4_compute="matmulnbits")
    mm = nodes(compiled, "MatMulNBits")
    assert len(mm) == 12 and all(n.domain == "com.microsoft" for n in mm)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mm[0].attribute}
    assert attrs == {"K": 64, "N": 64, "bits": 4, "block_size": CPU_INT4_BLOCK, "accuracy_level": level}
    assert not nodes(compiled, "MatMul") or all(  # only attention's activation matmuls remain
        not any(i.endswith("weight") for i in n.input) for n in nodes(compiled, "MatMul"))
    y_onnx = compiled(**x).last_hidden_state
    if level == 0:  # fp32 dequantized weights: the same sums in another order
        torch.testing.assert_close(y_onnx, y_torch, rtol=0, atol=1e-4 * y_torch.abs().max().item())
    else:  # int8 activations per block: close, not equal
        assert token_cosines(y_torch, y_onnx, x["attention_mask"]).min() > 0.999


def test_int8_compute_keeps_int4_storage():
    """W4A8: the file holds the packed int4 weights; ONNX Runtime unpacks them to int8 at
    session start and runs DynamicQuantizeMatMul on them, q/k/v as one. (The exporter itself
    folds weights under 8192 packed bytes, so the FFN here is wide enough to stay packed.)"""
    model = tf.BertModel(tf.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, intermediate_size=512,
                                       max_position_embeddings=64), add_pooling_layer=False).eval()
    calib = calibration(model, n=2)
    x = inputs(model, batch=3, seq=12, seed=5)
    gm = PassManager(cpu_int4_pipeline({"embeddings": "float"})).run(exported_graph(model, calib[0]),
                                                                      context(model, calib))
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.slimformer.int4_linear.default]
    with torch.no_grad():
        y_torch = gm(**x).last_hidden_state  # w4a8_linear: the int8 arithmetic ORT runs
    compiled = lower(model, gm, x, int4_compute="int8")
    assert not nodes(compiled, "MatMulNBits") and len(nodes(compiled, "DynamicQuantizeMatMul")) == 4
    inits = onnx.load_from_string(compiled.model_bytes).graph.initializer
    packed = sorted(list(i.dims) for i in inits if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 3)
    bs = CPU_INT4_BLOCK  # FFN down and up: (N, K / bs, bs / 2), two codes a byte
    assert packed == [[64, 512 // bs, bs // 2], [512, 64 // bs, bs // 2]]
    assert not [i for i in inits if i.data_type == onnx.TensorProto.INT8 and 512 * 64 in (i.dims[0] * i.dims[-1],)]
    y_onnx = compiled(**x).last_hidden_state
    torch.testing.assert_close(y_onnx, y_torch, rtol=0, atol=1e-4 * y_torch.abs().max().item())


def test_compile_save_load_and_fidelity(tmp_path):
    model = tf.BertModel(tf.BertConfig(vocab_size=1536, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=128,
                                       max_position_embeddings=64), add_pooling_layer=False).eval()
    calib = calibration(model, n=2)
    x = inputs(model, batch=3, seq=12, seed=9)
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    sizes = {}
    for emb in ("int8", "int4"):
        # tune_steps=0: tuning makes the (identical, deduplicated) zero biases and unit norms of
        # this random model distinct, which would blur the embedding size comparison below
        compiled = slimformer.compile(model, "cpu-int4", calib[0], calib, embeddings=emb, tune_steps=0)
        assert compiled.report.final_fidelity["cos_min"] > 0.99
        assert token_cosines(ref, compiled(**x).last_hidden_state, x["attention_mask"]).min() > 0.99
        inits = onnx.load_from_string(compiled.model_bytes).graph.initializer
        sizes[emb] = sum(len(i.raw_data) for i in inits)
        table = [list(i.dims) for i in inits if len(i.dims) == 2 and i.dims[0] == 1536 and i.dims[1] > 1
                 and i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
        assert table == [[1536, 64 if emb == "int8" else 32]]  # int8 rows, or two codes a byte
        assert not [i for i in inits if list(i.dims) == [1536, 64] and i.data_type == onnx.TensorProto.FLOAT]
    # int4 rows: half the table's 1536 x 64 bytes, plus a one-byte zero point a row (and a few
    # bytes of unpacking constants)
    assert abs(sizes["int8"] - sizes["int4"] - (1536 * 64 // 2 - 1536)) < 64
    compiled.save(tmp_path / "art")
    loaded = slimformer.load(tmp_path / "art")
    assert isinstance(loaded, OnnxCompiledModel) and loaded.target == "cpu-int4"
    torch.testing.assert_close(loaded(**x).last_hidden_state, compiled(**x).last_hidden_state)


def test_bad_options_fail(int4_graph):
    model, x, gm, _ = int4_graph
    with pytest.raises(slimformer.SlimformerError, match="accuracy_level"):
        lower(model, gm, x, accuracy_level=7)
    with pytest.raises(slimformer.SlimformerError, match="embeddings"):
        cpu_int4_pipeline({"embeddings": "int2"})
    with pytest.raises(slimformer.SlimformerError, match="tune_steps"):
        cpu_int4_pipeline({"tune_steps": -1})
    assert "tune_quantized" not in [p.name for p in cpu_int4_pipeline({"tune_steps": 0})]
    assert [p.name for p in cpu_int4_pipeline({})][-2:] == ["tune_quantized", "int4_act_modes"]
    assert "int4_act_modes" not in [p.name for p in cpu_int4_pipeline({"int4_compute": "matmulnbits"})]
