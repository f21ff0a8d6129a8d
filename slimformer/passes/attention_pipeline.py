"""compile(**options) -> the attention-replacement passes (called by compiler/structure.py).

Options:
  attention                 "linear" | "local" | "hybrid" (local's pattern in softmax + the other
                            keys through Hedgehog linear attention)
  attention_window          local, hybrid: block size W in tokens (default 64); T <= W is exact softmax
  global_tokens             local, hybrid: the first G tokens attend to / are attended by all (default 1)
  attention_layers          which attention blocks (0-based, call order): "2-5", "2,3,4,5",
                            a list of ints, or an int; default all (e.g. "2-5" keeps 0, 1 in softmax);
                            "auto": the most layers, least sensitive first, that keep the
                            calibration min cosine >= attention_min_cos before recovery
  attention_min_cos         with attention_layers="auto": the floor (default 0.98)
  attention_feature_map     linear: "hedgehog" (learned, default) | "elu"; hybrid: "hedgehog"
  attention_feature_dim     linear, hybrid (hedgehog): projections per sign, phi has twice as many
                            features (default: max(head dim, 128)); more fit softmax better, cost O(T F D)
  attention_hedgehog_steps  linear, hybrid: per layer, the Hedgehog fit to the softmax weights (default 400)
  attention_transfer_steps  per layer: the q/k/v projections (and Hedgehog maps) fitted to the
                            original attention output (BERT-style layers; default 150)
  attention_recover_steps   end-to-end distillation steps after the rewrite (default 16, lr 2e-5)
Every option is checked here, before any model is traced.
"""

from __future__ import annotations

import re

from slimformer.compiler.pass_manager import Pass
from slimformer.errors import SlimformerError
from slimformer.passes.feature_maps import FEATURE_MAPS

KINDS = ("linear", "local", "hybrid")
DEFAULT_WINDOW = 64
DEFAULT_GLOBAL_TOKENS = 1
DEFAULT_RECOVER_STEPS = 16  # measured on MiniLM: more, at higher lr, overfits the calibration text
DEFAULT_TRANSFER_STEPS = 150
DEFAULT_HEDGEHOG_STEPS = 400  # MiniLM, 6 layers, F=128, fit alone: held-out pooled mean 0.945 vs 0.935 at 150
DEFAULT_MIN_COS = 0.98  # MiniLM, local window 64, 256 tokens: 3 of 6 layers pass with transfer


def parse_layers(spec) -> list[int] | None:
    """'2-5' | '2,3,4,5' | '1,4-6' | [2, 3] | 3 | None -> sorted unique layer indices (None: all)."""
    if spec is None or spec == "" or spec == "all":
        return None
    hint = "use e.g. --attention-layers 2-5 or 2,3,4,5 (0-based attention blocks)"
    if isinstance(spec, bool):
        raise SlimformerError(f"attention_layers={spec!r} is not a layer list", hint)
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        out = []
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise SlimformerError(f"attention_layers '{spec}': cannot read '{part}'", hint)
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise SlimformerError(f"attention_layers '{spec}': range {lo}-{hi} is empty", hint)
            out += range(lo, hi + 1)
        spec = out
    if not isinstance(spec, (list, tuple)) or not spec or \
            not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec):
        raise SlimformerError(f"attention_layers={spec!r} is not a list of layer indices >= 0", hint)
    return sorted(set(spec))


def _int_option(options: dict, key: str, default: int | None, minimum: int, hint: str) -> int | None:
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SlimformerError(f"{key}={value!r} must be an integer >= {minimum}", hint)
    return value


def attention_passes(options: dict) -> list[Pass]:
    from slimformer.passes.replace_attention import ReplaceAttention

    kind = options.get("attention")
    if kind not in KINDS:
        raise SlimformerError(f"attention='{kind}' is not a kind of attention replacement",
                              f"use one of: {', '.join(KINDS)}")
    window = _int_option(options, "attention_window", DEFAULT_WINDOW, 1, "e.g. --attention-window 64")
    glob = _int_option(options, "global_tokens", DEFAULT_GLOBAL_TOKENS, 0, "e.g. --global-tokens 1 (0: none)")
    recover = _int_option(options, "attention_recover_steps", DEFAULT_RECOVER_STEPS, 0,
                          "e.g. attention_recover_steps=100 (0: no distillation)")
    transfer = _int_option(options, "attention_transfer_steps", DEFAULT_TRANSFER_STEPS, 0,
                           "e.g. attention_transfer_steps=150")
    hedgehog = _int_option(options, "attention_hedgehog_steps", DEFAULT_HEDGEHOG_STEPS, 0,
                           "e.g. attention_hedgehog_steps=400")
    fmap = options.get("attention_feature_map") or "hedgehog"
    if fmap not in FEATURE_MAPS:
        raise SlimformerError(f"attention_feature_map='{fmap}' is unknown", f"use one of: {', '.join(FEATURE_MAPS)}")
    feature_dim = _int_option(options, "attention_feature_dim", None, 1, "e.g. --attention-features 128")
    if kind == "hybrid" and fmap != "hedgehog":
        raise SlimformerError(f"attention='hybrid' needs Hedgehog feature maps, not '{fmap}'",
                              "drop attention_feature_map, or use attention='linear' for ELU features")
    if feature_dim is not None and (kind == "local" or fmap != "hedgehog"):
        raise SlimformerError("attention_feature_dim applies to attention='linear' or 'hybrid' with Hedgehog "
                              "feature maps only", "drop --attention-features, or use --attention linear / hybrid")
    if kind == "linear" and (options.get("attention_window") is not None or options.get("global_tokens") is not None):
        raise SlimformerError("attention_window and global_tokens apply to attention='local' or 'hybrid' only",
                              "drop them, or use --attention local / hybrid")
    auto = options.get("attention_layers") == "auto"
    min_cos = options.get("attention_min_cos")
    if min_cos is not None and not auto:
        raise SlimformerError("attention_min_cos applies to attention_layers='auto' only",
                              "add --attention-layers auto, or drop --attention-min-cos")
    if min_cos is not None and (isinstance(min_cos, bool) or not isinstance(min_cos, (int, float))
                                or not 0 < min_cos <= 1):
        raise SlimformerError(f"attention_min_cos={min_cos!r} must be a cosine in (0, 1]",
                              "e.g. --attention-min-cos 0.98")
    return [ReplaceAttention(kind=kind, feature_map=fmap, feature_dim=feature_dim, window=window, global_tokens=glob,
                             layers=None if auto else parse_layers(options.get("attention_layers")),
                             min_cos=(DEFAULT_MIN_COS if min_cos is None else float(min_cos)) if auto else None,
                             transfer_steps=transfer, hedgehog_steps=hedgehog, recover_steps=recover)]
