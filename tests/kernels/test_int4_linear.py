"""`slimformer::int4_linear` (W4A16, MatMulNBits layout): the Triton kernel, under the
interpreter, vs the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from slimformer.kernels import int4_linear as k4  # noqa: E402
from slimformer.kernels import naive, ops  # noqa: E402, F401  (ops registers the custom ops)
from slimformer.kernels.packing import pack_int4_matmulnbits, quantize_int4_rtn  # noqa: E402

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def packed_weight(gen, N, K, block_size, symmetric, scale_dtype=torch.float32):
    w = torch.randn(N, K, generator=gen)
    q, s, zp = quantize_int4_rtn(w, block_size, symmetric=symmetric)
    qweight, scales, zero_points = pack_int4_matmulnbits(q, s.to(scale_dtype), zp, block_size)
    return qweight, scales, zero_points


def check(x, qweight, scales, zero_points, bias, K, block_size, config=None, dequant=False):
    y = k4.int4_linear(x, qweight, scales, zero_points, bias, K, block_size, config=config,
                       dequant=dequant)
    # the reference on fp32 inputs: the kernel's sums are fp32, its only rounding the output's
    ref = naive.int4_linear_ref(x.float(), qweight, scales, zero_points,
                                None if bias is None else bias.float(), K, block_size)
    assert y.dtype == x.dtype and y.shape == ref.shape
    ulps = 2 if x.dtype != torch.float32 else 64  # fp32: sums of K products in another order
    if dequant and x.dtype != torch.float32:
        ulps = 4  # the weight itself is rounded to x's dtype before the GEMM
    tol = ulps * ULP[x.dtype] * ref.abs().max().item()
    err = (y.float() - ref).abs().max().item()
    assert err <= tol, f"max error {err} > {tol}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 17, 129])
def test_int4_linear_matches_reference(dtype, M):
    gen = torch.Generator().manual_seed(M)
    N, K, bs = 781, 1093, 128  # neither a multiple of the tiles nor of the block
    qweight, scales, zero_points = packed_weight(gen, N, K, bs, symmetric=False, scale_dtype=dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    check(x, qweight, scales, zero_points, bias, K, bs)


@pytest.mark.parametrize("block_size", [32, 64, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_block_sizes_and_default_zero_point(block_size, symmetric):
    gen = torch.Generator().manual_seed(block_size)
    N, K = 45, 1093  # n_blocks odd (35) for 32: the zero-point nibble padding
    qweight, scales, zero_points = packed_weight(gen, N, K, block_size, symmetric)
    assert (zero_points is None) == symmetric
    x = torch.randn(3, K, generator=gen, dtype=torch.float16)
    check(x, qweight, scales, zero_points, None, K, block_size)


@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=4),  # split-K: partials + last-arriver reduction
    dict(BLOCK_M=16, BLOCK_N=16, SPLIT_K=16),  # more splits than blocks: empty slices
    dict(BLOCK_M=32, BLOCK_N=64, SPLIT_K=1, GROUP_M=2),  # GEMM tiles, grouped order
])
def test_int4_tilings(config):
    gen = torch.Generator().manual_seed(5)
    N, K, bs = 100, 1093, 128
    qweight, scales, zero_points = packed_weight(gen, N, K, bs, symmetric=False)
    x = torch.randn(2, 5, K, generator=gen, dtype=torch.float16)  # 3-d input, M = 10
    bias = torch.randn(N, generator=gen, dtype=torch.float16)
    check(x, qweight, scales, zero_points, bias, K, bs, config=config)
    assert int(k4._locks(x.device, 1).abs().sum()) == 0  # split-K counters reset themselves


def test_int4_op_dispatch_and_fallback():
    gen = torch.Generator().manual_seed(6)
    N, K = 24, 64
    for bs in (32, 16):  # 16 is valid MatMulNBits but below the kernel's tl.dot minimum
        qweight, scales, zero_points = packed_weight(gen, N, K, bs, symmetric=False)
        x = torch.randn(4, K, generator=gen)
        y = torch.ops.slimformer.int4_linear(x, qweight, scales, zero_points, None, K, bs)
        ref = naive.int4_linear_ref(x, qweight, scales, zero_points, None, K, bs)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_int4_op_schema():
    assert str(torch.ops.slimformer.int4_linear.default._schema) == (
        "slimformer::int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zero_points, "
        "Tensor? bias, int K, int block_size) -> Tensor")


class _Int4Linear(torch.nn.Module):
    def __init__(self, qweight, scales, zero_points, K, block_size):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)
        self.K, self.block_size = K, block_size

    def forward(self, x):
        return torch.ops.slimformer.int4_linear(x, self.qweight, self.scales, self.zero_points,
                                                None, self.K, self.block_size)


def test_torch_export_with_dynamic_batch():
    gen = torch.Generator().manual_seed(7)
    K, bs = 96, 32
    mod = _Int4Linear(*packed_weight(gen, 40, K, bs, symmetric=False), K, bs)
    x = torch.randn(4, 3, K, generator=gen)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(mod, (x,), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.slimformer.int4_linear.default in targets
    x2 = torch.randn(6, 3, K, generator=gen)
    assert torch.equal(ep.module()(x2), mod(x2))


def test_split_k_counters_outlive_growth(monkeypatch):
    """A captured CUDA graph keeps the counters' address: growing must not free the old buffer,
    and large-M calls (no split-K) must not grow it at all."""
    monkeypatch.setattr(k4, "_LOCKS", {})
    monkeypatch.setattr(k4, "_RETIRED", [])
    dev = torch.device("cpu")
    first = k4._locks(dev, 10)
    assert first.numel() == 4096 and k4._locks(dev, 4096) is first
    gen = torch.Generator().manual_seed(0)
    q, s, zp = quantize_int4_rtn(torch.randn(1100, 64, generator=gen), 32)
    qweight, scales, zps = pack_int4_matmulnbits(q, s, zp, 32)
    x = torch.randn(1024, 64, generator=gen)  # 64 x 69 tiles of 16 > 4096, but no split-K
    k4.int4_linear(x, qweight, scales, zps, None, 64, 32)
    assert k4._LOCKS[dev] is first and not k4._RETIRED
    bigger = k4._locks(dev, 5000)
    assert bigger is not first and k4._RETIRED == [first]


# --- many tokens: dequantize to x's dtype, then cuBLAS (kernels/int4_dequant.py) ---------------


@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_int4_exact(block_size, symmetric):
    from slimformer.kernels.int4_dequant import dequantize_int4

    gen = torch.Generator().manual_seed(block_size + symmetric)
    N, K = 45, 1093  # K tail inside the last block; n_blocks odd for 32 (zero-point padding)
    qweight, scales, zero_points = packed_weight(gen, N, K, block_size, symmetric, torch.float16)
    ref = naive.dequantize_int4_ref(qweight, scales, zero_points, K, block_size)  # fp32
    assert torch.equal(dequantize_int4(qweight, scales, zero_points, K, block_size, torch.float32), ref)
    assert torch.equal(dequantize_int4(qweight, scales, zero_points, K, block_size, torch.float16),
                       ref.half())  # one rounding of the exact fp32 value


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_dequant_path_matches_reference(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    N, K, bs = 781, 1093, 128
    qweight, scales, zero_points = packed_weight(gen, N, K, bs, symmetric=False, scale_dtype=dtype)
    x = torch.randn(2, 70, K, generator=gen).to(dtype)  # M = 140 >= DEQUANT_MIN_M
    bias = torch.randn(N, generator=gen).to(dtype)
    check(x, qweight, scales, zero_points, bias, K, bs, dequant=True)
    from slimformer.kernels import int4_dequant

    calls = []
    monkeypatch.setattr(int4_dequant, "int4_linear_dequant",
                        lambda *a: calls.append(a[0].shape[0]) or int4_dequant.F.linear(a[0], torch.zeros(N, K, dtype=dtype)))
    monkeypatch.setattr(k4, "DEQUANT_MIN_M", 128)
    assert k4.int4_linear(x, qweight, scales, zero_points, bias, K, bs).shape == (2, 70, N)
    k4.int4_linear(x[:, :60], qweight, scales, zero_points, bias, K, bs)  # M = 120: fused kernel
    assert calls == [140]
