"""Tile scheduling shared by the GEMM kernels: grouped program order (Triton's matmul tutorial,
"L2 cache optimizations") and autotune configs by row bucket."""

from __future__ import annotations

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
