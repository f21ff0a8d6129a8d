"""Kernel benchmark: slimformer's Triton int8/int4 linears against cuBLAS, one GPU, one run.

    python bench/kernels.py                    # on a CUDA machine: writes bench/results/
    python bench/kernels.py --out DIR
    python bench/kernels.py --dry-run          # no GPU: the whole code path on one tiny shape,
                                               # CPU tensors under TRITON_INTERPRET=1
    from bench.kernels import run; run("bench/results")   # what `slimformer kernels` calls

Rows (N, K = output, input features): BERT-base 768x768, 3072x768, 768x3072; Llama-7B
4096x4096, 11008x4096, 4096x11008. int8_linear (act_mode 1, fp16 activations, per-token
quantization included: two launches) and int8_fused (the same in one launch, quantization fused
into the GEMM) vs cuBLAS fp16 at M = 1, 16, 128, 2048, 4096, and its GEMM alone vs
torch._int_mm; int4_linear (block 128, asymmetric; the fused kernel) and int4_dequant (weight
dequantized to fp16, then cuBLAS: the op's path from M >= 128) vs cuBLAS fp16 at M = 1, 16,
128, 2048.
Each kernel is checked against its reference on the GPU before it is timed (a wrong kernel
gives an error row, not a time). Times: triton.testing.do_bench (median, L2 flushed); for the
linears also `ms_graph` / `baseline_ms_graph`, replayed from a CUDA graph (the kernels' own
time without the host's launch overhead, which do_bench includes at these sizes).
Writes kernels_<gpu-slug>.json (+ a roofline PNG when matplotlib is there) and prints a table
and the `INT8_MIN_M` table for kernels/int8_linear.py's fp16 fallback policy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: import from the repository root, not bench/,
    # where kernels.py would shadow the `kernels` package that transformers (>= 5.25) imports
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

SHAPES = [  # (name, N, K)
    ("bert.qkvo", 768, 768), ("bert.ffn_up", 3072, 768), ("bert.ffn_down", 768, 3072),
    ("llama.attn", 4096, 4096), ("llama.ffn_up", 11008, 4096), ("llama.ffn_down", 4096, 11008),
]
INT8_MS = [1, 16, 128, 2048, 4096]
INT4_MS = [1, 16, 128, 2048]
INT4_BLOCK = 128
BUDGET_S = 210.0  # stop starting new rows after this: the whole run stays under 4 minutes

# Dense (no sparsity) peaks: fp16 tensor TFLOP/s, int8 tensor TOP/s, memory TB/s.
PEAKS = {
    "H200": (989.0, 1979.0, 4.8),
    "H100 NVL": (835.0, 1671.0, 3.9),
    "H100 PCIe": (756.0, 1513.0, 2.0),
    "H100": (989.0, 1979.0, 3.35),  # SXM5 ("NVIDIA H100 80GB HBM3")
    "A100": (312.0, 624.0, 2.0),
    "L40S": (362.0, 733.0, 0.864),
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_peaks(name: str, device: torch.device) -> dict:
    for key, (fp16, int8, bw) in PEAKS.items():  # most specific names first
        if all(part.lower() in name.lower() for part in key.split()):
            return {"source": f"table:{key}", "fp16_tflops": fp16, "int8_tops": int8, "tbps": bw}
    if device.type != "cuda":
        return {"source": "none (dry run)", "fp16_tflops": None, "int8_tops": None, "tbps": None}
    # unknown GPU: measure a big fp16 GEMM, an int8 GEMM and a device-to-device copy
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    ai = torch.randint(-127, 128, (8192, 8192), device=device, dtype=torch.int8)
    buf = torch.empty(1 << 28, device=device, dtype=torch.uint8)
    fp16 = 2 * 8192**3 / bench_ms(lambda: a @ a, device) / 1e9
    int8 = 2 * 8192**3 / bench_ms(lambda: torch._int_mm(ai, ai), device) / 1e9
    tbps = 2 * buf.numel() / bench_ms(lambda: buf.clone(), device) / 1e9
    return {"source": "measured", "fp16_tflops": fp16, "int8_tops": int8, "tbps": tbps}


def bench_ms(fn, device: torch.device) -> float:
    if device.type != "cuda":  # dry run: one timed call, the numbers mean nothing
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton

    ms = triton.testing.do_bench(fn, warmup=15, rep=60, quantiles=[0.5])
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def close(y: torch.Tensor, ref: torch.Tensor, ulps: float = 8.0) -> str | None:
    """None if y matches ref to a few fp16 ulps of the output's scale, else a message."""
    err = (y.float() - ref.float()).abs().max().item()
    tol = ulps * 2.0**-10 * ref.float().abs().max().item() + 1e-6
    if not (err <= tol):  # also catches NaN
        return f"wrong result: max abs error {err:.4g} > {tol:.4g}"
    return None


def make_row(kernel, M, N, K, ms, baseline, baseline_ms, flops, nbytes, peak_flops, peak_tbps):
    tflops = flops / ms / 1e9 if ms else None
    gbps = nbytes / ms / 1e6 if ms else None
    return {
        "kernel": kernel, "M": M, "N": N, "K": K, "ms": ms,
        "baseline": baseline, "baseline_ms": baseline_ms,
        "speedup": baseline_ms / ms if ms and baseline_ms else None,
        "tflops": tflops, "gbps": gbps,
        "pct_peak_flops": 100 * tflops / peak_flops if tflops and peak_flops else None,
        "pct_peak_bw": 100 * gbps / (peak_tbps * 1e3) if gbps and peak_tbps else None,
        "intensity": flops / nbytes,
    }


def int8_rows(name, M, N, K, device, peaks, gen):
    from slimformer.kernels import int8_linear as k8
    from slimformer.kernels import naive

    x = torch.randn(M, K, device=device, generator=gen).half()
    w_q = torch.randint(-127, 128, (N, K), device=device, generator=gen, dtype=torch.int8)
    w_scale = torch.full((N,), 1.0 / (127 * K**0.5), device=device)
    bias = torch.randn(N, device=device, generator=gen).half()
    err = close(k8.int8_linear(x, w_q, w_scale, bias),
                naive.int8_linear_ref(x, w_q, w_scale, bias, naive.ACT_PER_TOKEN_I8))
    flops = 2 * M * N * K
    if err:
        return [dict(make_row("int8_linear", M, N, K, None, "cublas_fp16", None, flops, 1,
                              None, None), error=err, shape=name)]
    w16 = (w_q.half() * w_scale.half()[:, None]).contiguous()  # same weight, fp16, (N, K)
    base = bench_ms(lambda: F.linear(x, w16, bias), device)
    two = lambda: k8.int8_linear(x, w_q, w_scale, bias, fused=False)  # noqa: E731
    one = lambda: k8.int8_linear(x, w_q, w_scale, bias, fused=True)  # noqa: E731
    nbytes = 2 * M * K + N * K + 2 * M * N
    rows = [with_graph_ms(make_row("int8_linear", M, N, K, bench_ms(two, device), "cublas_fp16", base,
                                   flops, nbytes, peaks["int8_tops"], peaks["tbps"]),
                          two, lambda: F.linear(x, w16, bias), device)]
    # one launch: quantization fused into the GEMM (kernels/int8_fused.py); its own try: a
    # failure here must not lose the two-launch rows
    try:
        err = close(one(), naive.int8_linear_ref(x, w_q, w_scale, bias, naive.ACT_PER_TOKEN_I8))
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {str(e)[:300]}"
    row = make_row("int8_fused", M, N, K, None if err else bench_ms(one, device), "cublas_fp16", base,
                   flops, nbytes, peaks["int8_tops"], peaks["tbps"])
    rows.append(dict(row, error=err) if err else with_graph_ms(row, one, None, device, rows[0]))
    # GEMM alone (activations already int8) vs torch._int_mm, which also stops at int32
    q, s = k8.quantize_rows(x)
    gemm = bench_ms(lambda: k8.int8_matmul(q, s, w_q, w_scale, bias, torch.float16), device)
    w_t = w_q.t()  # (K, N) column-major view: _int_mm's fast path, no copy
    try:
        int_mm = bench_ms(lambda: torch._int_mm(q, w_t), device) if device.type == "cuda" else None
    except RuntimeError as e:  # e.g. M <= 16 on some torch versions
        int_mm, note = None, f"torch._int_mm: {str(e).splitlines()[0]}"
    else:
        note = None
    row = make_row("int8_gemm", M, N, K, gemm, "torch_int_mm", int_mm, flops,
                   M * K + N * K + 2 * M * N, peaks["int8_tops"], peaks["tbps"])
    if note:
        row["note"] = note
    rows.append(row)
    for r in rows:
        r["shape"] = name
    return rows


def int4_rows(name, M, N, K, device, peaks, gen, weights):
    from slimformer.kernels import int4_linear as k4
    from slimformer.kernels import naive
    from slimformer.kernels.packing import pack_int4_matmulnbits, quantize_int4_rtn

    if (N, K) not in weights:  # quantize each weight once, for all M
        w = torch.randn(N, K, device=device, generator=gen) / K**0.5
        q, s, zp = quantize_int4_rtn(w, INT4_BLOCK)
        weights[(N, K)] = (w.half(), *pack_int4_matmulnbits(q, s.half(), zp, INT4_BLOCK))
    w16, qweight, scales, zp = weights[(N, K)]
    x = torch.randn(M, K, device=device, generator=gen).half()
    ref = naive.int4_linear_ref(x, qweight, scales, zp, None, K, INT4_BLOCK)
    err = close(k4.int4_linear(x, qweight, scales, zp, None, K, INT4_BLOCK, dequant=False), ref)
    flops = 2 * M * N * K
    if err:
        return [dict(make_row("int4_linear", M, N, K, None, "cublas_fp16", None, flops, 1,
                              None, None), error=err, shape=name)]
    base = bench_ms(lambda: F.linear(x, w16), device)
    fn = lambda: k4.int4_linear(x, qweight, scales, zp, None, K, INT4_BLOCK, dequant=False)  # noqa: E731
    nbytes = 2 * M * K + qweight.numel() + 2 * scales.numel() + zp.numel() + 2 * M * N
    row = make_row("int4_linear", M, N, K, bench_ms(fn, device), "cublas_fp16", base, flops, nbytes,
                   peaks["fp16_tflops"], peaks["tbps"])
    rows = [with_graph_ms(row, fn, lambda: F.linear(x, w16), device)]
    # many-token path: dequantize to fp16, then cuBLAS (kernels/int4_dequant.py; the op's choice
    # from M >= k4.DEQUANT_MIN_M); its own try: a failure must not lose the row above
    deq = lambda: k4.int4_linear(x, qweight, scales, zp, None, K, INT4_BLOCK, dequant=True)  # noqa: E731
    try:
        err = close(deq(), ref)
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {str(e)[:300]}"
    row = make_row("int4_dequant", M, N, K, None if err else bench_ms(deq, device), "cublas_fp16", base,
                   flops, nbytes + 4 * N * K, peaks["fp16_tflops"], peaks["tbps"])
    rows.append(dict(row, error=err) if err else with_graph_ms(row, deq, None, device, rows[0]))
    for r in rows:
        r["shape"] = name
    return rows


def graph_ms(fn, device: torch.device) -> float | None:
    """Median ms of fn replayed from a CUDA graph: the kernels' own time, without the host's
    launch overhead that do_bench also measures at these sizes (no L2 flush). None off-GPU."""
    if device.type != "cuda":
        return None
    import triton

    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=[0.5])
    except Exception:  # noqa: BLE001  (a number less, not a failed row)
        return None
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def with_graph_ms(row: dict, fn, base_fn, device, base_row: dict | None = None) -> dict:
    """Adds ms_graph (ours) and baseline_ms_graph (cuBLAS), both replayed from CUDA graphs."""
    row["ms_graph"] = graph_ms(fn, device)
    row["baseline_ms_graph"] = base_row.get("baseline_ms_graph") if base_row else \
        graph_ms(base_fn, device) if base_fn else None
    if row["ms_graph"] and row["baseline_ms_graph"]:
        row["speedup_graph"] = row["baseline_ms_graph"] / row["ms_graph"]
    return row


def int8_min_m(rows, shapes=SHAPES) -> dict[str, int]:
    """Per (N, K): smallest measured M from which int8_linear beats cuBLAS fp16 at every
    larger measured M (the `INT8_MIN_M` table of kernels/int8_linear.py)."""
    table = {}
    for _, N, K in shapes:
        wins = sorted((r["M"], (r["speedup"] or 0) > 1.0) for r in rows
                      if r["kernel"] == "int8_linear" and (r["N"], r["K"]) == (N, K) and r["ms"])
        min_m = None
        for M, win in reversed(wins):
            if not win:
                break
            min_m = M
        if wins:
            table[f"{N}x{K}"] = min_m if min_m is not None else 1 << 30  # never: stay fp16
    return table


def fmt(v, spec):
    width = int(re.match(r"\d*", spec).group() or 0)
    return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(width)


def print_table(rows):
    print(f"{'kernel':<12} {'shape':<15} {'M':>5} {'N':>6} {'K':>6} {'ms':>9} {'baseline':<13} "
          f"{'base ms':>9} {'speedup':>7} {'TFLOP/s':>8} {'GB/s':>7} {'%peak':>6} {'%bw':>5}"
          f" {'graph ms':>9} {'base gr.':>9} {'sp. gr.':>7}")
    for r in rows:
        line = (f"{r['kernel']:<12} {r.get('shape', ''):<15} {r['M']:>5} {r['N']:>6} {r['K']:>6} "
                f"{fmt(r['ms'], '9.4f')} {r['baseline']:<13} {fmt(r['baseline_ms'], '9.4f')} "
                f"{fmt(r['speedup'], '7.2f')} {fmt(r['tflops'], '8.1f')} {fmt(r['gbps'], '7.0f')} "
                f"{fmt(r['pct_peak_flops'], '6.1f')} {fmt(r['pct_peak_bw'], '5.1f')}"
                f" {fmt(r.get('ms_graph'), '9.4f')} {fmt(r.get('baseline_ms_graph'), '9.4f')}"
                f" {fmt(r.get('speedup_graph'), '7.2f')}")
        print(line + (f"  ERROR {r['error']}" if r.get("error") else "")
              + (f"  ({r['note']})" if r.get("note") else ""))


def plot_roofline(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no roofline PNG")
        return False
    peaks = result["peaks"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if peaks["tbps"]:
        xs = [2.0**i for i in range(-2, 13)]
        for label, peak, style in (("fp16 roof", peaks["fp16_tflops"], "k--"),
                                   ("int8 roof", peaks["int8_tops"], "k:")):
            ax.plot(xs, [min(peak, peaks["tbps"] * x) for x in xs], style, label=label, lw=1)
    markers = {"int8_linear": "o", "int8_fused": "D", "int8_gemm": "s", "int4_linear": "^",
               "int4_dequant": "v"}
    for kernel, marker in markers.items():
        rs = [r for r in result["rows"] if r["kernel"] == kernel and r["tflops"]]
        if rs:
            ax.scatter([r["intensity"] for r in rs], [r["tflops"] for r in rs], marker=marker,
                       label=kernel, alpha=0.8)
    base = {(r["M"], r["N"], r["K"]): r for r in result["rows"]
            if r["baseline"] == "cublas_fp16" and r["baseline_ms"]}
    if base:  # cuBLAS fp16 at its own intensity (fp16 weights: twice or four times the bytes)
        xs = [2 * M * N * K / (2 * M * K + 2 * N * K + 2 * M * N) for M, N, K in base]
        ys = [2 * M * N * K / r["baseline_ms"] / 1e9 for (M, N, K), r in base.items()]
        ax.scatter(xs, ys, marker="x", color="gray", label="cublas_fp16")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("TFLOP/s (TOP/s for int8)")
    ax.set_title(f"slimformer kernels on {result['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(out_dir: str | os.PathLike | None = "bench/results", dry_run: bool = False,
        budget_s: float = BUDGET_S) -> dict:
    """Benchmark, write kernels_<gpu-slug>.json (+ .png) into out_dir, return the result."""
    t0 = time.time()
    if dry_run:  # must precede the first kernel import
        os.environ["TRITON_INTERPRET"] = "1"
        device, name = torch.device("cpu"), "cpu-dry-run"
        shapes, ms8, ms4 = [("tiny", 72, 160)], [1, 17], [1, 17]
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("bench/kernels.py needs a CUDA GPU (or --dry-run)")
        device, name = torch.device("cuda"), torch.cuda.get_device_name()
        shapes, ms8, ms4 = SHAPES, INT8_MS, INT4_MS
    peaks = device_peaks(name, device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows, weights = [], {}
    jobs = [(kind, s, M) for s in shapes  # shape-major: a budget overrun drops whole shapes
            for kind, ms in (("int8", ms8), ("int4", ms4)) for M in ms]
    for kind, (shape, N, K), M in jobs:
        if time.time() - t0 > budget_s:
            rows.append(dict(make_row(f"{kind}_linear", M, N, K, None, "cublas_fp16", None,
                                      2 * M * N * K, 1, None, None),
                             shape=shape, error=f"skipped: over the {budget_s:.0f} s budget"))
            continue
        try:
            if kind == "int8":
                rows += int8_rows(shape, M, N, K, device, peaks, gen)
            else:
                rows += int4_rows(shape, M, N, K, device, peaks, gen, weights)
        except Exception as e:  # one failing row must not lose the others
            rows.append(dict(make_row(f"{kind}_linear", M, N, K, None, "cublas_fp16", None,
                                      2 * M * N * K, 1, None, None),
                             shape=shape, error=f"{type(e).__name__}: {e}"))
        print(f"[{time.time() - t0:6.1f}s] {kind} {shape} M={M}", flush=True)
    result = {
        "device": name, "torch": torch.__version__, "triton": _triton_version(),
        "peaks": peaks, "int4_block_size": INT4_BLOCK, "wall_s": None,
        "int8_min_m": int8_min_m(rows, shapes), "rows": rows,
    }
    print_table(rows)
    print("\nINT8_MIN_M for slimformer/kernels/int8_linear.py (smallest M where int8 wins):")
    print("INT8_MIN_M = {" + ", ".join(f"({k.replace('x', ', ')}): {v}"
                                        for k, v in result["int8_min_m"].items()) + "}")
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="slimformer-kernels-")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_{slug(name)}.json"
    result["wall_s"] = round(time.time() - t0, 1)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path} in {result['wall_s']} s")
    if plot_roofline(result, out / f"kernels_{slug(name)}.png"):
        print(f"wrote {out / f'kernels_{slug(name)}.png'}")
    return result


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default bench/results; a temp "
                   "folder for --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: tiny shape, CPU interpreter")
    p.add_argument("--budget-s", type=float, default=BUDGET_S)
    a = p.parse_args(argv)
    out = a.out if a.out is not None else (None if a.dry_run else "bench/results")
    result = run(out, dry_run=a.dry_run, budget_s=a.budget_s)
    return 1 if any(r.get("error") and not r["error"].startswith("skipped") for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
