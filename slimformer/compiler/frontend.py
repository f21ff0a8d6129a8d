"""Front end: nn.Module -> ATen FX graph via torch.export (non-strict), dynamic batch and seq.

The IR every pass edits is the *unlifted* exported module (`ExportedProgram.module()`): a plain
`torch.fx.GraphModule` whose weights are attributes read by `get_attr` nodes, whose nodes keep
`nn_module_stack`, and whose pytree codegen takes the original keyword arguments and returns
the original output structure (e.g. `BaseModelOutput`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import linecache
import logging
import re
import sys

import torch

from slimformer.errors import SlimformerError

MAX_SEQ = 65536


def _dims(max_seq: int):
    return torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=max_seq)


@contextlib.contextmanager
def _no_cache(model: torch.nn.Module):
    """Decoders must be traced with use_cache=False: the HF cache object is not a pytree."""
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "use_cache", None)
    if cfg is not None and old is not None:
        cfg.use_cache = False
    try:
        yield
    finally:
        if cfg is not None and old is not None:
            cfg.use_cache = old


def dynamic_shapes_for(example_inputs: dict, max_seq: int = MAX_SEQ) -> dict:
    """(B, T, ...) tensors get dynamic batch and sequence dims; everything else is static."""
    BATCH, SEQ = _dims(max_seq)
    shapes = {}
    for name, value in example_inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            shapes[name] = {0: BATCH, 1: SEQ}
        elif isinstance(value, torch.Tensor) and value.dim() == 1:
            shapes[name] = {0: BATCH}
        else:
            shapes[name] = None
    return shapes


def trace_examples(example_inputs: dict) -> dict:
    """A size-1 example would specialise its dim, so batch 1 is repeated to batch 2."""
    out = {}
    for name, value in example_inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
            value = value.repeat(2, *([1] * (value.dim() - 1)))
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] < 2:
            raise SlimformerError(
                f"example input '{name}' has sequence length {value.shape[1]}",
                "pass example inputs with at least 2 tokens so the sequence dim stays dynamic",
            )
        out[name] = value
    return out


def check_inputs(model: torch.nn.Module, example_inputs: dict) -> None:
    """Every example input must be a named argument of forward: one that only a `**kwargs`
    would swallow (HF models take `**kwargs`) is a typo, and could not get dynamic dims anyway."""
    params = inspect.signature(model.forward).parameters
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in example_inputs if k not in named]
    if unknown:
        raise SlimformerError(
            f"example input(s) {unknown} are not arguments of {type(model).__name__}.forward",
            f"use the forward's argument names: {named}" if named else
            "the forward must name its inputs (def forward(self, input_ids, attention_mask))",
        )


_EXPORT_HINTS = [
    (r"data.dependent|GuardOnDataDependentSymNode|Could not guard on data-dependent",
     "the model branches on tensor values (data-dependent control flow)",
     "replace the Python `if` on a tensor value with torch.cond/torch.where, or move it out of forward"),
    (r"Constraints violated|specialized|ConstraintViolation",
     "the model fixes the batch or sequence length (a shape was specialised during tracing)",
     "avoid Python ints computed from tensor shapes in forward, or pass example inputs of the size you will run"),
    (r"Unsupported|not supported|UserError",
     "torch.export does not support a construct in this model",
     "see the message above; common fixes: remove hooks, use_cache=False, avoid custom autograd.Functions"),
]


def export(model: torch.nn.Module, example_inputs: dict) -> torch.fx.GraphModule:
    """Trace `model` into the ATen FX graph that every pass edits."""
    if not isinstance(model, torch.nn.Module):
        raise SlimformerError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not example_inputs:
        raise SlimformerError("no example inputs", "pass example_inputs={'input_ids': ..., ...}")
    check_inputs(model, example_inputs)
    model.eval()
    examples = trace_examples(example_inputs)
    max_seq = getattr(getattr(model, "config", None), "max_position_embeddings", None) or MAX_SEQ
    try:
        try:
            ep = _export(model, examples, max_seq)
        except Exception as e:  # e.g. RoBERTa's position offset: torch suggests the true bound
            found = re.search(r"seq = Dim\('seq'.*?max=(\d+)", str(e))
            if not found:
                raise
            max_seq = int(found.group(1))
            ep = _export(model, examples, max_seq)
    except Exception as e:  # translate torch.export's long messages into a named construct
        text = f"{type(e).__name__}: {e}"
        first = text.strip().splitlines()[0][:300]
        where = _user_frame(text)
        for pattern, what, fix in _EXPORT_HINTS:
            if re.search(pattern, text):
                raise SlimformerError(f"cannot trace {type(model).__name__}: {what}{where} ({first})", fix) from e
        raise SlimformerError(f"cannot trace {type(model).__name__}{where}: {first}",
                              "the model must be traceable by torch.export.export(strict=False)") from e
    gm = ep.module()
    gm.meta["example_inputs"] = examples
    gm.meta["max_seq"] = max_seq
    return gm


def _user_frame(text: str) -> str:
    """' at file.py:12 in forward: `if x.sum() > 0:`' from the frame torch.export names (the
    last one under 'The following call raised this error'), or '' where it names none."""
    _, _, tail = text.partition("The following call raised this error")
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', tail)
    if not frames:
        return ""
    path, line, fn = frames[-1]
    code = linecache.getline(path, int(line)).strip()
    name = path.rsplit("/", 1)[-1]
    return f" at {name}:{line} in {fn}" + (f": `{code}`" if code else "")


# torch logs a warning with a whole graph dump for a data-dependent guard; the error says it all.
_QUIET_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export prints the partial graph of a failed trace to stderr (and logs it): on
    failure that is dropped, the SlimformerError says what failed; on success stderr is replayed."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
        sys.stderr.write(buf.getvalue())
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(model, examples: dict, max_seq: int) -> torch.export.ExportedProgram:
    with _no_cache(model), torch.no_grad(), _quiet_torch_logs():
        return torch.export.export(
            model, (), kwargs=examples, dynamic_shapes=dynamic_shapes_for(examples, max_seq), strict=False
        )
