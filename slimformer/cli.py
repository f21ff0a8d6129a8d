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

from slimformer.errors import SlimformerError

console = Console(stderr=False)
err_console = Console(stderr=True)

BUILTIN_CALIBRATION = Path(__file__).parent / "data" / "calibration.txt"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except SlimformerError as e:
        err_console.print(f"[bold red]error:[/bold red] {e.message}", highlight=False)
        if e.hint:
            err_console.print(f"  [yellow]hint:[/yellow] {e.hint}", highlight=False)
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted; nothing was written")
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimformer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(metavar="COMMAND")

    c = sub.add_parser("convert", help="compress a Hugging Face model directory")
    c.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory (config.json + weights)")
    c.add_argument("--target", default="cpu-int8", help="cpu-fp32, cpu-int8, ... (default: cpu-int8)")
    c.add_argument("--out", required=True, metavar="OUT_DIR", help="artifact directory to create")
    c.add_argument("--calib", metavar="TEXT_FILE", help="calibration text, one sample per line "
                   "(default: a built-in varied English set)")
    c.add_argument("--fidelity", type=float, default=0.995, help="min cosine budget (default 0.995)")
    c.add_argument("--max-length", type=int, default=128, help="calibration tokens per sample (default 128)")
    c.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (only after success)")
    c.add_argument("--dump-ir", metavar="DIR", help="write the graph after each pass into DIR")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="print an artifact's report")
    i.add_argument("artifact", metavar="OUT_DIR")
    i.add_argument("--json", action="store_true", help="print report.json as is")
    i.set_defaults(func=cmd_inspect)

    t = sub.add_parser("targets", help="list the compilation targets")
    t.set_defaults(func=cmd_targets)
    return p


def cmd_targets(args) -> int:
    from slimformer.compiler.targets import TARGETS, target_names

    for name in target_names():
        console.print(f"{name:10s} {TARGETS[name].description}")
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
    from slimformer.compiler.targets import get_target
    from slimformer.convert import convert_model_dir, read_calibration

    # Cheap checks first, before minutes of loading and calibration.
    get_target(args.target)
    check_destination(args.out, args.force)
    if not 0.0 < args.fidelity <= 1.0:
        raise SlimformerError(f"--fidelity must be in (0, 1], got {args.fidelity}", "e.g. --fidelity 0.995")
    texts = read_calibration(args.calib or BUILTIN_CALIBRATION, user_given=args.calib is not None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    compiled = convert_model_dir(args.model_dir, args.target, args.out, texts, fidelity=args.fidelity,
                                 force=args.force, max_length=args.max_length, dump_ir=args.dump_ir,
                                 console=console)
    compiled.report.print(console)
    console.print(f"wrote {args.out}/model.onnx" if compiled.target.startswith("cpu") else f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
