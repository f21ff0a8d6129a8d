"""The runtime rewrites a CUDA device's copy of a compiled graph gets (compiler/gpu_rewrites.py),
checked on CPU tensors: the kernels under TRITON_INTERPRET=1 (tests/conftest.py). The int8
graph must stay bit-identical (same per-token quantization, exact integer products, the folded
SmoothQuant multiply rounded as torch rounds it); fp16 / int4 up to summation order."""

from __future__ import annotations

import functools

import pytest
import torch
from models import FAMILIES, calibration, inputs

import slimformer
from slimformer.compiler.compiled_torch import retarget
from slimformer.compiler.gpu_rewrites import rewrite_for_gpu
from slimformer.kernels import ops

pytest.importorskip("triton")

OPS = {"cuda-fp16": torch.ops.aten.linear.default, "cuda-int8": torch.ops.slimformer.int8_linear.default,
       "cuda-int4": torch.ops.slimformer.int4_linear.default}
IMPL = {"cuda-fp16": torch.ops.aten.linear.default, "cuda-int8": ops.int8_linear_impl,
        "cuda-int4": ops.int4_linear_impl}


@functools.cache
def build(family: str, target: str):
    model = FAMILIES[family].build()
    calib = calibration(model, n=1, batch=4, seq=16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMFORMER_KERNELS", "reference")
        compiled = slimformer.compile(model, target, calib[0], calib, **(
            {"tune_steps": 0} if target == "cuda-int4" else {}))
    return inputs(model, batch=3, seq=16, seed=5), compiled


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def run(gm, x):
    with torch.no_grad():
        out = gm(**x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@pytest.mark.parametrize("family", ["bert", "llama_gqa"])
@pytest.mark.parametrize("target", ["cuda-fp16", "cuda-int8", "cuda-int4"])
def test_rewrites_keep_the_numbers(family, target, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_KERNELS", "triton")  # the kernels, not the references
    x, compiled = build(family, target)
    plain = retarget(compiled.module(), torch.device("cpu"), torch.float32)
    gm = retarget(compiled.module(), torch.device("cpu"), torch.float32)
    n_linears = count(plain, OPS[target])
    assert n_linears == {"bert": 12, "llama_gqa": 14}[family]
    muls = count(plain, torch.ops.aten.mul.Tensor)
    stats = rewrite_for_gpu(gm)
    # q, k, v -> one linear per layer (llama: gate and up as well, they read the same x)
    fused_away = {"bert": 2, "llama_gqa": 3}[family] * 2
    assert stats["siblings_fused"] == {"bert": 2, "llama_gqa": 4}[family]
    assert count(gm, IMPL[target]) == n_linears - fused_away
    assert count(gm, OPS["cuda-int8"]) == count(gm, OPS["cuda-int4"]) == 0  # no dispatcher
    if target == "cuda-int8" and family == "bert":
        # BERT: SmoothQuant's multiplies in front of q/k/v, FFN-up and FFN-down fold away
        assert stats["smoothing_folded"] == 6 and count(gm, torch.ops.aten.mul.Tensor) == muls - 6
    y0, y1 = run(plain, x), run(gm, x)
    if target == "cuda-int8":
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    else:
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5 * y0.abs().max().item())
    weights = sum(t.numel() for t in [*gm.parameters(), *gm.buffers()])
    assert weights <= sum(t.numel() for t in [*plain.parameters(), *plain.buffers()])  # not kept twice


def test_the_cpu_copy_is_not_rewritten():
    x, compiled = build("bert", "cuda-int8")
    compiled(**x)
    assert compiled.gpu_rewrites is None
    gm, _ = compiled._runners[torch.device("cpu")]
    assert count(gm, OPS["cuda-int8"]) == 12
