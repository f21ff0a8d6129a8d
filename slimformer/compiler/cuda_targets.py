"""cuda-fp16, cuda-int8, cuda-int4 (PyTorch + Triton) and cpu-int4 (ONNX Runtime).

The CUDA targets lower to a TorchCompiledModel: the compressed graph, run by PyTorch in
float16 on the inputs' GPU (float32 on CPU tensors, where the Triton kernels run under
TRITON_INTERPRET=1), saved as a torch.export program. cpu-int4 lowers to ONNX like cpu-int8 and
stores each int4 linear in MatMulNBits' packing: by default (int4_compute="int8") ONNX Runtime
unpacks it to int8 at session start and runs the int8 kernel (W4A8), with per-tensor int8
activations where they cost little fidelity and per-token ones elsewhere
(passes/int4_act_modes.py); with "matmulnbits" one com.microsoft MatMulNBits node runs on the
same packed bytes.

Options (keyword arguments of `slimformer.compile`):
  gptq (bool, int8), sensitivity (bool, int8), smooth_alpha (float | None, int8)
  int4_method ("gptq" | "awq" | "rtn"), block_size (32, 64, 128, 256; 16 on cpu-int4),
  int4_act_order (bool, GPTQ)                                                 int4 targets
  embeddings ("int8" | "int4" | "float")                                      cpu-int4 only
  int4_compute ("int8" | "matmulnbits")                                       cpu-int4 only
  accuracy_level (0 | 4): MatMulNBits' compute: 0 fp32, 4 int8 activations   cpu-int4 only
  cuda_graphs (bool, default True): replay the forward from captured CUDA graphs on CUDA
    inputs (compiled_torch / cuda_graphs.py); also `compiled.cuda_graphs = False` at run time
                                                                              cuda-* targets
"""

from __future__ import annotations

from slimformer.compiler.compiled_torch import TorchCompiledModel
from slimformer.compiler.cpu_targets import INT8_OPTIONS, ONNX_OPTIONS, lower_to_onnx
from slimformer.compiler.targets import Target, register_target
from slimformer.errors import SlimformerError
from slimformer.kernels.naive import ACT_PER_TOKEN_I8, ACT_ROW_NORM_U8
from slimformer.passes.int4_act_modes import ChooseInt4ActModes
from slimformer.passes.quantize import QMAX_CPU, QMAX_FULL, QuantizeInt8
from slimformer.passes.quantize_embeddings import QuantizeEmbeddings
from slimformer.passes.quantize_int4 import QuantizeEmbeddingsInt4, QuantizeInt4
from slimformer.passes.smooth import Smooth
from slimformer.passes.tune_quantized import TuneQuantized

# MatMulNBits accuracy_level for cpu-int4, measured on the dev machine (AMD EPYC, AVX2 without
# VNNI, 2 threads, onnxruntime 1.32): level 4 (activations quantized to int8 per block, integer
# dots) was no faster than level 0 (weights dequantized, fp32 GEMM) -- MiniLM-L6 batch 8 x 128:
# 1064 vs 1066 ms, and single (1024 x 384 x 1536) MatMulNBits nodes: 7.5 ms (level 0) vs 8.3 ms
# (level 4) -- and cost fidelity (min cos 0.9804 -> 0.9795). CPUs with VNNI may prefer 4.
DEFAULT_ACCURACY_LEVEL = 0
# How cpu-int4 computes: "matmulnbits" (ORT's int4 op, fp32 compute at the level above) or
# "int8" (the int4 weight unpacked to int8 once at session start, W4A8 through the cpu-int8
# kernel; lower_onnx.int4_group_as_int8_matmul).
DEFAULT_INT4_COMPUTE = "int8"


def lower_to_torch(target_name: str):
    def lower(gm, ctx, outputs, options):
        return TorchCompiledModel(target_name, list(gm.meta["example_inputs"]), outputs, ctx.report,
                                  graph_module=gm, cuda_graphs=_cuda_graphs(options))
    return lower


TORCH_OPTIONS = ("cuda_graphs",)  # read by every cuda-* target's lowering


def _cuda_graphs(options: dict) -> bool:
    value = options.get("cuda_graphs", True)
    if not isinstance(value, bool):
        raise SlimformerError(f"cuda_graphs={value!r} is not a bool", "use cuda_graphs=True or False")
    return value


def _torch_pipeline(pipeline):
    """A cuda-* pipeline that checks the lowering's options first (before tracing)."""
    def build(options: dict):
        _cuda_graphs(options)
        return pipeline(options)
    return build


def cuda_int8_pipeline(options: dict):
    return [
        Smooth(alpha=options.get("smooth_alpha"), act_mode=ACT_PER_TOKEN_I8, qmax=QMAX_FULL,
               split_outliers=False),  # (on the GPU, two more launches per layer)
        QuantizeInt8(act_mode=ACT_PER_TOKEN_I8, qmax=QMAX_FULL, gptq=options.get("gptq", True),
                     sensitivity=options.get("sensitivity", True)),
    ]


def _int4(options: dict, block_size: int = 32, cpu: bool = False) -> QuantizeInt4:
    return QuantizeInt4(method=options.get("int4_method", "gptq"), block_size=options.get("block_size", block_size),
                        act_order=options.get("int4_act_order", True), allow_block16=cpu)


# cpu-int4 defaults, measured on MiniLM-L6 (bench eval sentences, mean-pooled cosine to fp32):
# GPTQ linears alone reach min 0.983 at block 32 and 0.987 at block 16; int4 word embeddings
# cost ~0.002 more and halve the largest table. With fp16 block scales (the W4A8 lowering),
# block 16 costs the bytes that fp32 scales at block 32 did.
CPU_INT4_BLOCK = 16
CPU_INT4_EMBEDDINGS = "int4"


def cpu_int4_pipeline(options: dict):
    emb = options.get("embeddings", CPU_INT4_EMBEDDINGS)
    if emb not in ("int8", "int4", "float"):
        raise SlimformerError(f"embeddings='{emb}' is not an option", "use int8, int4 or float")
    # W4A8 quantizes activations to int8: split off the outlier channels first (no migration
    # into the weights, which would widen the int4 ranges).
    int8_compute = _int4_compute(options) == "int8"
    split = [Smooth(act_mode=ACT_ROW_NORM_U8, qmax=QMAX_CPU, migrate=False)] if int8_compute else []
    passes = [*split, _int4(options, CPU_INT4_BLOCK, cpu=True)]
    if emb == "int4":  # the word embedding as int4 rows; smaller tables (positions) as int8
        passes.append(QuantizeEmbeddingsInt4())
    if emb != "float":
        passes.append(QuantizeEmbeddings())
    passes += _tuning(options)
    if int8_compute:  # per-tensor activations where they cost little
        passes.append(ChooseInt4ActModes())
    return passes


# Distillation steps for the float parameters around int4 weights (passes/tune_quantized.py).
# MiniLM-L6 (GPTQ block 16, PyTorch): held-out min/mean cosine 0.9856/0.9928 -> 0.9883/0.9948.
DEFAULT_TUNE_STEPS = 150


def _tuning(options: dict) -> list:
    steps = options.get("tune_steps", DEFAULT_TUNE_STEPS)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise SlimformerError(f"tune_steps={steps!r} is not a step count", "use an integer >= 0 (0: no tuning)")
    return [TuneQuantized(steps=steps)] if steps else []


def _int4_compute(options: dict) -> str:
    compute = options.get("int4_compute", DEFAULT_INT4_COMPUTE)
    if compute not in ("int8", "matmulnbits"):
        raise SlimformerError(f"int4_compute='{compute}' is not an option", "use int8 or matmulnbits")
    return compute


def lower_cpu_int4(gm, ctx, outputs, options):
    level = options.get("accuracy_level", DEFAULT_ACCURACY_LEVEL)
    if level not in (0, 1, 2, 3, 4):
        raise SlimformerError(f"accuracy_level={level} is not a MatMulNBits level", "use 0 (fp32) or 4 (int8)")
    compute = _int4_compute(options)
    gm.meta["matmulnbits_accuracy_level"] = level  # read by lower_onnx.prepare_for_onnx
    gm.meta["int4_compute"] = compute
    return lower_to_onnx("cpu-int4")(gm, ctx, outputs, options)


register_target(Target("cuda-fp16", "cuda", "float16 PyTorch graph (the GPU baseline)",
                       _torch_pipeline(lambda o: []), lower_to_torch("cuda-fp16"), TORCH_OPTIONS))
INT4_OPTIONS = ("int4_method", "block_size", "int4_act_order", "tune_steps")
register_target(Target("cuda-int8", "cuda",
                       "int8 weights (GPTQ, SmoothQuant), per-token int8 activations, Triton W8A8 kernel",
                       _torch_pipeline(cuda_int8_pipeline), lower_to_torch("cuda-int8"),
                       INT8_OPTIONS + TORCH_OPTIONS))
register_target(Target("cuda-int4", "cuda", "int4 weights (GPTQ, block 32), fp16 activations, Triton W4A16 kernel",
                       _torch_pipeline(lambda o: [_int4(o), *_tuning(o)]), lower_to_torch("cuda-int4"),
                       INT4_OPTIONS + TORCH_OPTIONS))
register_target(Target("cpu-int4", "cpu",
                       "int4 weights (GPTQ, block 16) and word embeddings, unpacked to int8 at load (W4A8)",
                       cpu_int4_pipeline, lower_cpu_int4,
                       INT4_OPTIONS + ("embeddings", "int4_compute", "accuracy_level") + ONNX_OPTIONS))
