"""Hedgehog feature maps: the initialisation at any feature size, and that more features fit a
spiky softmax attention better (the reason `attention_feature_dim` exists)."""

from __future__ import annotations

import pytest
import torch

from slimformer.passes import feature_maps as fm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("feature_dim", [None, 3, 8, 20])
def test_hedgehog_init_starts_from_the_identity(feature_dim):
    torch.manual_seed(0)
    w = fm.hedgehog_init(2, 8, feature_dim)  # (H, D, F)
    f = feature_dim or 8
    n = min(8, f)
    assert w.shape == (2, 8, f)
    torch.testing.assert_close(w[:, :, :n], torch.eye(8)[:, :n].expand(2, 8, n))
    if f > 8:  # the extra directions are random, not zero (zero columns would stay uniform)
        assert (w[:, :, 8:].abs().sum((1, 2)) > 0).all()


def _spiky_samples(n=3, heads=2, t=48, d=8):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        q = torch.randn(1, heads, t, d, generator=g) * 2.0
        k = q[:, :, torch.randperm(t, generator=g)] + 0.3 * torch.randn(1, heads, t, d, generator=g)
        out.append((q, k, torch.ones(1, 1, t, t, dtype=torch.bool)))
    return out  # each query has one strongly matching key: a peaked softmax


def test_more_features_fit_spiky_attention_better():
    samples = _spiky_samples()
    _, _, small = fm.train_hedgehog(samples, 2, 8, 8 ** -0.5, steps=60, feature_dim=8)
    _, _, large = fm.train_hedgehog(samples, 2, 8, 8 ** -0.5, steps=60, feature_dim=32)
    assert small["loss_end"] < small["loss_start"]
    assert large["loss_end"] < small["loss_end"] - 0.05, (small, large)
