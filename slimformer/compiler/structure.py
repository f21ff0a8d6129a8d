"""Structural passes (pruning, attention replacement) that run before any target's pipeline.

Order, from the issues: prune (heads, FFN, layers) -> recover -> replace attention (with its
own recovery) -> the target's passes (smooth, quantize, ...). Options are checked here, before
any model is run, so bad input fails fast and nothing is written.
"""

from __future__ import annotations

from slimformer.compiler.pass_manager import Pass

# compile(**options) keys that this module owns; the CLI flags map onto them one to one.
PRUNING_OPTIONS = ("prune_heads", "prune_ffn", "drop_layers", "recover_steps")
ATTENTION_OPTIONS = ("attention", "attention_window", "global_tokens", "attention_layers",
                     "attention_min_cos", "attention_recover_steps", "attention_transfer_steps",
                     "attention_feature_map", "attention_feature_dim", "attention_hedgehog_steps")


def structural_passes(options: dict) -> list[Pass]:
    """The passes that change the model's shape, from compile's options ([] when none is set).
    Raises SlimformerError on an out-of-range option."""
    passes: list[Pass] = []
    if any(options.get(k) for k in PRUNING_OPTIONS):
        from slimformer.passes.prune_pipeline import pruning_passes
        passes += pruning_passes(options)
    if options.get("attention"):
        from slimformer.passes.attention_pipeline import attention_passes
        passes += attention_passes(options)
    return passes
