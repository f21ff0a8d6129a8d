"""Attention replacement: latency vs sequence length (op and whole model), and fidelity on MiniLM.

    .venv/bin/python bench/attention.py cpu        # ORT CPU, 512..8192 -> results/attention_cpu.json (+ .png)
    .venv/bin/python bench/attention.py fidelity   # MiniLM local / linear after recovery (merged into the JSON)
    .venv/bin/python bench/attention.py fidelity-graph --kind local   # the pass alone, no ONNX: faster
    python bench/attention.py gpu [--dry-run]      # Triton vs torch SDPA -> results/attention_gpu_<device>.json

cpu: every system is exported with torch.onnx.export(dynamo=True) and run by ONNX Runtime's CPU
provider (2 threads, batch 1). "op" times the attention alone at BERT-base shape (12 heads x 64):
softmax as matmul -> softmax -> matmul and as ORT's MultiHeadAttention kernel (speedups are
over the faster of the two at each length), linear (Hedgehog features, 2 x 128 by default, +
the chunked/plain matmul form; linear_f64 with 2 x 64, the head dim), local (window 256, 1
global token), hybrid (local's window + the other keys through linear attention, 2 x 128
features). "model" times a 2-layer BERT-base-width model
(random weights, 8192 positions) compiled by slimformer for cpu-fp32, with and without
attention replacement. Ratios are within one run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: import from the repository root, not bench/,
    # where kernels.py would shadow the `kernels` package that transformers (>= 5.25) imports
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
from bench.common import DATA_DIR, RESULTS_DIR, machine_info, now_iso, time_round_robin  # noqa: E402

HEADS, HEAD_DIM, HIDDEN, FFN, LAYERS, MAX_POS = 12, 64, 768, 3072, 2, 8192
WINDOW, GLOBAL = 256, 1
# The "linear_f64" rows: Hedgehog with as many projections per sign as the head dim (the paper's
# size), against the default max(head dim, 128) of the "linear" rows.
NARROW_FEATURES = HEAD_DIM
SEQS = (512, 1024, 2048, 4096, 8192)


# ---------------------------------------------------------------------------------------------
# CPU: ONNX Runtime
# ---------------------------------------------------------------------------------------------


class SoftmaxOp(torch.nn.Module):
    def forward(self, q, k, v):
        from slimformer.compiler.lower_onnx import explicit_attention
        return explicit_attention(q, k, v)


class SoftmaxMHAOp(torch.nn.Module):
    """Softmax attention as ONNX Runtime's own MultiHeadAttention kernel (what cpu-fp32 lowers
    encoder SDPA to): faster than the explicit form at long lengths, slower at short ones."""
    def forward(self, q, k, v):
        from slimformer.compiler.lower_onnx import multihead_attention
        return multihead_attention(q, k, v)


class LinearOp(torch.nn.Module):
    def __init__(self, causal: bool, feature_dim: int | None = None):
        super().__init__()
        from slimformer.passes.feature_maps import default_feature_dim, hedgehog_init
        self.causal = causal
        torch.manual_seed(0)
        f = feature_dim or default_feature_dim(HEAD_DIM)
        self.register_buffer("wq", hedgehog_init(HEADS, HEAD_DIM, f))
        self.register_buffer("wk", hedgehog_init(HEADS, HEAD_DIM, f))

    def forward(self, q, k, v):
        from slimformer.kernels.naive_attention import linear_attention_chunked
        from slimformer.passes.feature_maps import hedgehog_features
        return linear_attention_chunked(hedgehog_features(q, self.wq), hedgehog_features(k, self.wk), v, self.causal)


class LocalOp(torch.nn.Module):
    def forward(self, q, k, v):
        from slimformer.kernels.naive_attention import block_sparse_attention_blocked
        return block_sparse_attention_blocked(q, k, v, None, WINDOW, GLOBAL, False)


class HybridOp(LinearOp):
    """local's window in softmax + every other key through the default Hedgehog features."""
    def __init__(self):
        super().__init__(False)

    def forward(self, q, k, v):
        from slimformer.kernels.naive_attention import hybrid_attention_blocked
        from slimformer.passes.feature_maps import hedgehog_features
        return hybrid_attention_blocked(q, k, v, hedgehog_features(q, self.wq), hedgehog_features(k, self.wk),
                                        None, WINDOW, GLOBAL, False)


def ort_session(data: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def export_op(module: torch.nn.Module) -> bytes:
    import contextlib
    import io
    import warnings

    x = torch.randn(1, HEADS, 300, HEAD_DIM)
    seq = torch.export.Dim("seq", min=2, max=MAX_POS)
    shapes = {n: {2: seq} for n in ("q", "k", "v")}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module.eval(), (x, x, x), dynamic_shapes=shapes, dynamo=True,
                                 input_names=["q", "k", "v"], optimize=True)
    return prog.model_proto.SerializeToString()


def bert_model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=MAX_POS)
    return tf.BertModel(cfg, add_pooling_layer=False).eval()


def compile_models() -> dict:
    """slimformer cpu-fp32 sessions of the same random model: softmax, linear, local, hybrid
    (the attention weights' values do not change the time: short fits)."""
    import slimformer

    model = bert_model()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(1000, 30000, (2, 256), generator=g),
              "attention_mask": torch.ones(2, 256, dtype=torch.long)}]
    variants = {"softmax": {}, "linear": {"attention": "linear", "attention_transfer_steps": 20,
                                          "attention_recover_steps": 0},
                f"linear_f{NARROW_FEATURES}": {"attention": "linear", "attention_transfer_steps": 20,
                                               "attention_feature_dim": NARROW_FEATURES, "attention_recover_steps": 0},
                "local": {"attention": "local", "attention_window": WINDOW, "global_tokens": GLOBAL,
                          "attention_recover_steps": 0},
                "hybrid": {"attention": "hybrid", "attention_window": WINDOW, "global_tokens": GLOBAL,
                           "attention_transfer_steps": 20, "attention_hedgehog_steps": 20,
                           "attention_recover_steps": 0}}
    out = {}
    for name, opts in variants.items():
        compiled = slimformer.compile(model, "cpu-fp32", calib[0], calib, **opts)
        out[name] = ort_session(compiled.model_bytes)
    return out


SOFTMAX_ROWS = ("softmax", "softmax_mha")


def _ratios(ms: dict) -> dict:
    """Each replacement's speedup over the faster softmax row at that length."""
    best = min(ms[k] for k in SOFTMAX_ROWS if k in ms)
    return {k: round(best / v, 2) for k, v in ms.items() if k not in SOFTMAX_ROWS}


def run_cpu(seqs, runs: int, parts=("op", "model")) -> dict:
    rows = {"op": [], "model": []}
    if "op" not in parts:
        seqs_op = []
    else:
        seqs_op = seqs
    ops = {"softmax": SoftmaxOp(), "softmax_mha": SoftmaxMHAOp(), "linear": LinearOp(False),
           "linear_causal": LinearOp(True), "local": LocalOp(),
           f"linear_f{NARROW_FEATURES}": LinearOp(False, NARROW_FEATURES), "hybrid": HybridOp()}
    sessions = {n: ort_session(export_op(m)) for n, m in ops.items()} if seqs_op else {}
    for T in seqs_op:
        x = np.random.default_rng(0).standard_normal((1, HEADS, T, HEAD_DIM)).astype(np.float32)
        feeds = {"q": x, "k": x, "v": x}
        calls = {n: (lambda s=s, f=feeds: s.run(None, f)) for n, s in sessions.items()}
        ms = time_round_robin(calls, runs=runs, warmup=0, per_turn=runs)
        rows["op"].append({"seq": T, "ms": {k: round(v, 2) for k, v in ms.items()}, "speedup": _ratios(ms)})
        print("op", T, rows["op"][-1], flush=True)
    if "model" not in parts:
        return rows
    del sessions  # ORT keeps each session's arena: free the op sessions' memory first
    models = compile_models()
    for T in seqs:
        ids = np.random.default_rng(1).integers(1000, 30000, (1, T)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, T), dtype=np.int64)}
        calls = {n: (lambda s=s, f=feeds: s.run(None, f)) for n, s in models.items()}
        ms = time_round_robin(calls, runs=runs, warmup=0, per_turn=runs)
        rows["model"].append({"seq": T, "ms": {k: round(v, 2) for k, v in ms.items()}, "speedup": _ratios(ms)})
        print("model", T, rows["model"][-1], flush=True)
    return rows


def plot(rows: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("op", "model")):
        seqs = [r["seq"] for r in rows[key]]
        for name in rows[key][0]["ms"]:
            ax.plot(seqs, [r["ms"][name] for r in rows[key]], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("ms (ORT CPU, batch 1)")
        ax.set_title("attention op (12 x 64)" if key == "op" else "2-layer BERT-base width, cpu-fp32")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# ---------------------------------------------------------------------------------------------
# Fidelity: MiniLM at 256 tokens of long text, after recovery
# ---------------------------------------------------------------------------------------------


def long_text_batches(tokenizer, seq: int, n_batches: int, batch: int, offset: int = 0) -> list[dict]:
    """Consecutive windows of `seq` tokens ([CLS] ... [SEP]) cut from bench/data/long_text.txt."""
    ids = tokenizer((DATA_DIR / "long_text.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    body = seq - 2
    rows = []
    for i in range(n_batches * batch):
        start = ((offset + i) * body // 2) % max(len(ids) - body, 1)  # half-overlapping windows
        rows.append([tokenizer.cls_token_id, *ids[start:start + body], tokenizer.sep_token_id])
    t = torch.tensor(rows)
    return [{"input_ids": t[i:i + batch], "attention_mask": torch.ones_like(t[i:i + batch])}
            for i in range(0, len(rows), batch)]


@torch.no_grad()
def pooled_cosines(model, compiled, batches) -> dict:
    """Cosine of mean-pooled embeddings (sentence-transformers' MiniLM pooling), per sample."""
    cos = []
    for b in batches:
        m = b["attention_mask"].unsqueeze(-1).float()
        ref = (model(**b).last_hidden_state * m).sum(1) / m.sum(1)
        got = (compiled(**b).last_hidden_state * m).sum(1) / m.sum(1)
        cos += torch.nn.functional.cosine_similarity(ref, got, dim=-1).tolist()
    return {"cos_min": min(cos), "cos_mean": sum(cos) / len(cos)}


def run_fidelity(seq: int = 256, recover_steps: int | None = None) -> dict:
    import transformers as tf

    import slimformer
    from bench.common import minilm_dir

    tok = tf.AutoTokenizer.from_pretrained(minilm_dir())
    calib = long_text_batches(tok, seq, n_batches=8, batch=4)  # windows 0..31: the first ~4200 tokens
    held = long_text_batches(tok, seq, n_batches=2, batch=4, offset=40)  # windows 40..47: unseen text
    out = {}
    for name, opts in {"local": {"attention": "local", "attention_window": 64, "global_tokens": 1},
                       "linear": {"attention": "linear"}}.items():
        if recover_steps is not None:
            opts["attention_recover_steps"] = recover_steps
        model = tf.AutoModel.from_pretrained(minilm_dir()).eval()
        t0 = time.perf_counter()
        compiled = slimformer.compile(model, "cpu-fp32", calib[0], calib, validation=held, **opts)
        rec = compiled.report.passes[0]
        out[name] = {"options": opts, "seq": seq, "final_fidelity_held_out": compiled.report.final_fidelity,
                     "pooled_cosine_held_out": pooled_cosines(model, compiled, held),
                     "fidelity_after_pass_calibration": rec.fidelity, "summary": rec.summary,
                     "recover": rec.details.get("recover"), "seconds": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(out[name]), flush=True)
    return out


def run_fidelity_graph(kind: str, transfer_steps: int, transfer_lr: float, recover_steps: int,
                       recover_lr: float, seq: int = 256, min_cos: float | None = None,
                       feature_dim: int | None = None, hedgehog_steps: int | None = None) -> dict:
    """The replace_attention pass alone on MiniLM's traced graph (no ONNX export, one torch
    thread: minutes instead of tens of minutes on a busy 2-core machine); held-out fidelity
    (token-level, as the report's, and of mean-pooled embeddings) before and after the
    end-to-end step. Same calibration / held-out windows as `fidelity`."""
    import transformers as tf

    from bench.common import minilm_dir
    from slimformer.compiler import frontend
    from slimformer.compiler.numerics import compare, run_batches
    from slimformer.compiler.pass_manager import CompileContext, PassManager
    from slimformer.compiler.report import Report
    from slimformer.passes.replace_attention import ReplaceAttention, _distill_or_revert

    torch.set_num_threads(1)
    tok = tf.AutoTokenizer.from_pretrained(minilm_dir())
    calib = long_text_batches(tok, seq, n_batches=8, batch=4)
    held = long_text_batches(tok, seq, n_batches=2, batch=4, offset=40)
    model = tf.AutoModel.from_pretrained(minilm_dir()).eval()
    gm = frontend.export(model, calib[0])
    ctx = CompileContext(model, calib, run_batches(model, calib), 0.995, {}, None, Report("probe", "MiniLM", 0.995))
    opts = {"kind": kind, "transfer_steps": transfer_steps, "transfer_lr": transfer_lr, "recover_steps": 0,
            "min_cos": min_cos}
    if kind in ("local", "hybrid"):
        opts.update(window=64, global_tokens=1)
    if kind in ("linear", "hybrid"):
        opts.update(feature_dim=feature_dim, hedgehog_steps=hedgehog_steps)
    gm = PassManager([ReplaceAttention(**opts)]).run(gm, ctx)
    held_ref = run_batches(model, held)

    def held_out():
        outs = run_batches(gm, held)
        pooled = []
        for r, o, b in zip(held_ref, outs, held):
            m = b["attention_mask"].unsqueeze(-1).float()
            pooled += torch.nn.functional.cosine_similarity((r[0] * m).sum(1), (o[0] * m).sum(1), dim=-1).tolist()
        return {"token": compare(held_ref, outs, held).as_dict(),
                "pooled": {"cos_min": min(pooled), "cos_mean": sum(pooled) / len(pooled)}}

    result = {"options": {**opts, "recover_steps": recover_steps, "recover_lr": recover_lr},
              "layers": ctx.report.passes[-1].details["layers"], "after_transfer": held_out()}
    if min_cos is not None:
        result["auto"] = ctx.report.passes[-1].details["auto"]
    if recover_steps:
        ctx.reference = ctx.original_reference  # the pass manager rebased it to the rewritten graph
        result["recover"] = _distill_or_revert(gm, ctx, recover_steps, recover_lr)
        result["after_recover"] = held_out()
    print(kind, json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# GPU: Triton kernels vs torch SDPA (flash), fp16
# ---------------------------------------------------------------------------------------------


def _wide_features(q, k):
    """Hedgehog features of the default size, (1, H, T, 2 x 128), from a seeded init."""
    from slimformer.passes.feature_maps import default_feature_dim, hedgehog_features, hedgehog_init

    torch.manual_seed(0)
    w = hedgehog_init(HEADS, HEAD_DIM, default_feature_dim(HEAD_DIM)).to(q.device, q.dtype)
    return hedgehog_features(q, w), hedgehog_features(k, w)


def _gpu_systems(q, k, v, phi_q, phi_k) -> dict:
    import torch.nn.functional as F

    local = torch.ops.slimformer.block_sparse_attention
    wide_q, wide_k = _wide_features(q, k)
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "linear": lambda: torch.ops.slimformer.linear_attention(phi_q, phi_k, v, False, 1e-6),
        "linear_causal": lambda: torch.ops.slimformer.linear_attention(phi_q, phi_k, v, True, 1e-6),
        "linear_hedgehog": lambda: torch.ops.slimformer.linear_attention(wide_q, wide_k, v, False, 1e-6),
        "local": lambda: local(q, k, v, None, WINDOW, GLOBAL, False, HEAD_DIM ** -0.5),
        "hybrid": lambda: torch.ops.slimformer.hybrid_attention(q, k, v, wide_q, wide_k, None, WINDOW, GLOBAL, False,
                                                                HEAD_DIM ** -0.5, 1e-6),
    }


def run_gpu(seqs, dry_run: bool = False) -> dict:
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        seqs, device = (37,), torch.device("cpu")
    else:
        device = torch.device("cuda")
    os.environ["SLIMFORMER_KERNELS"] = "triton"
    import torch.nn.functional as F

    from slimformer.kernels import naive_attention as ref
    from slimformer.kernels import ops  # noqa: F401

    dtype = torch.float32 if dry_run else torch.float16
    rows = []
    for T in seqs:
        q, k, v = (torch.randn(1, HEADS, T, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
        phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
        fns = _gpu_systems(q, k, v, phi_q, phi_k)
        checks = {
            "linear": ref.linear_attention_ref(phi_q, phi_k, v, False),
            "local": ref.block_sparse_attention_ref(q, k, v, None, WINDOW, GLOBAL, False),
        }
        if dry_run:  # the quadratic reference of the hybrid (T x T): short lengths only
            wide_q, wide_k = _wide_features(q, k)
            checks["hybrid"] = ref.hybrid_attention_ref(q, k, v, wide_q, wide_k, None, WINDOW, GLOBAL, False)
        row = {"seq": T, "ms": {}, "max_err": {}}
        for name, fn in fns.items():
            out = fn()
            if name in checks:
                row["max_err"][name] = float((out.float() - checks[name].float()).abs().max())
            if dry_run:
                t0 = time.perf_counter()
                fn()
                row["ms"][name] = (time.perf_counter() - t0) * 1e3
            else:
                import triton.testing
                row["ms"][name] = triton.testing.do_bench(fn, warmup=10, rep=50)
        rows.append(row)
        print(row, flush=True)
    name = "cpu-dry-run" if dry_run else torch.cuda.get_device_name().lower().replace(" ", "-")
    return {"device": name, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["cpu", "fidelity", "fidelity-graph", "gpu"])
    p.add_argument("--kind", default="local", help="fidelity-graph: local | linear | hybrid")
    p.add_argument("--transfer-steps", type=int, default=100)
    p.add_argument("--transfer-lr", type=float, default=1e-4)
    p.add_argument("--recover-lr", type=float, default=2e-5)
    p.add_argument("--seqs", default=",".join(map(str, SEQS)))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--parts", default="op,model", help="cpu mode: op, model or both")
    p.add_argument("--recover-steps", type=int, default=None)
    p.add_argument("--min-cos", type=float, default=None,
                   help="fidelity-graph: replace only the layers that keep this min cosine (layers 'auto')")
    p.add_argument("--feature-dim", type=int, default=None,
                   help="fidelity-graph, linear / hybrid: Hedgehog projections per sign (default: max(head dim, 128))")
    p.add_argument("--hedgehog-steps", type=int, default=None,
                   help="fidelity-graph, linear / hybrid: Hedgehog fit steps (default: --transfer-steps)")
    p.add_argument("--dry-run", action="store_true", help="gpu mode on CPU tensors (Triton interpreter)")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    seqs = [int(s) for s in args.seqs.split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.mode == "gpu":
        result = run_gpu(seqs, args.dry_run)
        (out_dir / f"attention_gpu_{result['device']}.json").write_text(json.dumps(result, indent=1))
        return 0
    path = out_dir / "attention_cpu.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved.update({"date": now_iso(), "machine": machine_info()})
    if args.mode == "cpu":
        os.environ.setdefault("SLIMFORMER_KERNELS", "reference")
        latency = run_cpu(seqs, args.runs, args.parts.split(","))
        saved["latency"] = {**saved.get("latency", {}), **{k: v for k, v in latency.items() if v}}
        saved["latency_note"] = (f"batch 1, ORT CPU 2 threads; op: {HEADS} heads x {HEAD_DIM}; model: {LAYERS} layers, "
                                 f"hidden {HIDDEN}, FFN {FFN}, random weights; local: window {WINDOW}, {GLOBAL} global")
        saved["plot"] = "attention_cpu.png" if plot(saved["latency"], out_dir / "attention_cpu.png") else None
    elif args.mode == "fidelity-graph":
        os.environ.setdefault("SLIMFORMER_KERNELS", "reference")
        res = run_fidelity_graph(args.kind, args.transfer_steps, args.transfer_lr, args.recover_steps or 0,
                                 args.recover_lr, min_cos=args.min_cos, feature_dim=args.feature_dim,
                                 hedgehog_steps=args.hedgehog_steps)
        key = f"{args.kind}_t{args.transfer_steps}_r{args.recover_steps or 0}"
        if args.feature_dim:
            key += f"_f{args.feature_dim}"
        if args.hedgehog_steps:
            key += f"_h{args.hedgehog_steps}"
        saved.setdefault("fidelity_graph", {})[key + (f"_auto{args.min_cos}" if args.min_cos else "")] = res
    else:
        os.environ.setdefault("SLIMFORMER_KERNELS", "reference")
        saved["fidelity"] = run_fidelity(recover_steps=args.recover_steps)
    path.write_text(json.dumps(saved, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
