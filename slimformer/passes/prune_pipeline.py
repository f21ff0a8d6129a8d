"""The structured-compression passes from compile()'s options, checked before any model runs.

Options (compile(**options) / the convert flags):
  prune_heads: fraction of attention heads to remove, in [0, 1)        (--prune-heads)
  prune_ffn: fraction of FFN neurons to remove, in [0, 1)              (--prune-ffn)
  drop_layers: N (drop the N least important layers) or indices "i,j"  (--drop-layers)
  recover_steps: distillation steps after pruning, >= 0                (--recover-steps)
Order: prune_heads, prune_ffn, drop_layers, recover (least squares always runs after a prune).
One cut, not stages: on MiniLM heads 0.25 + FFN 0.4, cutting half, refitting, then cutting the
rest and refitting again gave held-out pooled cosine 0.797 / 0.921 against 0.839 / 0.941. With
distillation in each stage too (half the cut, least squares, 1,000 steps; the rest, least
squares, 1,000 steps; peak lr 2e-4), distillation's held-out error was 0.151 against one
cut's 0.145 (2,000 steps), and the bench's pooled cosine 0.883 / 0.952 (fp32) against
0.884 / 0.968 (int8); 500 + 1,500 steps: 0.161, 0.842 / 0.935.
"""

from __future__ import annotations

import math

from slimformer.compiler.pass_manager import Pass
from slimformer.errors import SlimformerError
from slimformer.passes.drop_layers import DropLayers, parse_drop_spec
from slimformer.passes.prune_ffn import PruneFfn
from slimformer.passes.prune_heads import PruneHeads
from slimformer.passes.recover import Recover


def _fraction(options: dict, key: str) -> float | None:
    value = options.get(key)
    if value is None:
        return None
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise SlimformerError(f"{flag} must be a number in [0, 1), got {value!r}", f"e.g. {flag} 0.25")
    if not 0.0 <= value < 1.0:
        raise SlimformerError(f"{flag} must be in [0, 1), got {value}",
                              f"{flag} is the fraction to remove: e.g. {flag} 0.25 removes a quarter")
    return float(value)


def pruning_passes(options: dict) -> list[Pass]:
    """[prune_heads, prune_ffn, drop_layers, recover] as the options ask; raises SlimformerError
    on an out-of-range fraction, a malformed drop spec or a negative step count."""
    heads = _fraction(options, "prune_heads")
    ffn = _fraction(options, "prune_ffn")
    drop = options.get("drop_layers")
    count, indices = parse_drop_spec(drop) if drop is not None else (None, None)
    steps = options.get("recover_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise SlimformerError(f"--recover-steps must be an integer >= 0, got {steps!r}",
                              "e.g. --recover-steps 200 (0: least squares only)")
    passes: list[Pass] = []
    if heads:
        passes.append(PruneHeads(fraction=heads))
    if ffn:
        passes.append(PruneFfn(fraction=ffn))
    if count or indices:
        passes.append(DropLayers(count=count, indices=indices or []))
    if heads or ffn or steps:
        passes.append(Recover(steps=steps or 0))
    return passes
