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


def test_hybrid_fit_learns_the_far_keys_weight():
    """near=(window, G): the fit targets hybrid attention (softmax on the local pattern, phi on
    the rest) and learns a far-key log-weight per head; it ends well below local attention's
    loss (the far keys' weight dropped), which is what the hybrid recovers."""
    from slimformer.kernels.naive_attention import local_pattern

    samples = _spiky_samples()
    wq, wk, gain, info = fm.train_hedgehog(samples, 2, 8, 8 ** -0.5, steps=60, feature_dim=8, near=(4, 1))
    assert gain.shape == (2, 1, 1) and not torch.equal(gain, torch.full_like(gain, fm.HYBRID_LOG_GAIN0))
    assert info["loss_end"] < info["loss_start"]
    q, k, allowed = samples[0]
    near = local_pattern(q.shape[2], k.shape[2], 4, 1, causal=False)
    target = torch.softmax((q @ k.transpose(-2, -1)) * 8 ** -0.5, -1)
    local = torch.softmax(((q @ k.transpose(-2, -1)) * 8 ** -0.5).masked_fill(~near, -1e30), -1)
    local_ce = float(-(target * torch.log(local + 1e-8)).sum(-1).mean())
    assert info["loss_end"] < local_ce - 0.5, (info, local_ce)


@pytest.mark.parametrize("near", [None, (4, 1)])
def test_large_batches_are_subsampled_per_step(near):
    """Calibration batches above STEP_SEQUENCES (a CLI batch is 16) train on a random subset
    per step, padding masks included; the loss is still reported over whole batches."""
    g = torch.Generator().manual_seed(1)
    b, t = fm.STEP_SEQUENCES * 2 + 1, 24
    q = torch.randn(b, 2, t, 8, generator=g) * 2.0
    k = q[:, :, torch.randperm(t, generator=g)] + 0.3 * torch.randn(b, 2, t, 8, generator=g)
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[::2, t - 5:] = False  # every other sequence pads its tail
    samples = [(q, k, keep[:, None, None, :].expand(b, 1, t, t))]
    *_, info = fm.train_hedgehog(samples, 2, 8, 8 ** -0.5, steps=40, feature_dim=8, near=near)
    assert info["loss_end"] < info["loss_start"] - 0.1, info
