"""What the attention-replacement pass reads off the graph before it rewrites: each attention
site's q, k, v, mask, projection input and output on the calibration batches, and whether its
boolean mask is "padding only" or "causal and padding" (what the replacements can express).

What the original mask meant is read from the calibration run, not guessed from the model
family: each layer's (B, 1, T, S) mask is compared with the two patterns built from the
`attention_mask` input.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from slimformer.compiler.graph_utils import capture
from slimformer.passes import attention_transfer as transfer

KEY_MASK_INPUT = "attention_mask"


def mask_arg(sdpa: Node):
    return sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")


def capture_inputs(gm, sites, batches, key_mask: Node | None) -> dict:
    """Per SDPA node: q, k, mask (or None) per calibration batch, and the key mask input."""
    watch, role = [], {}
    for s in sites:
        q, k, v = s.node.args[:3]
        mask = mask_arg(s.node)
        lins = transfer.projections(s)
        x = lins[0].x if lins else None
        for name, n in (("q", q), ("k", k), ("v", v), ("mask", mask), ("x", x), ("out", s.node)):
            if isinstance(n, Node):
                watch.append(n)
                role.setdefault(n, []).append((s.node, name))
    values = {s.node: {name: [None] * len(batches) for name in ("q", "k", "v", "mask", "x", "out")}
              for s in sites}

    def on_value(node, t, b):
        for sdpa, name in role[node]:
            values[sdpa][name][b] = t.detach().clone()

    if sites:
        capture(gm, list(dict.fromkeys(watch)), batches, on_value)
    for s in sites:
        values[s.node]["key_mask"] = [b.get(KEY_MASK_INPUT) if key_mask is not None else None for b in batches]
    return values


def allowed_keys(causal: bool, key_mask, T: int, S: int) -> torch.Tensor:
    """(B, 1, T, S) bool: what the replacement lets each query see."""
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T) if causal else torch.ones(T, S, dtype=torch.bool)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & (key_mask != 0)[:, None, None, :]
    return allowed


def mask_pattern(vals: dict, sdpa: Node) -> tuple[bool, bool] | None:
    """(causal, uses the attention_mask input) if the original masks match one of the
    patterns the replacement can express on every calibration batch (on real query rows)."""
    is_causal = bool(sdpa.kwargs.get("is_causal", False))
    if vals["mask"][0] is None:
        return is_causal, False
    for causal in ((True,) if is_causal else (False, True)):
        for use_km in (True, False):
            if all(_matches(m, q, k, km, causal, use_km)
                   for m, q, k, km in zip(vals["mask"], vals["q"], vals["k"], vals["key_mask"])):
                return causal, use_km
    return None


def _matches(mask, q, k, key_mask, causal: bool, use_km: bool) -> bool:
    if use_km and key_mask is None:
        return False
    T, S = q.shape[2], k.shape[2]
    expect = allowed_keys(causal, key_mask if use_km else None, T, S)
    rows = (key_mask != 0)[:, None, :, None] if key_mask is not None else torch.ones(1, 1, T, 1, dtype=torch.bool)
    return bool(((mask.bool() == expect) | ~rows).all())
