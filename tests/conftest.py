"""Session-wide test settings.

TRITON_INTERPRET=1: the Triton kernels run on CPU tensors under Triton's interpreter, which is
how the suite checks them without a GPU. It must be set before any kernel module is imported
(`@triton.jit` reads it at decoration time); slimformer imports kernel modules lazily, on the
first op call, so setting it here is early enough. Every CPU call of a custom op with a Triton
kernel then runs that kernel (slowly); set SLIMFORMER_KERNELS=reference to force the
plain-PyTorch references instead (see slimformer/kernels/_triton.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def reference_kernels():
    """SLIMFORMER_KERNELS=reference for a module: plain-PyTorch op references, no Triton (the
    cpu-* targets never need Triton; their int8 act modes run references everywhere)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMFORMER_KERNELS", "reference")
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of many tiny ops: with a second OpenMP thread each op
    waits for a core the machine may not have free (60 s vs 4 s for one fit on a busy 2-core
    box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
