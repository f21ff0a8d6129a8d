"""`slimformer.compile`: trace, run the target's passes with checks, lower, measure."""

from __future__ import annotations

import contextlib
import time

import torch

from slimformer.compiler import frontend
from slimformer.compiler.compiled import CompiledModel, OutputSpec
from slimformer.compiler.graph_utils import param_count, size_mb
from slimformer.compiler.numerics import compare, run_batches
from slimformer.compiler.pass_manager import CompileContext, PassManager
from slimformer.compiler.report import Report
from slimformer.compiler.structure import ATTENTION_OPTIONS, PRUNING_OPTIONS, structural_passes
from slimformer.compiler.targets import get_target
from slimformer.errors import SlimformerError


def compile(
    model: torch.nn.Module,
    target: str = "cpu-int8",
    example_inputs: dict | None = None,
    calibration=None,
    *,
    validation=None,
    training=None,
    fidelity: float = 0.995,
    dump_ir: str | None = None,
    progress=None,
    **options,
) -> CompiledModel:
    """Compresses `model` for `target`.

    example_inputs: a dict of the forward's keyword arguments (batch and sequence >= 2 are best).
    calibration: an iterable of such dicts; when None, the example inputs serve.
    validation: held-out dicts for the final fidelity of the lowered model (default: calibration);
        distillation also keeps its parameters only as far as these agree they improved.
    training: more input dicts that pruning's recovery fits on: least squares and distillation
        (recover_steps) (default: calibration). Both fit a few hundred sentences and lose
        held-out text; a few thousand varied ones generalise.
    fidelity: the cosine budget the quantization passes keep (min over samples).
    progress: a rich.progress.Progress to show long steps on, or None.
    """
    start = time.perf_counter()
    tgt = get_target(target)
    if not 0.0 < fidelity <= 1.0:
        raise SlimformerError(f"fidelity must be in (0, 1], got {fidelity}", "e.g. --fidelity 0.995")
    _check_option_names(tgt, options)
    # Built first: an out-of-range option fails before minutes of tracing and calibration.
    pipeline = structural_passes(options) + tgt.pipeline(options)
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    batches = list(calibration) if calibration is not None else [example_inputs]
    if not batches:
        raise SlimformerError("the calibration set is empty", "pass at least one input dict")
    held_out = list(validation) if validation is not None else batches
    model.eval()
    with torch.no_grad():
        task = progress.add_task("reference outputs", total=len(batches) + len(held_out)) if progress else None
        reference = []
        for b in batches:
            reference.append(run_batches(model, [b])[0])
            progress and progress.advance(task)
        held_ref = []
        for b in held_out:
            held_ref.append(run_batches(model, [b])[0])
            progress and progress.advance(task)
        outputs = OutputSpec.of(model(**example_inputs))
    gm = frontend.export(model, example_inputs)
    report = Report(target=target, model=type(model).__name__, fidelity_budget=fidelity,
                    size_before_mb=size_mb(model), params_before=param_count(model))
    ctx = CompileContext(model, batches, reference, fidelity, options, progress, report,
                         training=list(training) if training is not None else None,
                         validation=held_out if validation is not None else None,
                         validation_reference=held_ref if validation is not None else None)
    gm = PassManager(pipeline, dump_ir=dump_ir).run(gm, ctx)
    report.params_after = param_count(gm)
    lower_start = time.perf_counter()
    compiled = tgt.lower(gm, ctx, outputs, options)
    final = compare(held_ref, [_flat(compiled(**b)) for b in held_out], held_out)
    report.final_fidelity = final.as_dict()
    report.lowering = {"summary": f"{tgt.device}: {type(compiled).__name__}",
                       "seconds": time.perf_counter() - lower_start,
                       "samples": sum(_batch_size(b) for b in held_out)}
    report.size_after_mb = compiled_size_mb(compiled, gm)
    report.seconds_total = time.perf_counter() - start
    return compiled


def _flat(out):
    from slimformer.compiler.numerics import flat_tensors
    return flat_tensors(out)


def _batch_size(b: dict) -> int:
    t = next((v for v in b.values() if isinstance(v, torch.Tensor)), None)
    return int(t.shape[0]) if t is not None and t.dim() else 1


def compiled_size_mb(compiled: CompiledModel, gm) -> float:
    data = getattr(compiled, "model_bytes", None)
    return len(data) / 1e6 if data is not None else size_mb(gm)


def default_example_inputs(model: torch.nn.Module) -> dict:
    """Random token ids (batch 2 x 16) for a Hugging Face-style model with a config."""
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        raise SlimformerError("no example_inputs given and the model has no config.vocab_size",
                              "pass example_inputs={'input_ids': ..., 'attention_mask': ...}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    with contextlib.suppress(Exception):
        import inspect
        if "attention_mask" in inspect.signature(model.forward).parameters:
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


def _check_option_names(tgt, options: dict) -> None:
    """A misspelt option would otherwise be ignored without a word."""
    known = set(PRUNING_OPTIONS) | set(ATTENTION_OPTIONS) | set(tgt.options)
    unknown = sorted(set(options) - known)
    if unknown:
        import difflib
        hints = [f"'{u}' -> '{m[0]}'?" for u in unknown if (m := difflib.get_close_matches(u, known, 1))]
        raise SlimformerError(f"unknown option(s) for target {tgt.name}: {', '.join(unknown)}",
                              " ".join(hints) or f"options it takes: {', '.join(sorted(known))}")
