"""cpu-fp32 and cpu-int8: pipelines, and lowering to ONNX for ONNX Runtime's CPU provider."""

from __future__ import annotations

from slimformer.compiler.compiled import OnnxCompiledModel
from slimformer.compiler.frontend import dynamic_shapes_for
from slimformer.compiler.lower_onnx import export_onnx
from slimformer.compiler.targets import Target, register_target
from slimformer.kernels.naive import ACT_PER_TENSOR_U8, ACT_ROW_NORM_U8
from slimformer.passes.quantize import QMAX_CPU, QuantizeInt8
from slimformer.passes.quantize_embeddings import QuantizeEmbeddings
from slimformer.passes.smooth import Smooth


def lower_to_onnx(target_name: str):
    def lower(gm, ctx, outputs, options):
        examples = gm.meta["example_inputs"]
        shapes = dynamic_shapes_for(examples, gm.meta.get("max_seq", 65536))
        data = export_onnx(gm, examples, shapes, outputs.names)
        return OnnxCompiledModel(target_name, list(examples), outputs, ctx.report, data,
                                 threads=options.get("threads"))
    return lower


def cpu_int8_pipeline(options: dict):
    # Activations per tensor (DynamicQuantizeMatMul alone), the smoothing fitted to that; the
    # input groups the budget needs it for get per-token (row-normalised) activations. On
    # MiniLM per-tensor everywhere met the budget once smoothed and split: ~10% faster than
    # per-token everywhere, at the same held-out fidelity.
    return [
        Smooth(alpha=options.get("smooth_alpha"), act_mode=ACT_PER_TENSOR_U8, qmax=QMAX_CPU),
        QuantizeInt8(act_mode=ACT_PER_TENSOR_U8, sensitive_act_mode=ACT_ROW_NORM_U8, qmax=QMAX_CPU,
                     gptq=options.get("gptq", True), sensitivity=options.get("sensitivity", True)),
        QuantizeEmbeddings(),
    ]


ONNX_OPTIONS = ("threads",)  # ONNX Runtime intra-op threads of the compiled model
INT8_OPTIONS = ("smooth_alpha", "gptq", "sensitivity")

register_target(Target("cpu-fp32", "cpu", "float32 ONNX for ONNX Runtime", lambda o: [],
                       lower_to_onnx("cpu-fp32"), ONNX_OPTIONS))
register_target(Target("cpu-int8", "cpu",
                       "int8 weights (GPTQ, SmoothQuant), dynamic int8 activations (per token where needed), int8 embeddings",
                       cpu_int8_pipeline, lower_to_onnx("cpu-int8"), INT8_OPTIONS + ONNX_OPTIONS))
