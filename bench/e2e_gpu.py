"""End-to-end GPU benchmark: BERT-base (random weights) at batch 32 x seq 128, one GPU, one run.

    python bench/e2e_gpu.py                  # on a CUDA machine: writes bench/results/
    python bench/e2e_gpu.py --out DIR
    python bench/e2e_gpu.py --dry-run        # no GPU: a tiny BERT on CPU tensors, the Triton
                                             # kernels under TRITON_INTERPRET=1 (checks the code path)

Rows: torch fp16 eager (`model.half()`, the reference), slimformer cuda-fp16 (the same graph
run from torch.export), cuda-int8 (SmoothQuant + GPTQ W8A8, Triton), cuda-int4 (GPTQ W4A16,
block 32, Triton: from 128 rows the weight is dequantized to fp16 for cuBLAS), cuda-int8
one-launch (the same model with kernels/int8_fused.py: per-token quantization fused into the
GEMM), cuda-int4 fused-kernel (the int4 GEMM kernel at every M); each slimformer row twice: replayed from CUDA graphs (the
default) and "(no graphs)", the forward issued op by op from Python. On the GPU the runtime graph
is rewritten first (compiler/gpu_rewrites.py: q/k/v fused, SmoothQuant multiplies folded into
the int8 quantization; fp16 gets the q/k/v fusion too): `gpu_rewrites` in each row says what
changed. Each: median latency
(triton.testing.do_bench, L2 flushed), speedup vs the cuda-fp16 row of the same mode, cosine of
last_hidden_state vs torch fp32 on the GPU (per sample: min and mean), compile seconds; the
no-graph rows also the host's time to issue one forward vs the time to finish it. Each target
gets a torch.profiler summary of one no-graph forward (bench/gpu_profile.py: top ops by self
device / CPU time, kernels by kind, launches). int8 fallback: no run-time policy sends a linear
of cuda-int8 to fp16 (`prefer_int8` / `INT8_MIN_M` are not consulted by the op), so the int8
rows are the int8 kernels on every linear; the profile's kernel counts show it.
Compilation (calibration, GPTQ) runs on the CPU in float32 with the
reference kernels, as `slimformer convert` would; the compiled model moves itself to the GPU
(float16) on its first call there. Calibration: a few random-token batches.
Writes e2e_gpu_<gpu-slug>.json and prints a table. Stays within ~3 minutes on an H100 host.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: import from the repository root, not bench/,
    # where kernels.py would shadow the `kernels` package that transformers (>= 5.25) imports
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

TARGETS = ("cuda-fp16", "cuda-int8", "cuda-int4")
BUDGET_S = 170.0  # stop starting new systems after this; gpu.sh's timeout is the hard stop
DEQUANT_MIN_M = int(os.environ.get("SLIMFORMER_INT4_DEQUANT_MIN_M", "128"))  # int4_linear's default


def build_model(dry_run: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    if dry_run:
        cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
    else:
        cfg = BertConfig()  # BERT-base: 12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522
    return BertModel(cfg).eval()


def random_batch(model, batch: int, seq: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if model.config.vocab_size > 2000 else 5, model.config.vocab_size,
                        (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bench_ms(fn, device: torch.device) -> float:
    """Median ms of a whole forward, Python dispatch included (what a caller waits for)."""
    if device.type != "cuda":  # dry run: one timed call, the number means nothing
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton

    ms = triton.testing.do_bench(fn, warmup=50, rep=400, quantiles=[0.5])
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


@contextlib.contextmanager
def reference_ops():
    """Compilation runs on CPU tensors: the GPU machine has no TRITON_INTERPRET, so the ops run
    their plain-PyTorch references there; the dry run does the same (the interpreter is slow)."""
    old = os.environ.get("SLIMFORMER_KERNELS")
    os.environ["SLIMFORMER_KERNELS"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SLIMFORMER_KERNELS")
        else:
            os.environ["SLIMFORMER_KERNELS"] = old


def cosines(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Per-sample cosine of the flattened (seq, hidden) outputs: (min, mean)."""
    a, b = out.float().flatten(1), ref.float().flatten(1)
    c = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return c.min().item(), c.mean().item()


def first(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def run(out_dir: str | os.PathLike | None, dry_run: bool = False, batch: int | None = None,
        seq: int | None = None, calib_batches: int = 4, budget_s: float = BUDGET_S) -> dict:
    t0 = time.time()
    if dry_run:  # must precede the first kernel import
        os.environ["TRITON_INTERPRET"] = "1"
        device, name = torch.device("cpu"), "cpu-dry-run"
        batch, seq, calib_batch = batch or 2, seq or 16, 2
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("bench/e2e_gpu.py needs a CUDA GPU (or --dry-run)")
        device, name = torch.device("cuda"), torch.cuda.get_device_name()
        batch, seq, calib_batch = batch or 32, seq or 128, 8
    import slimformer
    from bench.gpu_profile import host_vs_device, print_profile, profile_forward
    from bench.kernels import slug

    model = build_model(dry_run)
    x_cpu = random_batch(model, batch, seq, seed=0)
    x = {k: v.to(device) for k, v in x_cpu.items()}
    calib = [random_batch(model, calib_batch, seq, seed=1 + i) for i in range(calib_batches)]
    with torch.no_grad():  # the fp32 reference on the benchmark's own device
        ref = first(copy.deepcopy(model).to(device)(**x)).float()
    rows = []

    def measure(row: dict, fn) -> None:
        with torch.no_grad():
            fn()  # first call: moves weights, autotunes the Triton kernels (CUDA graphs: warm-up)
            out = first(fn())  # with CUDA graphs: captured and replayed, so the replay is checked
            row["cos_min"], row["cos_mean"] = cosines(out, ref)
            row["out_dtype"] = str(out.dtype).replace("torch.", "")
            row["ms"] = bench_ms(fn, device)

    eager = copy.deepcopy(model).to(device)
    if device.type == "cuda":
        eager = eager.half()
    row = {"name": "torch-fp16-eager" if device.type == "cuda" else "torch-fp32-eager (dry run)"}
    try:
        measure(row, lambda m=eager: m(**x))
    except Exception as e:  # a failing row must not lose the others
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
    del eager

    profiles = {}
    for target in TARGETS:
        row = {"name": target}
        rows.append(row)
        if time.time() - t0 > budget_s:
            row["error"] = f"skipped: over the {budget_s:.0f} s budget"
            continue
        try:
            t = time.time()
            with reference_ops():
                compiled = slimformer.compile(model, target, calib[0], calib)
            row["compile_s"] = round(time.time() - t, 1)
            row["fidelity_cpu"] = compiled.report.final_fidelity
            row["size_mb"] = round(compiled.report.size_after_mb or 0.0, 1)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"[{time.time() - t0:6.1f}s] {target}: {row['error']}", flush=True)
            continue
        fn = lambda c=compiled: c(**x)  # noqa: E731
        for variant in VARIANTS.get(target, ("",)):
            kernel_variant(variant)
            compiled._graph_runners.clear()  # captured graphs hold the other kernel
            for graphs in (True, False):
                r = row if graphs and not variant else {"name": f"{target}{variant}"}
                if not graphs:
                    r["name"] += " (no graphs)"
                if r is not row:
                    rows.append(r)
                compiled.cuda_graphs = graphs
                try:
                    measure(r, fn)
                    r.update(host_vs_device(fn, device))
                    r["gpu_rewrites"] = compiled.gpu_rewrites
                    if graphs:
                        r["cuda_graphs"] = graph_state(compiled, device)
                except Exception as e:
                    r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"[{time.time() - t0:6.1f}s] {r['name']}: "
                      + (r.get("error") or f"{r['ms']:.3f} ms, cos min {r['cos_min']:.5f}"), flush=True)
        kernel_variant("")
        try:  # no graphs: every op and kernel shows
            profiles[target] = profile_forward(fn, device)
        except Exception as e:
            profiles[target] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        del compiled, fn

    for r in rows:  # each mode against the cuda-fp16 row of the same mode
        base_name = "cuda-fp16 (no graphs)" if r["name"].endswith("(no graphs)") else "cuda-fp16"
        base = next((b.get("ms") for b in rows if b["name"] == base_name), None)
        if r.get("ms") and base:
            r["speedup_vs_cuda_fp16"] = base / r["ms"]
    result = {
        "device": name, "torch": torch.__version__, "triton": _version("triton"),
        "transformers": _version("transformers"), "model": "BertModel(BertConfig())" if not dry_run
        else "tiny BERT (dry run)", "batch": batch, "seq": seq,
        "calibration": f"{calib_batches} random-token batches of {calib_batch} x {seq}",
        "timing": "triton.testing.do_bench median" if device.type == "cuda" else "one call (dry run)",
        "int8_fallback": "none at run time: every int8_linear runs the int8 kernels (see the profiles)",
        "rows": rows, "profiles": profiles, "wall_s": None,
    }
    print_table(result)
    for target, prof in profiles.items():
        print_profile(target, prof)
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="slimformer-e2e-") if dry_run else "bench/results"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"e2e_gpu_{slug(name)}.json"
    result["wall_s"] = round(time.time() - t0, 1)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path} in {result['wall_s']} s")
    return result


# Kernel variants measured on the same compiled model (no recompiling): cuda-int8 with the
# one-launch kernel (quantization fused into the GEMM), cuda-int4 with its fused kernel at every
# M (the default dequantizes to fp16 and runs cuBLAS from M >= 128).
VARIANTS = {"cuda-int8": ("", " one-launch"), "cuda-int4": ("", " fused-kernel")}


def kernel_variant(variant: str) -> None:
    from slimformer.kernels import int4_linear as k4
    from slimformer.kernels import int8_linear as k8

    k8.FUSED_QUANT = variant == " one-launch"
    k4.DEQUANT_MIN_M = 1 << 30 if variant == " fused-kernel" else DEQUANT_MIN_M


def graph_state(compiled, device: torch.device) -> str:
    """captured (n signatures) / failed: why / off (CPU)."""
    runner = getattr(compiled, "_graph_runners", {}).get(device)
    if runner is None:
        return "off" if device.type != "cuda" else "not used"
    return f"failed: {runner.failed}" if runner.failed else f"captured ({len(runner.graphs)})"


def print_table(result: dict) -> None:
    print(f"\nBERT-base e2e on {result['device']}, batch {result['batch']} x seq {result['seq']}")
    print(f"{'system':<34} {'ms':>9} {'vs fp16':>8} {'cos min':>9} {'cos mean':>9} {'compile s':>9}"
          f" {'issue ms':>9} {'total ms':>9}  graphs")
    for r in result["rows"]:
        line = (f"{r['name']:<34} {_cell(r, 'ms', '9.3f')} {_cell(r, 'speedup_vs_cuda_fp16', '8.2f')} "
                f"{_cell(r, 'cos_min', '9.5f')} {_cell(r, 'cos_mean', '9.5f')} {_cell(r, 'compile_s', '9.1f')}"
                f" {_cell(r, 'host_issue_ms', '9.3f')} {_cell(r, 'host_total_ms', '9.3f')}  {r.get('cuda_graphs', '')}")
        print(line + (f"  ERROR {r['error']}" if r.get("error") else ""))


def _cell(row: dict, key: str, spec: str) -> str:
    v = row.get(key)
    return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(int(spec.split(".")[0]))


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except ImportError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default bench/results; a temp "
                   "folder for --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: tiny BERT, CPU interpreter")
    p.add_argument("--batch", type=int, default=None, help="default 32 (2 for --dry-run)")
    p.add_argument("--seq", type=int, default=None, help="default 128 (16 for --dry-run)")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=BUDGET_S)
    a = p.parse_args(argv)
    result = run(a.out, a.dry_run, a.batch, a.seq, a.calib_batches, a.budget_s)
    return 1 if any(r.get("error") for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
