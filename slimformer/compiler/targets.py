"""The target registry: each target names its pass pipeline and its lowering.

Later capabilities (INT4, the CUDA targets, pruning, attention replacement) register here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from slimformer.compiler.pass_manager import Pass
from slimformer.errors import SlimformerError


@dataclass(frozen=True)
class Target:
    name: str
    device: str  # "cpu" | "cuda"
    description: str
    pipeline: Callable[[dict], list[Pass]]  # options -> passes
    lower: Callable  # (gm, ctx, output_spec, options) -> CompiledModel
    options: tuple[str, ...] = ()  # the compile(**options) keys its pipeline and lowering read


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    _load_builtin()
    if name not in TARGETS:
        known = ", ".join(sorted(TARGETS))
        raise SlimformerError(f"unknown target '{name}'", f"valid targets: {known}")
    return TARGETS[name]


def target_names() -> list[str]:
    _load_builtin()
    return sorted(TARGETS)


def _load_builtin() -> None:
    from slimformer.compiler import (
        cpu_targets,  # noqa: F401  (registers on import)
        cuda_targets,  # noqa: F401  (cuda-*, cpu-int4)
    )
