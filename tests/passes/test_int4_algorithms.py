"""INT4 weight quantization math: the Int4Weight contract, RTN, GPTQ, AWQ."""

from __future__ import annotations

import math

import pytest
import torch

from slimformer.passes.int4_algorithms import (
    HessianAccumulator,
    Int4Weight,
    quantize_awq,
    quantize_gptq,
    quantize_rtn,
)

N, K, BS = 64, 128, 32
OUTLIERS, OUTLIER_GAIN = [5, 37, 90], [20.0, 35.0, 50.0]


def rel_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """||x W^T - x Wq^T|| / ||x W^T||."""
    ref = x @ w.T
    return ((ref - x @ wq.T).norm() / ref.norm()).item()


def activations(gen: torch.Generator, t: int, k: int, mix: torch.Tensor) -> torch.Tensor:
    """Correlated activations (a rank-16 signal plus noise) with a few 20-50x outlier channels."""
    x = torch.randn(t, mix.shape[0], generator=gen) @ mix + 0.1 * torch.randn(t, k, generator=gen)
    x[:, OUTLIERS] *= torch.tensor(OUTLIER_GAIN)
    return x


@pytest.fixture(scope="module")
def outlier_data():
    """Weight, calibration and held-out activations, Hessian of the calibration set."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(16, K, generator=gen) / 4
    x_cal, x_test = activations(gen, 1024, K, mix), activations(gen, 1024, K, mix)
    w = torch.randn(N, K, generator=gen) * 0.05
    acc = HessianAccumulator()
    acc.add(x_cal)
    return w, x_cal, x_test, acc.hessian()


@pytest.fixture(scope="module")
def bert_linears():
    """Real linears of a tiny random BERT with their input activations (calib, held-out)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=200,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    model = BertModel(cfg).eval()
    layer = model.encoder.layer[1]
    linears = {"query": layer.attention.self.query, "ffn_out": layer.output.dense}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        lin.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0]))
        for name, lin in linears.items()
    ]
    with torch.no_grad():
        model(input_ids=torch.randint(0, 200, (24, 48)))
    for h in hooks:
        h.remove()
    out = {}
    for name, lin in linears.items():
        x = inputs[name].reshape(-1, lin.in_features)  # (1152, K)
        out[name] = (lin.weight.detach(), x[:768], x[768:])
    return out


# ---------------------------------------------------------------------------------------------
# Format contract


def _algorithms(w, x):
    acc = HessianAccumulator()
    acc.add(x)
    h = acc.hessian()
    return {
        "rtn": lambda sym: quantize_rtn(w, BS, symmetric=sym),
        "gptq": lambda sym: quantize_gptq(w, h, BS, symmetric=sym),
        "gptq_act": lambda sym: quantize_gptq(w, h, BS, act_order=True, symmetric=sym),
        "awq": lambda sym: quantize_awq(w, x, BS, symmetric=sym)[0],
    }


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("algo", ["rtn", "gptq", "gptq_act", "awq"])
def test_format_contract_partial_block(algo, symmetric):
    gen = torch.Generator().manual_seed(1)
    n, k = 24, 100  # 100 = 3 full blocks of 32 + a partial block of 4
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(256, k, generator=gen)
    qw = _algorithms(w, x)[algo](symmetric)

    nb = math.ceil(k / BS)
    assert qw.block_size == BS and qw.n_blocks == nb == 4
    assert qw.q.dtype == torch.uint8 and qw.q.shape == (n, k)
    assert qw.scales.dtype == torch.float32 and qw.scales.shape == (n, nb)
    assert qw.zero_points.dtype == torch.uint8 and qw.zero_points.shape == (n, nb)
    assert int(qw.q.max()) <= 15 and int(qw.zero_points.max()) <= 15
    assert bool((qw.scales > 0).all()) and bool(torch.isfinite(qw.scales).all())
    if symmetric:
        assert bool((qw.zero_points == 8).all())
    deq = qw.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == (n, k)
    # the documented formula, written out
    blk = torch.arange(k) // BS
    manual = (qw.q.float() - qw.zero_points[:, blk].float()) * qw.scales[:, blk]
    torch.testing.assert_close(deq, manual)


def test_int4weight_rejects_bad_shapes_and_dtypes():
    q = torch.zeros(4, 40, dtype=torch.uint8)
    with pytest.raises(ValueError):
        Int4Weight(q, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.uint8), 32)  # needs 2 blocks
    with pytest.raises(TypeError):
        Int4Weight(q.int(), torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.uint8), 32)


# ---------------------------------------------------------------------------------------------
# RTN


def test_rtn_matches_direct_computation():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 100, generator=gen)
    w[3, 32:64] = 0.0  # an all-zero block
    w[5, :32] = w[5, :32].abs() + 0.1  # an all-positive block: its range still starts at 0
    qw = quantize_rtn(w, 32)
    expected = torch.empty_like(w)
    for n in range(w.shape[0]):
        for b0 in range(0, w.shape[1], 32):
            blk = w[n, b0 : b0 + 32]
            lo, hi = min(blk.min().item(), 0.0), max(blk.max().item(), 0.0)
            scale = (hi - lo) / 15 or 1.0
            zp = round(-lo / scale)
            q = torch.clamp(torch.round(blk / scale) + zp, 0, 15)
            expected[n, b0 : b0 + 32] = (q - zp) * scale
    torch.testing.assert_close(qw.dequantize(), expected)
    assert bool((qw.dequantize()[3, 32:64] == 0).all())
    # round to nearest: every weight within half a step
    step = qw.scales[:, torch.arange(100) // 32]
    assert bool(((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all())


def test_rtn_symmetric_never_clips():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    qw = quantize_rtn(w, 32, symmetric=True)
    torch.testing.assert_close(qw.scales, w.reshape(16, 2, 32).abs().amax(-1) / 7)
    assert int(qw.q.min()) >= 1  # -8 unused: [-absmax, absmax] maps onto codes 1..15
    step = qw.scales[:, torch.arange(64) // 32]
    assert bool(((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all())


# ---------------------------------------------------------------------------------------------
# GPTQ


def test_hessian_accumulator_matches_batch_formula():
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(4))
    acc = HessianAccumulator()
    for chunk in x:  # chunks of (50, 16), then one (1, 2, 16)-shaped leftover
        acc.add(chunk)
    acc.add(x[:1, :2])
    flat = torch.cat([x.reshape(-1, 16), x[0, :2]])
    torch.testing.assert_close(acc.hessian(), 2 / flat.shape[0] * flat.T @ flat)
    assert acc.n == 152
    with pytest.raises(ValueError, match="input features"):
        acc.add(torch.randn(4, 8))
    with pytest.raises(ValueError, match="no activations"):
        HessianAccumulator().hessian()


def test_gptq_beats_rtn_on_outlier_activations(outlier_data):
    w, _, x_test, h = outlier_data
    rtn = rel_err(x_test, w, quantize_rtn(w, BS).dequantize())
    gptq = rel_err(x_test, w, quantize_gptq(w, h, BS).dequantize())
    gptq_act = rel_err(x_test, w, quantize_gptq(w, h, BS, act_order=True).dequantize())
    print(f"outliers: rtn {rtn:.4f} gptq {gptq / rtn:.2f}x act_order {gptq_act / rtn:.2f}x")
    assert gptq < 0.5 * rtn  # measured ~0.24x
    assert gptq_act < 0.5 * rtn  # measured ~0.13x


@pytest.mark.parametrize("name", ["query", "ffn_out"])
def test_gptq_beats_rtn_on_bert_linear(bert_linears, name):
    w, x_cal, x_test = bert_linears[name]
    acc = HessianAccumulator()
    acc.add(x_cal)
    rtn = rel_err(x_test, w, quantize_rtn(w, BS).dequantize())
    gptq = rel_err(x_test, w, quantize_gptq(w, acc.hessian(), BS).dequantize())
    print(f"bert {name}: rtn {rtn:.4f} gptq {gptq / rtn:.2f}x")
    assert gptq < 0.8 * rtn  # measured ~0.69x (query), ~0.43x (ffn_out)


def test_gptq_with_diagonal_hessian_is_rtn():
    # No correlations between inputs: nothing to compensate, so GPTQ rounds to nearest.
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 100, generator=gen)
    h = torch.diag(torch.rand(100, generator=gen) + 0.5)
    w0, h0 = w.clone(), h.clone()
    assert torch.equal(quantize_gptq(w, h, 32).q, quantize_rtn(w, 32).q)
    assert torch.equal(w, w0) and torch.equal(h, h0)  # inputs are not modified


def test_gptq_lazy_batches_do_not_change_the_result(outlier_data):
    w, _, x_test, h = outlier_data
    one_batch = quantize_gptq(w, h, BS, lazy_batch=K).dequantize()
    for lazy in (1, 40):  # 40 rounds up to 64: whole blocks per batch
        err = rel_err(x_test, one_batch, quantize_gptq(w, h, BS, lazy_batch=lazy).dequantize())
        assert err < 1e-3  # identical math; only float rounding may flip a code


def test_gptq_dead_input_channels(outlier_data):
    w, x_cal, x_test, _ = outlier_data
    dead = [0, 33, 99]
    x_cal, x_test = x_cal.clone(), x_test.clone()
    x_cal[:, dead] = 0.0
    x_test[:, dead] = 0.0
    acc = HessianAccumulator()
    acc.add(x_cal)
    h = acc.hessian()
    assert bool((h.diagonal()[dead] == 0).all())
    qw = quantize_gptq(w, h, BS)
    deq = qw.dequantize()
    assert bool(torch.isfinite(deq).all())
    assert bool((deq[:, dead] == 0).all())  # free weights of a dead input are set to exact 0
    assert rel_err(x_test, w, deq) < 0.5 * rel_err(x_test, w, quantize_rtn(w, BS).dequantize())


def test_gptq_retries_cholesky_with_more_damping(outlier_data):
    w, _, x_test, h = outlier_data
    # Push the smallest eigenvalues of a rank-deficient-ish H below zero by 5% of its mean
    # diagonal: 1% damping fails, 10% succeeds.
    bad = h - 0.05 * h.diagonal().mean() * torch.eye(K)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(bad + 0.01 * h.diagonal().mean() * torch.eye(K))
    with pytest.warns(UserWarning, match="damping 0.1"):
        qw = quantize_gptq(w, bad, BS, damp=0.01)
    assert rel_err(x_test, w, qw.dequantize()) < rel_err(x_test, w, quantize_rtn(w).dequantize())


def test_gptq_clear_error_when_hessian_is_unusable():
    w = torch.randn(8, 4)
    indefinite = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4 and -2
    h = torch.block_diag(indefinite, indefinite)
    with pytest.raises(ValueError, match="not positive definite"):
        quantize_gptq(w, h, block_size=2)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_gptq(w, torch.full((4, 4), float("nan")), block_size=2)
    with pytest.raises(ValueError, match="hessian must be"):
        quantize_gptq(w, torch.eye(5), block_size=2)


# ---------------------------------------------------------------------------------------------
# AWQ


def test_awq_beats_rtn_on_outlier_activations(outlier_data):
    w, x_cal, x_test, _ = outlier_data
    qw, s = quantize_awq(w, x_cal, BS)
    assert s.shape == (K,) and bool((s > 0).all())
    # the salient (outlier) channels are scaled up, so their weights quantize finer
    assert bool((s[OUTLIERS] > s.median()).all())
    rtn = rel_err(x_test, w, quantize_rtn(w, BS).dequantize())
    awq = rel_err(x_test, w, qw.dequantize() / s)  # (x / s) @ Q(W s)^T == x @ (Q(W s) / s)^T
    print(f"outliers: rtn {rtn:.4f} awq {awq / rtn:.2f}x")
    assert awq < 0.5 * rtn  # measured ~0.32x


@pytest.mark.parametrize("name", ["query", "ffn_out"])
def test_awq_beats_rtn_on_bert_linear(bert_linears, name):
    w, x_cal, x_test = bert_linears[name]
    qw, s = quantize_awq(w, x_cal, BS)
    rtn = rel_err(x_test, w, quantize_rtn(w, BS).dequantize())
    awq = rel_err(x_test, w, qw.dequantize() / s)
    print(f"bert {name}: rtn {rtn:.4f} awq {awq / rtn:.2f}x")
    assert awq < 0.9 * rtn  # measured ~0.85x (query), ~0.81x (ffn_out)


def test_awq_clipping_helps_on_calibration_data(outlier_data):
    w, x_cal, _, _ = outlier_data
    x_cal = x_cal[:512]  # all of them are scored by the clip search
    plain, s0 = quantize_awq(w, x_cal, BS, clip=False)
    clipped, s1 = quantize_awq(w, x_cal, BS, clip=True)
    assert torch.equal(s0, s1)
    assert rel_err(x_cal, w, clipped.dequantize() / s1) < rel_err(x_cal, w, plain.dequantize() / s0)


def test_awq_shared_input_linears_split(outlier_data):
    # q/k/v read one input, so they share s: quantize them stacked, split the rows back.
    w, x_cal, _, _ = outlier_data
    fused, s = quantize_awq(torch.cat([w, 2 * w, -w]), x_cal, BS)
    parts = fused.split([N, N, N])
    assert [p.q.shape for p in parts] == [(N, K)] * 3
    torch.testing.assert_close(torch.cat([p.dequantize() for p in parts]), fused.dequantize())
