"""Fidelity: per-sample cosine over real tokens (padding left out), max-abs over all outputs."""

from __future__ import annotations

import math

import torch
from transformers.modeling_outputs import BaseModelOutput

from slimformer.compiler.numerics import (
    Fidelity,
    compare,
    flat_tensors,
    run_batches,
    sample_vectors,
)


def _batch():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}


def test_identical_outputs():
    out = torch.randn(2, 4, 8)
    fid = compare([[out]], [[out.clone()]], [_batch()])
    assert fid.cos_min == 1.0 or math.isclose(fid.cos_min, 1.0, abs_tol=1e-6)
    assert fid.max_abs == 0.0
    assert fid.ok(0.999) and Fidelity(0.99, 0.995, 0.1).ok(0.99) and not Fidelity(0.98, 1, 0).ok(0.99)


def test_padding_is_left_out_of_the_cosine():
    ref = torch.randn(2, 4, 8)
    out = ref.clone()
    out[1, 2:] = -100.0  # garbage at padded positions of sample 1
    fid = compare([[ref]], [[out]], [_batch()])
    assert math.isclose(fid.cos_min, 1.0, abs_tol=1e-6)
    assert fid.max_abs > 100  # max-abs sees every element
    vecs = sample_vectors(ref, _batch()["attention_mask"])
    assert [v.numel() for v in vecs] == [32, 16]


def test_cosine_is_per_sample_min_and_mean():
    ref = torch.randn(2, 4, 8)
    out = ref.clone()
    out[0] = -out[0]  # sample 0 flipped: cosine -1
    fid = compare([[ref]], [[out]], [{"input_ids": torch.zeros(2, 4)}])
    assert math.isclose(fid.cos_min, -1.0, abs_tol=1e-6)
    assert math.isclose(fid.cos_mean, 0.0, abs_tol=1e-6)


def test_nan_outputs_give_nan_fidelity():
    ref = torch.randn(2, 4, 8)
    out = ref.clone()
    out[0, 0, 0] = float("nan")
    fid = compare([[ref]], [[out]], [_batch()])
    assert math.isnan(fid.cos_min)
    assert not fid.ok(0.5)


def test_flat_tensors_of_model_outputs():
    h = torch.randn(2, 3, 4)
    out = BaseModelOutput(last_hidden_state=h)
    assert len(flat_tensors(out)) == 1 and flat_tensors(out)[0] is h
    assert len(flat_tensors((h, {"a": h, "b": None}, 3))) == 2


def test_run_batches():
    outs = run_batches(lambda x: (x * 2, x), [{"x": torch.ones(2)}, {"x": torch.zeros(2)}])
    assert len(outs) == 2 and torch.equal(outs[0][0], torch.full((2,), 2.0))
