"""cuda-fp16 / cuda-int8 / cuda-int4 on CPU tensors: the Triton kernels under TRITON_INTERPRET=1
(tests/conftest.py), checked against the reference ops; the torch artifact's save/load round
trip, which must never unpickle; the float16 / device rewrite the GPU run applies."""

from __future__ import annotations

import functools
import importlib.util
import json
import pickle
from pathlib import Path

import pytest
import torch
from models import FAMILIES, calibration, inputs, token_cosines

import slimformer
from slimformer.compiler.compiled_torch import TorchCompiledModel, retarget
from slimformer.kernels import ops  # noqa: F401  (registers torch.ops.slimformer.*)

pytest.importorskip("triton")
FAMILY_NAMES = ("bert", "llama_gqa")
N_LINEARS = {"bert": 12, "llama_gqa": 14}  # 2 layers x (q, k, v, o, ffn) of each family
INT_TARGETS = ("cuda-int8", "cuda-int4")
OPS = {"cuda-int8": torch.ops.slimformer.int8_linear.default,
       "cuda-int4": torch.ops.slimformer.int4_linear.default}


@functools.cache
def build(family: str, target: str):
    """(model, held-out inputs, CompiledModel), compiled once per session (hidden 64, 2 layers,
    calibration 2 x 4 x 16 tokens) with the reference ops: the tests below run the kernels."""
    model = FAMILIES[family].build()
    calib = calibration(model, n=2, batch=4, seq=16)
    with pytest.MonkeyPatch.context() as mp:  # compile fast; the tests run the kernels
        mp.setenv("SLIMFORMER_KERNELS", "reference")
        compiled = slimformer.compile(model, target, calib[0], calib)
    return model, inputs(model, batch=3, seq=16, seed=7), compiled


def last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("target", INT_TARGETS)
def test_triton_kernels_match_the_reference_ops(family, target, monkeypatch):
    model, x, compiled = build(family, target)
    assert isinstance(compiled, TorchCompiledModel)
    graph_ops = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert graph_ops.count(OPS[target]) == N_LINEARS[family]
    monkeypatch.setenv("SLIMFORMER_KERNELS", "triton")  # raises where Triton cannot run
    y_triton = last_hidden(compiled(**x))
    monkeypatch.setenv("SLIMFORMER_KERNELS", "reference")
    y_ref = last_hidden(compiled(**x))
    # same arithmetic (int8: exact integer products; int4: fp32 dots) up to fp32 summation order
    torch.testing.assert_close(y_triton, y_ref, rtol=0, atol=1e-4 * y_ref.abs().max().item())
    with torch.no_grad():
        y_float = last_hidden(model(**x))
    cos = token_cosines(y_float, y_ref, x["attention_mask"])
    assert cos.min() > (0.999 if target == "cuda-int8" else 0.99), cos
    assert compiled.report.final_fidelity["cos_min"] > 0.99


def test_fp16_target_is_the_original_graph_on_cpu():
    model, x, compiled = build("bert", "cuda-fp16")
    assert compiled.report.passes == []
    with torch.no_grad():
        torch.testing.assert_close(last_hidden(compiled(**x)), last_hidden(model(**x)))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_float16_rewrite_for_the_gpu(family):
    """What a CUDA call does, on devices we have: every float32 argument becomes float16 and
    every device argument the inputs' device (meta: shapes and dtypes only; cpu: the numbers)."""
    model, x, compiled = build(family, "cuda-int4")
    gm = retarget(compiled.module(), torch.device("meta"), torch.float16)
    for n in gm.graph.nodes:
        for a in [*n.args, *n.kwargs.values()]:
            assert a != torch.float32 and not (isinstance(a, torch.device) and a.type != "meta")
    out = last_hidden(gm(**{k: v.to("meta") for k, v in x.items()}))
    assert out.dtype == torch.float16 and out.shape == (3, 16, 64)
    scales = [n.args[2] for n in gm.graph.nodes if n.target == OPS["cuda-int4"]]
    assert all(getattr(gm, s.target).dtype == torch.float32 for s in scales)  # kept fp32
    half = retarget(compiled.module(), torch.device("cpu"), torch.float16)
    ref = last_hidden(compiled(**x))
    cos = token_cosines(ref, last_hidden(half(**x)).float(), x["attention_mask"])
    assert cos.min() > 0.999


@pytest.mark.parametrize("target", INT_TARGETS)
def test_save_load_round_trip_never_unpickles(target, tmp_path, monkeypatch):
    model, x, compiled = build("llama_gqa", target)
    before = last_hidden(compiled(**x))
    compiled.save(tmp_path / "art")
    files = sorted(p.name for p in (tmp_path / "art").iterdir())
    assert files == ["graph.json", "report.json", "slimformer.json", "weights.safetensors"]
    meta = json.loads((tmp_path / "art" / "slimformer.json").read_text())
    assert meta["runtime"] == "torch" and meta["target"] == target
    json.loads((tmp_path / "art" / "graph.json").read_text())  # plain JSON, no pickle inside

    def refuse(*a, **k):
        raise AssertionError("loading a torch artifact must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = slimformer.load(tmp_path / "art")
    assert isinstance(loaded, TorchCompiledModel) and loaded.target == target
    after = last_hidden(loaded(**x))
    monkeypatch.undo()
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert type(loaded(**x)).__name__ == type(model(**x)).__name__  # the original output class


def test_load_names_a_torch_mismatch(tmp_path):
    _, _, compiled = build("bert", "cuda-fp16")
    compiled.save(tmp_path / "art")
    (tmp_path / "art" / "graph.json").write_text('{"graph_module": 1}')
    with pytest.raises(slimformer.SlimformerError, match="cannot read the graph"):
        slimformer.load(tmp_path / "art")


def test_targets_are_registered():
    names = slimformer.target_names()
    assert {"cuda-fp16", "cuda-int8", "cuda-int4", "cpu-int4"} <= set(names)


def test_e2e_gpu_bench_dry_run(tmp_path):
    """bench/e2e_gpu.py end to end on a tiny BERT (CPU tensors, interpreter), so its first run
    on the GPU machine does not die of a Python error."""
    path = Path(__file__).resolve().parents[2] / "bench" / "e2e_gpu.py"
    spec = importlib.util.spec_from_file_location("slimformer_bench_e2e_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(tmp_path, dry_run=True, calib_batches=1)
    saved = json.loads((tmp_path / "e2e_gpu_cpu-dry-run.json").read_text())
    names = [r["name"] for r in saved["rows"]][1:]
    systems = ("cuda-fp16", "cuda-int8", "cuda-int8 one-launch", "cuda-int4", "cuda-int4 fused-kernel")
    assert names == [n for t in systems for n in (t, f"{t} (no graphs)")]
    for r in saved["rows"]:
        assert not r.get("error") and r["ms"] > 0 and r["cos_min"] > 0.98, r
    assert result["rows"][1]["speedup_vs_cuda_fp16"] == result["rows"][2]["speedup_vs_cuda_fp16"] == 1.0
    assert result["rows"][1]["cuda_graphs"] == "off"  # CPU tensors: never captured
    profiles = saved["profiles"]
    assert profiles["cuda-int8"]["slimformer_ops"] == {"slimformer::int8_linear": 13}  # 2 layers + pooler
    assert profiles["cuda-int4"]["slimformer_ops"] == {"slimformer::int4_linear": 13}
    assert profiles["cuda-fp16"]["top_self_cpu"] and not profiles["cuda-fp16"]["slimformer_ops"]
