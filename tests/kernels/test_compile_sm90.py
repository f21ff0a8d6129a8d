"""Compile-only check for the GPU: every kernel builds for an H100 (sm_90, via the ptxas that
ships in the triton wheel) and its GEMMs run on tensor cores, without a GPU on this machine.

Runs `_compile_sm90.py` in a subprocess without TRITON_INTERPRET (this test session sets it,
and under the interpreter `@triton.jit` builds nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("_compile_sm90.py")
REPO = Path(__file__).resolve().parents[2]
H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def _cuda_backend_missing() -> str | None:
    try:
        from triton.backends import backends
    except ImportError as e:  # pragma: no cover
        return f"triton has no backends module: {e}"
    if "nvidia" not in backends:
        return "this triton build has no NVIDIA backend"
    return None


@pytest.fixture(scope="module")
def compiled():
    reason = _cuda_backend_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"compiling for sm_90 failed:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_built(compiled):
    names = {r["name"] for r in compiled}
    assert names == {"int8_matmul", "int8_fused", "quant_rows", "int4_matmul", "int4_dequant",
                     "linear_attention", "block_sparse_attention"}
    for r in compiled:
        assert r["cubin_bytes"] > 0, r  # ptxas ran: a real sm_90 binary
        assert r["shared"] <= H100_MAX_SHARED, r


def test_int8_gemm_uses_int8_tensor_cores(compiled):
    for r in (r for r in compiled if r["name"] in ("int8_matmul", "int8_fused")):
        assert r["mma"], f"no mma/wgmma in the PTX of {r}"
        assert all(".s8.s8" in op for op in r["mma"]), r["mma"]  # int8 x int8 -> int32
        if int(r["consts"]["BLOCK_M"]) >= 64:  # Hopper's warpgroup MMA for the big tiles
            assert any(op.startswith("wgmma.mma_async") for op in r["mma"]), r


def test_int4_gemm_uses_fp16_tensor_cores(compiled):
    for r in (r for r in compiled if r["name"] == "int4_matmul"):
        assert r["mma"], f"no mma/wgmma in the PTX of {r}"
        assert all(".f16.f16" in op or ".bf16.bf16" in op for op in r["mma"]), r["mma"]
        if int(r["consts"]["BLOCK_M"]) >= 64:
            assert any(op.startswith("wgmma.mma_async") for op in r["mma"]), r


def test_attention_kernels_use_tensor_cores(compiled):
    # before this check, block-sparse attention read a plain float global and built only under
    # the interpreter: on a GPU, triton refused it (NameError: not a constexpr)
    for r in (r for r in compiled if r["name"].endswith("_attention")):
        assert r["mma"], f"no mma/wgmma in the PTX of {r}"
        assert any(op.startswith("wgmma.mma_async") for op in r["mma"]), r
