"""INT4 packing in MatMulNBits layout, RTN quantization, per-row int4 (plain PyTorch)."""

from __future__ import annotations

import pytest
import torch

from slimformer.kernels import naive
from slimformer.kernels.packing import (
    dequantize_rows_int4,
    n_blocks,
    pack_int4_matmulnbits,
    quantize_int4_rtn,
    quantize_rows_int4,
    unpack_int4_matmulnbits,
)


@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_pack_unpack_roundtrip(block_size, symmetric):
    gen = torch.Generator().manual_seed(0)
    N, K = 37, 1093  # K not a multiple of any block size; n_blocks odd for 32 and 128
    w = torch.randn(N, K, generator=gen)
    q, s, zp = quantize_int4_rtn(w, block_size, symmetric=symmetric)
    nb = n_blocks(K, block_size)
    assert q.shape == (N, K) and q.dtype == torch.uint8 and int(q.max()) <= 15
    assert s.shape == (N, nb) and (zp is None) == symmetric
    qw, s2, zpp = pack_int4_matmulnbits(q, s, zp, block_size)
    assert qw.shape == (N, nb, block_size // 2) and qw.dtype == torch.uint8
    assert s2.shape == (N, nb)
    if zp is not None:
        assert zpp.shape == (N, (nb + 1) // 2) and zpp.dtype == torch.uint8
    q3, s3, zp3 = unpack_int4_matmulnbits(qw, s2, zpp, K, block_size)
    assert torch.equal(q3, q) and torch.equal(s3, s)
    assert torch.equal(zp3, zp if zp is not None else torch.full((N, nb), 8, dtype=torch.uint8))


def test_nibble_order_and_padding():
    """Low nibble = even k; the last block is padded with the zero point (dequantizes to 0)."""
    q = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)  # K=5, one block of 32
    s = torch.ones(1, 1)
    zp = torch.tensor([[9]], dtype=torch.uint8)
    qw, _, zpp = pack_int4_matmulnbits(q, s, zp, 32)
    assert qw[0, 0, :3].tolist() == [0x21, 0x43, 0x95]  # (1,2) (3,4) (5,pad=9)
    assert qw[0, 0, 3:].eq(0x99).all()
    assert zpp.tolist() == [[9]]
    w = naive.dequantize_int4_ref(qw, s, zpp, 5, 32)
    assert w.tolist() == [[-8.0, -7.0, -6.0, -5.0, -4.0]]


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_bound(symmetric):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 256, generator=gen)
    q, s, zp = quantize_int4_rtn(w, 64, symmetric=symmetric)
    qw, s, zpp = pack_int4_matmulnbits(q, s, zp, 64)
    wd = naive.dequantize_int4_ref(qw, s, zpp, 256, 64)
    step = s.repeat_interleave(64, dim=1)
    assert ((wd - w).abs() <= 0.5 * step + 1e-6).all()  # round to nearest: half a step


def test_pack_rejects_bad_input():
    q = torch.zeros(2, 64, dtype=torch.uint8)
    with pytest.raises(ValueError):
        pack_int4_matmulnbits(q, torch.ones(2, 2), None, 48)  # not a power of two
    with pytest.raises(ValueError):
        pack_int4_matmulnbits(q + 16, torch.ones(2, 2), None, 32)  # code out of range
    with pytest.raises(ValueError):
        pack_int4_matmulnbits(q, torch.ones(2, 3), None, 32)  # wrong scale count


@pytest.mark.parametrize("D", [64, 65])
def test_rows_int4(D):
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(50, D, generator=gen)
    packed, s, zp = quantize_rows_int4(table)
    assert packed.shape == (50, (D + 1) // 2) and s.shape == (50,) and zp.shape == (50,)
    back = dequantize_rows_int4(packed, s, zp, D)
    assert back.shape == (50, D)
    assert ((back - table).abs() <= 0.5 * s[:, None] + 1e-6).all()
    rows = torch.tensor([3, 7, 3])  # dequantizing a gather of rows gives the same rows
    assert torch.equal(dequantize_rows_int4(packed[rows], s[rows], zp[rows], D), back[rows])
