"""bench/kernels.py end to end without a GPU (--dry-run: CPU tensors, Triton interpreter), so
its first run on the GPU machine does not die of a Python error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"
ROW_KEYS = {"kernel", "M", "N", "K", "ms", "baseline", "baseline_ms", "speedup", "tflops", "gbps"}


def test_kernel_bench_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("slimformer_bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(tmp_path, dry_run=True)
    saved = json.loads((tmp_path / "kernels_cpu-dry-run.json").read_text())
    assert saved["device"] == result["device"] == "cpu-dry-run"
    kernels = {r["kernel"] for r in saved["rows"]}
    assert kernels == {"int8_linear", "int8_fused", "int8_gemm", "int4_linear", "int4_dequant"}
    for r in saved["rows"]:
        assert ROW_KEYS <= r.keys() and not r.get("error"), r
        assert r["ms"] > 0
    assert {r["baseline"] for r in saved["rows"]} == {"cublas_fp16", "torch_int_mm"}
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.device_peaks("NVIDIA H100 80GB HBM3", None)["tbps"] == 3.35
    assert bench.device_peaks("NVIDIA H200", None)["tbps"] == 4.8
    assert bench.device_peaks("NVIDIA H100 PCIe", None)["tbps"] == 2.0
