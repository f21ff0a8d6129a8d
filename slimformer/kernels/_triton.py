"""When may a custom op run its Triton kernel? Shared helpers for the kernel modules.

A Triton kernel runs on CUDA tensors, or on CPU tensors under Triton's interpreter, which
needs `TRITON_INTERPRET=1` in the environment *before* the kernel module is imported (the
`@triton.jit` decorator reads it). Kernel modules are therefore imported lazily, on first
use, and each remembers whether it was built for the interpreter (`INTERPRET`).

`SLIMFORMER_KERNELS` overrides the choice: `auto` (default), `reference` (never Triton, e.g.
for fast end-to-end CPU tests under a global TRITON_INTERPRET=1), `triton` (always; errors
where Triton cannot run).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    """True where the op should call its Triton kernel for input `x`, else its reference."""
    mode = os.environ.get("SLIMFORMER_KERNELS", "auto")
    if mode == "reference":
        return False
    if mode not in ("auto", "triton"):
        raise ValueError(f"SLIMFORMER_KERNELS must be auto, reference or triton, got {mode!r}")
    if not triton_importable():
        if mode == "triton":
            raise RuntimeError("SLIMFORMER_KERNELS=triton but triton is not installed")
        return False
    ok = x.is_cuda or (x.device.type == "cpu" and interpret_requested())
    if mode == "triton" and not ok:
        raise RuntimeError(f"SLIMFORMER_KERNELS=triton: no Triton for a {x.device} tensor "
                           "(CPU tensors need TRITON_INTERPRET=1)")
    return ok


def check_mode(module_interpret: bool, x: torch.Tensor) -> None:
    """A kernel module compiled for the GPU cannot take CPU tensors, and vice versa."""
    if x.device.type == "cpu" and not module_interpret:
        raise RuntimeError("Triton kernels were imported without TRITON_INTERPRET=1; CPU tensors "
                           "need it set before the first kernel import")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 for an H100 SXM); a guess on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def m_bucket(M: int) -> int:
    """Autotuning key for the row count: powers of two up to 4096, so that every new sequence
    length does not trigger a new round of tuning."""
    return min(next_pow2(M), 4096)
