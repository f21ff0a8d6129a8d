"""Atomic artifact directories: write into a temporary sibling, rename on success.

A failure anywhere leaves nothing half-written, and with `force` the previous directory is
only removed once the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from slimformer.errors import SlimformerError


def check_destination(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise SlimformerError(f"output directory {out} already exists",
                              "choose another --out, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise SlimformerError(f"{out} exists and is not a directory", "choose another --out")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False):
    out = check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if out.exists():
        backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, backup)
    os.replace(tmp, out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
