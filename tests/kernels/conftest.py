"""Kernel tests run the Triton kernels on CPU tensors under Triton's interpreter.

TRITON_INTERPRET=1 must be in the environment before a kernel module is imported (the
`@triton.jit` decorator reads it); slimformer imports its kernel modules lazily, so setting it
here, at collection time, is early enough. (tests/conftest.py sets it for the whole session.)
The compile-for-sm_90 test runs in a subprocess with the variable removed.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
