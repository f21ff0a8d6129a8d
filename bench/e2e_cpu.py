"""End-to-end CPU benchmark on MiniLM-L6: torch fp32, ORT fp32, ORT's own int8 (the anchor),
and slimformer's CPU targets, all measured in one run.

    python bench/e2e_cpu.py                      # default targets: cpu-fp32, cpu-int8
    python bench/e2e_cpu.py --targets cpu-fp32 cpu-int8 cpu-int4 \\
        --extra "cpu-int8+prune=--prune-heads 0.25 --prune-ffn 0.4"
    python bench/e2e_cpu.py --skip-slimformer    # baselines only

Speed is compared as a ratio to the anchor timed in the same round (each round gives every
system a turn of 5 timed calls; the ratio is the median over rounds): this machine is noisy, so
absolute times across runs mean little. Fidelity is the cosine of mean-pooled embeddings to
torch fp32 over bench/data/eval_sentences.txt (none of it is calibration text).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: import from the repository root, not bench/,
    # where kernels.py would shadow the `kernels` package that transformers (>= 5.25) imports
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from bench import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ANCHOR = "ort_int8_anchor"
INT4_ANCHOR = "ort_int4_rtn"
SEQ = 128
BUSY = 0.25  # cores busy with other work before the run above which the table says so


class Row:
    """One system: a forward function, its files on disk, and what we measured."""

    def __init__(self, name: str, run=None, files=(), error: str | None = None):
        self.name, self.run, self.files, self.error = name, run, list(files), error
        self.result: dict = {"name": name}


def build_torch(model_dir: str) -> tuple[Row, torch.nn.Module]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()

    def run(feeds):
        with torch.inference_mode():
            pt = {k: torch.from_numpy(v) for k, v in feeds.items()}
            return model(**pt).last_hidden_state.numpy()

    weights = [p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin")]
    return Row("torch_fp32", run, weights), model


class _LastHidden(torch.nn.Module):
    """Positional inputs in, last_hidden_state out: the legacy exporter's calling convention."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args))).last_hidden_state


def export_fp32(model: torch.nn.Module, feeds: dict, path: Path) -> None:
    # The legacy exporter gives the faster ORT graph on this CPU (FACTS.md).
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in feeds]
    wrapper = _LastHidden(model, names).eval()  # eval(): legacy export restores training flags
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    dyn["last_hidden_state"] = {0: "batch", 1: "sequence"}
    torch.onnx.export(wrapper, args, str(path), input_names=names,
                      output_names=["last_hidden_state"], dynamic_axes=dyn,
                      opset_version=17, dynamo=False)
    model.eval()


def ort_int4_row(fp32: Path, path: Path, flush: bool) -> Row:
    """ONNX Runtime's own int4: MatMulNBits, block 32, round-to-nearest (the cpu-int4 rows'
    fidelity anchor; the embeddings stay fp32, as ORT leaves them)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    print("quantizing with onnxruntime MatMulNBitsQuantizer (int4, block 32, RTN) ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True)
    quant = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True, algo_config=config)
    quant.process()
    quant.model.save_model_to_file(str(path))
    return onnx_row(INT4_ANCHOR, path, flush)


def onnx_row(name: str, path: Path, flush: bool) -> Row:
    """flush: ORT flushes denormals to zero (common.ort_session)."""
    try:
        return Row(name, common.ort_runner(common.ort_session(path, flush)), common.onnx_files(path))
    except Exception as e:  # a broken artifact is a result, not a crash
        return Row(name, error=f"load failed: {type(e).__name__}: {e}")


def convert(model_dir: str, target: str, extra: list[str], out: Path, timeout: float) -> str | None:
    """Run `slimformer convert` as a user would; stream its output; return an error or None."""
    cmd = [sys.executable, "-m", "slimformer.cli", "convert", model_dir,
           "--out", str(out), *([] if "--target" in extra else ["--target", target]), *extra]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=15)
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
    except OSError as e:
        return f"could not start convert: {e}"

    def pump():  # in a thread, so a silent hang still hits the timeout below
        for line in proc.stdout:
            print("  | " + line, end="", flush=True)
            tail.append(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"convert timed out after {timeout:.0f}s"
    reader.join()
    print(f"  (convert took {time.perf_counter() - t0:.0f}s, exit {rc})", flush=True)
    if rc != 0:
        return f"convert exited {rc}: " + " / ".join(tail)
    if not (out / "model.onnx").exists():
        return f"convert succeeded but wrote no {out / 'model.onnx'}"
    return None


def slimformer_rows(args, work: Path) -> list[Row]:
    jobs = [(f"slimformer-{t}", t, []) for t in args.targets]
    for spec in args.extra:
        name, _, extra = spec.partition("=")
        # The target is NAME up to the first '+', unless ARGS gives its own --target.
        jobs.append((f"slimformer-{name}", name.split("+")[0], shlex.split(extra)))
    rows = []
    for name, target, extra in jobs:
        out = work / name
        if args.reuse_artifacts and (out / "model.onnx").exists():
            print(f"reusing {out / 'model.onnx'}", flush=True)
            rows.append(onnx_row(name, out / "model.onnx", args.flush))
            continue
        shutil.rmtree(out, ignore_errors=True)  # a rerun with --workdir starts clean
        err = convert(args.model_dir, target, extra, out, args.convert_timeout)
        rows.append(Row(name, error=err) if err else onnx_row(name, out / "model.onnx", args.flush))
    return rows


def measure_quality(rows: list[Row], tokenizer) -> None:
    sentences = common.eval_sentences()
    pairs = common.paraphrase_pairs()
    pair_texts = [a for a, _ in pairs] + [b for _, b in pairs]
    ref = None
    for row in rows:
        if row.error:
            continue
        try:
            emb = common.embed(row.run, tokenizer, sentences)
            rec = common.recall_at_1(common.embed(row.run, tokenizer, pair_texts))
        except Exception as e:
            row.error = f"run failed: {type(e).__name__}: {e}"
            continue
        ref = emb if ref is None else ref  # rows[0] is torch fp32, the reference
        cos = common.cosines(emb, ref)
        row.result.update(min_cos=float(cos.min()), mean_cos=float(cos.mean()),
                          recall_at_1=rec, size_mb=round(common.size_mb(row.files), 1))


def measure_speed(rows: list[Row], tokenizer, args) -> None:
    """Median latencies, and each system's speed as the median of its per-round ratios to the
    anchor timed in the same round (common.time_paired), with their quartiles: the drift of this
    machine cancels inside a round, not across minutes."""
    texts = common.eval_sentences()
    live = [r for r in rows if not r.error]
    for batch, runs, key in ((8, args.runs, "b8"), (1, args.runs_b1, "b1")):
        feeds = common.tokenize(tokenizer, texts[:batch], max_length=SEQ)
        systems = {r.name: (lambda r=r, f=feeds: r.run(f)) for r in live}
        rounds = runs * args.repeat
        print(f"timing batch {batch} x seq {SEQ}: {rounds} rounds, a turn of 5 timed calls per "
              "system per round ...", flush=True)
        times = common.time_paired(systems, rounds, args.warmup)
        for r in live:
            r.result[f"latency_ms_{key}"] = statistics.median(times[r.name])
            if ANCHOR in systems:
                ratios = np.array(times[r.name]) / np.array(times[ANCHOR])
                r.result[f"vs_anchor_{key}"] = float(np.median(ratios))
                if r.name != ANCHOR:
                    r.result[f"vs_anchor_{key}_range"] = [float(np.percentile(ratios, 25)),
                                                          float(np.percentile(ratios, 75))]


COLUMNS = [  # (json key, header, format)
    ("latency_ms_b8", "b8 ms", "{:.1f}"), ("vs_anchor_b8", "b8 vs anchor", "{:.2f}x"),
    ("latency_ms_b1", "b1 ms", "{:.1f}"), ("vs_anchor_b1", "b1 vs anchor", "{:.2f}x"),
    ("min_cos", "min cos", "{:.4f}"), ("mean_cos", "mean cos", "{:.4f}"),
    ("size_mb", "size MB", "{:.1f}"), ("recall_at_1", "recall@1", "{:.3f}"),
]


def cells(result: dict) -> list[str]:
    out = []
    for k, _, fmt in COLUMNS:
        cell = fmt.format(result[k]) if k in result else "-"
        if f"{k}_range" in result:  # paired ratios: the median, and their quartiles
            lo, hi = result[f"{k}_range"]
            cell += f" ({lo:.2f}-{hi:.2f})"
        out.append(cell)
    return out


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MiniLM-L6 on CPU, seq {SEQ} (vs anchor: latency / {ANCHOR}, lower is better)")
    table.add_column("system")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("error", overflow="fold", max_width=50)
    for res in results:
        table.add_row(res["name"], *cells(res), res.get("error", ""))
    # Not a terminal (CI log, pipe): rich would wrap to 80 columns and cut every cell.
    Console(width=None if sys.stdout.isatty() else 170).print(table)


def markdown(results: list[dict], machine: dict, busy: float | None, flush: bool) -> str:
    head = ["system"] + [h for _, h, _ in COLUMNS]
    lines = [
        f"MiniLM-L6 (all-MiniLM-L6-v2), batch 8 and 1 x seq {SEQ}, {machine['cpu']}, "
        f"{machine['cores']} cores, onnxruntime {machine['onnxruntime']}. "
        f"`vs anchor` = latency / ORT `quantize_dynamic` per-channel int8 (lower is better): "
        f"the median over rounds of the ratio within a round (every system gets a turn of 5 "
        f"timed calls per round), with the quartiles of those ratios in brackets; "
        f"cos = mean-pooled embedding vs torch fp32. ONNX models run with 2 intra-op threads"
        + (" and `session.set_denormal_as_zero`, as slimformer's runtime sets it (the anchors "
           "too)." if flush else " and ORT's default session options.")
        + (f" Measured on a busy machine (other processes kept {busy:.1f} cores busy at the "
            f"start): latencies are inflated." if busy is not None and busy > BUSY else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for res in results:
        err = res.get("error", "").replace("|", "/")  # a '|' would split the table cell
        name = res["name"] + (f" (error: {err[:150]})" if err else "")
        lines.append("| " + " | ".join([name, *cells(res)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", default=None, help="HF model dir (default: bundled MiniLM-L6)")
    p.add_argument("--targets", nargs="+", default=["cpu-fp32", "cpu-int8"])
    p.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                   help="extra slimformer variant, e.g. 'cpu-int8+prune=--prune-heads 0.25'")
    p.add_argument("--skip-slimformer", action="store_true", help="baselines only")
    p.add_argument("--runs", type=int, default=20, help="timing rounds at batch 8 (5 timed calls per system each)")
    p.add_argument("--runs-b1", type=int, default=50, help="timing rounds at batch 1")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=1,
                   help="multiplies --runs and --runs-b1 (kept for old command lines)")
    p.add_argument("--convert-timeout", type=float, default=1800)
    p.add_argument("--workdir", default=None, help="keep exported models here (default: temp)")
    p.add_argument("--reuse-artifacts", action="store_true",
                   help="with --workdir: skip `convert` where an artifact is already there "
                        "(to re-time on a quieter machine without converting again)")
    p.add_argument("--ort-defaults", dest="flush", action="store_false",
                   help="run every ONNX model with ORT's default session options; by default "
                        "each session flushes denormals to zero, as slimformer's runtime does")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "cpu_minilm.json"),
                   help="JSON result path; the markdown table goes beside it (.md)")
    args = p.parse_args(argv)
    args.model_dir = args.model_dir or common.minilm_dir()
    if args.reuse_artifacts and not args.workdir:
        p.error("--reuse-artifacts needs --workdir")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    # Set before transformers is first imported: huggingface_hub reads it at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    busy_start = common.busy_cores()
    if busy_start is not None and busy_start > BUSY:
        # Other processes share these 2 cores; torch's OpenMP threads suffer most from it.
        print(f"WARNING: other processes keep {busy_start:.1f} cores busy before the run; "
              "latencies will be inflated and skewed", flush=True)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="e2e_cpu_")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    torch_row, model = build_torch(args.model_dir)
    rows = [torch_row]
    fp32 = work / "ort_fp32" / "model.onnx"
    int8 = work / ANCHOR / "model.onnx"
    fp32.parent.mkdir(exist_ok=True)
    int8.parent.mkdir(exist_ok=True)
    print("exporting fp32 ONNX (legacy exporter) ...", flush=True)
    export_fp32(model, common.tokenize(tokenizer, common.eval_sentences()[:2]), fp32)
    rows.append(onnx_row("ort_fp32", fp32, args.flush))
    print("quantizing with onnxruntime quantize_dynamic (per-channel int8) ...", flush=True)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
    rows.append(onnx_row(ANCHOR, int8, args.flush))
    if any(t.startswith("cpu-int4") for t in args.targets + args.extra):
        rows.append(ort_int4_row(fp32, work / INT4_ANCHOR / "model.onnx", args.flush))
    if not args.skip_slimformer:
        rows += slimformer_rows(args, work)

    print("measuring fidelity and recall ...", flush=True)
    measure_quality(rows, tokenizer)
    measure_speed(rows, tokenizer, args)
    load_end = os.getloadavg()[0]  # includes this process's own ~2 busy threads

    results = []
    for r in rows:
        res = dict(r.result)
        if r.error:
            res["error"] = r.error
        results.append(res)
    machine = common.machine_info()
    elapsed = time.perf_counter() - t_start
    report = {
        "machine": machine,
        "date": common.now_iso(),
        "config": {
            "model_dir": args.model_dir, "seq": SEQ, "batches": [8, 1],
            "rounds_b8": args.runs * args.repeat, "rounds_b1": args.runs_b1 * args.repeat,
            "warmup": args.warmup, "timing": "paired rounds (common.time_paired)",
            "threads": 2, "anchor": ANCHOR, "ort_flush_denormals": args.flush,
            "targets": [] if args.skip_slimformer else args.targets,
            "extra": [] if args.skip_slimformer else args.extra,
            "eval_sentences": len(common.eval_sentences()),
            "paraphrase_pairs": len(common.paraphrase_pairs()),
            "elapsed_s": round(elapsed, 1),
            "load_avg_1min_at_start": round(load_start, 2),
            "busy_cores_at_start": None if busy_start is None else round(busy_start, 2),
            "load_avg_1min_after_timing": round(load_end, 2),
        },
        "rows": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results, machine, busy_start, args.flush))

    print_table(results)
    ref = {r["name"]: r for r in results}
    if "latency_ms_b8" in ref.get("torch_fp32", {}) and "latency_ms_b8" in ref.get(ANCHOR, {}):
        speedup = ref["torch_fp32"]["latency_ms_b8"] / ref[ANCHOR]["latency_ms_b8"]
        print(f"anchor is {speedup:.2f}x faster than torch fp32 at batch 8")
    print(f"wrote {out} and {out.with_suffix('.md')} in {elapsed:.0f}s")
    if tmp:
        tmp.cleanup()
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
