"""Where one forward's time goes: a torch.profiler summary and a host-vs-device timing.

Used by bench/e2e_gpu.py for each GPU target (run without CUDA graphs, so that every op and
kernel is visible). Answers: is the forward bound by the host issuing ops or by the kernels;
which kernels take the device time; how many kernels one forward launches; does cuda-int8
really run its int8 kernels on every linear (counts by kernel kind).
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter

import torch

TOP = 15
# kernel name -> kind, first match wins (Triton kernels keep their Python names)
KINDS = [
    ("int8_quant_rows", r"_quant_rows_kernel"),
    ("int8_fused_linear", r"_int8_fused_kernel"),
    ("int8_matmul", r"_int8_matmul_kernel"),
    ("int4_matmul", r"_int4_matmul_kernel"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("cublas_gemm", r"gemm|cutlass|sm\d+_xmma|nvjet|cublas"),
    ("layer_norm", r"layer_norm"),
    ("copy/cast", r"copy|cast|to_copy"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce"),
]
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                "cudaGraphLaunch")


def kernel_kind(name: str) -> str:
    for kind, pat in KINDS:
        if re.search(pat, name, re.IGNORECASE):
            return kind
    return "other"


def _self_device_us(e) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, attr):
            return float(getattr(e, attr))
    return 0.0


def _is_device(e) -> bool:
    dt = getattr(e, "device_type", None)
    return dt is not None and "CUDA" in str(dt)


def host_vs_device(fn, device: torch.device, n: int = 10) -> dict:
    """Median ms to issue one forward (the call returns before the GPU is done, unless the
    forward syncs) and to finish it: issue ~ total means the host is the bottleneck."""
    if device.type != "cuda":
        return {}
    issue, total = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        issue.append((t1 - t0) * 1e3)
        total.append((t2 - t0) * 1e3)
    return {"host_issue_ms": statistics.median(issue), "host_total_ms": statistics.median(total)}


def profile_forward(fn, device: torch.device) -> dict:
    """One (already warmed-up) forward under torch.profiler: top ops by self device and self
    CPU time (kernels and host-side ops ranked apart), kernel count by kind, host wall time vs
    summed kernel time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # profiler start-up aside, the profiled call is a steady-state call
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    events = list(prof.events())
    kernels = [e for e in events if _is_device(e)]
    kinds: Counter = Counter()
    kind_us: Counter = Counter()
    for e in kernels:
        k = kernel_kind(e.name)
        kinds[k] += 1
        kind_us[k] += _self_device_us(e)
    launches = sum(1 for e in events if e.name in LAUNCH_CALLS)
    avgs = list(prof.key_averages())
    kernel_avgs = [a for a in avgs if _is_device(a)]  # kernels (memcpy / memset included)
    cpu_avgs = [a for a in avgs if not _is_device(a)]  # ops, Python-side launch calls

    def top(rows, key):
        rows = sorted(rows, key=key, reverse=True)[:TOP]
        return [{"name": a.key[:90], "count": a.count, "self_device_us": round(_self_device_us(a), 1),
                 "self_cpu_us": round(float(a.self_cpu_time_total), 1)} for a in rows]

    ops = Counter(e.name for e in events if e.name.startswith("slimformer::"))
    return {
        "wall_ms": round(wall_ms, 3),  # with the profiler's own overhead
        "device_kernel_ms": round(sum(_self_device_us(e) for e in kernels) / 1e3, 3),
        "kernels": len(kernels), "launch_calls": launches,
        "kernels_by_kind": dict(kinds.most_common()),
        "device_ms_by_kind": {k: round(v / 1e3, 3) for k, v in kind_us.most_common()},
        "slimformer_ops": dict(ops),
        "top_self_device": top(kernel_avgs, _self_device_us),
        "top_self_cpu": top(cpu_avgs, lambda a: float(a.self_cpu_time_total)),
    }


def print_profile(name: str, p: dict) -> None:
    if not p:
        return
    if "error" in p:
        print(f"\n-- profile {name}: {p['error']}")
        return
    print(f"\n-- profile {name}: wall {p['wall_ms']:.2f} ms (profiled), kernels {p['kernels']} "
          f"({p['device_kernel_ms']:.2f} ms on the device), launch calls {p['launch_calls']}")
    print("   kernels by kind: " + ", ".join(f"{k} {n} ({p['device_ms_by_kind'].get(k, 0):.2f} ms)"
                                             for k, n in p["kernels_by_kind"].items()))
    if p["slimformer_ops"]:
        print("   slimformer ops: " + ", ".join(f"{k} x{n}" for k, n in p["slimformer_ops"].items()))
    for title, key in (("self device", "top_self_device"), ("self CPU", "top_self_cpu")):
        if p[key]:
            print(f"   top by {title} time:   {'count':>6} {'dev us':>9} {'cpu us':>9}")
            for r in p[key]:
                print(f"     {r['name'][:60]:<60} {r['count']:>6} {r['self_device_us']:>9.1f} "
                      f"{r['self_cpu_us']:>9.1f}")
