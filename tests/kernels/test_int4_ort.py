"""One packed int4 weight, two runtimes: ONNX Runtime's MatMulNBits (CPU) equals our reference.

The reference (`naive.int4_linear_ref`) is what the Triton kernel is tested against, so this
pins the packed layout (nibble order, scale and zero-point shapes, per-row zero-point padding
when n_blocks is odd) to ORT's own interpretation of it.
"""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from slimformer.kernels import naive  # noqa: E402
from slimformer.kernels.packing import pack_int4_matmulnbits, quantize_int4_rtn  # noqa: E402


def matmulnbits_model(qweight, scales, zero_points, bias, K, N, block_size) -> bytes:
    inits = [numpy_helper.from_array(qweight.numpy(), "B"),
             numpy_helper.from_array(scales.numpy(), "scales")]
    inputs = ["A", "B", "scales", ""]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points.numpy(), "zero_points"))
        inputs[3] = "zero_points"
    if bias is not None:  # inputs: A, B, scales, zero_points, g_idx, bias
        inits.append(numpy_helper.from_array(bias.numpy(), "bias"))
        inputs += ["", "bias"]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=block_size, accuracy_level=0)
    graph = helper.make_graph(
        [node], "int4_linear",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        initializer=inits,
    )
    # IR 10, as torch.onnx.export writes: onnx's newest IR (14) is refused by ONNX Runtime 1.30,
    # the GPU machine's version
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21),
                                             helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmulnbits_matches_reference(block_size, symmetric, with_bias):
    gen = torch.Generator().manual_seed(block_size + symmetric)
    M, N, K = 7, 781, 1093  # n_blocks = 35 / 18 / 9: odd counts exercise zero-point padding
    w = torch.randn(N, K, generator=gen)
    q, s, zp = quantize_int4_rtn(w, block_size, symmetric=symmetric)
    qweight, scales, zero_points = pack_int4_matmulnbits(q, s, zp, block_size)
    bias = torch.randn(N, generator=gen) if with_bias else None
    x = torch.randn(M, K, generator=gen)

    sess = ort.InferenceSession(
        matmulnbits_model(qweight, scales, zero_points, bias, K, N, block_size),
        providers=["CPUExecutionProvider"],
    )
    y_ort = torch.from_numpy(sess.run(None, {"A": x.numpy()})[0])
    y_ref = naive.int4_linear_ref(x, qweight, scales, zero_points, bias, K, block_size)
    # fp32 sums of 1093 products in a different order: agree to ~1e-6 relative
    torch.testing.assert_close(y_ort, y_ref, rtol=0, atol=1e-5 * y_ref.abs().max().item())
    # and the quantized weight is the real weight to within half a quantization step
    wd = naive.dequantize_int4_ref(qweight, scales, zero_points, K, block_size)
    assert ((wd - w).abs() <= 0.5 * s.repeat_interleave(block_size, 1)[:, :K] + 1e-6).all()
