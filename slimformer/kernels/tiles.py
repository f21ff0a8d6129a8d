"""Tile scheduling shared by the GEMM kernels: grouped program order (Triton's matmul tutorial,
"L2 cache optimizations") and autotune configs by row bucket."""

from __future__ import annotations

import inspect

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n) in grouped order: GROUP_M row tiles walk the column tiles
    together, so each weight tile is reused from L2 while it is there."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_m
    return pid_m, pid_n


def m_bucket_pruner(interpret: bool, small: list, mid: list, large: list):
    """An autotune `early_config_prune`: only the configs meant for the call's row bucket
    (M_BUCKET <= 16, <= 256, larger); under the interpreter, whatever was given."""
    def prune(configs, named_args, **kwargs):
        if interpret:
            return configs
        mb = named_args["M_BUCKET"]
        pick = small if mb <= 16 else mid if mb <= 256 else large
        return [c for c in configs if c in pick]
    return prune


def _autotune_extra() -> dict:
    """Shorter autotune timing where this Triton accepts a custom `do_bench` (3.2+)."""
    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        return {}

    def bench(fn, quantiles):
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    return {"do_bench": bench}


def bucket_autotune(kernel, key: list[str], interpret: bool, interpret_configs: list,
                    small: list, mid: list, large: list, even_k: bool = False):
    """The autotuned launcher of a GEMM kernel: the configs of the call's row bucket only
    (m_bucket_pruner), one modest config under the interpreter; with even_k, the EVEN_K
    constexpr set from K % BLOCK_K. The kernel itself stays a plain JITFunction (the
    compile-only tests build it for sm_90 directly)."""
    if even_k:
        kernel = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(kernel)
    return triton.autotune(
        configs=interpret_configs if interpret else small + mid + large,
        key=key,
        prune_configs_by={"early_config_prune": m_bucket_pruner(interpret, small, mid, large)},
        **_autotune_extra(),
    )(kernel)
