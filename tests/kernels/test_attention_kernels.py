"""slimformer::linear_attention, slimformer::block_sparse_attention and
slimformer::hybrid_attention (the two combined): the sub-quadratic
plain-PyTorch spellings (what the CPU lowering exports) and the Triton kernels (under
TRITON_INTERPRET=1) against the quadratic references, on odd lengths, with padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimformer.kernels import naive_attention as ref
from slimformer.kernels import ops  # noqa: F401  (registers torch.ops.slimformer.*)

LENGTHS = (1, 37, 129, 300)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qkv(T, dq=16, d=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, T, dq, generator=g) for _ in range(2))
    v = torch.randn(2, 3, T, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _features(q, k):
    return F.elu(q) + 1, F.elu(k) + 1


def _padding_mask(T):
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, T // 2 + 1:] = 0  # the second row pads its tail
    return mask


def _real_rows(x, mask):
    return x * mask[:, None, :, None]  # padding queries' outputs are unspecified


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", LENGTHS)
def test_linear_chunked_matches_reference(T, causal):
    q, k, v = _qkv(T)
    phi_q, phi_k = _features(q, k)
    want = ref.linear_attention_ref(phi_q, phi_k, v, causal)
    got = ref.linear_attention_chunked(phi_q, phi_k, v, causal, chunk=16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", LENGTHS)
def test_block_sparse_blocked_matches_reference(T, causal):
    q, k, v = _qkv(T)
    mask = _padding_mask(T)
    for window, glob in ((16, 0), (16, 1), (7, 5), (512, 2)):
        want = ref.block_sparse_attention_ref(q, k, v, mask, window, glob, causal)
        got = ref.block_sparse_attention_blocked(q, k, v, mask, window, glob, causal)
        torch.testing.assert_close(_real_rows(got, mask), _real_rows(want, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_local_is_exact_softmax_when_the_sequence_fits_the_window(causal):
    q, k, v = _qkv(37)
    mask = None if causal else _padding_mask(37)
    sdpa_mask = None if causal else (mask != 0)[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal)
    got = ref.block_sparse_attention_blocked(q, k, v, mask, 64, 1, causal)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", LENGTHS)
def test_hybrid_blocked_matches_reference(T, causal):
    q, k, v = _qkv(T, seed=T + 1)
    phi_q, phi_k = _features(q, k)
    mask = _padding_mask(T)
    for window, glob in ((16, 0), (16, 1), (7, 5), (512, 2)):
        want = ref.hybrid_attention_ref(q, k, v, phi_q, phi_k, mask, window, glob, causal)
        got = ref.hybrid_attention_blocked(q, k, v, phi_q, phi_k, mask, window, glob, causal)
        torch.testing.assert_close(_real_rows(got, mask), _real_rows(want, mask), atol=1e-5, rtol=1e-5)


def test_hybrid_sits_between_local_and_softmax():
    """Zero far-key features: exactly local attention. Far-key features whose products equal
    the softmax exponentials over each row's near-key sum: exactly softmax over every key
    (with q = 1 and scale 1, s_ij = k_j: phi(q_i) = exp(-logsumexp_near k), phi(k_j) = exp(k_j))."""
    _, k, v = _qkv(70, dq=1, seed=7)
    q = torch.ones_like(k)
    mask = _padding_mask(70)
    phi_q, phi_k = _features(q, k)
    local = ref.block_sparse_attention_ref(q, k, v, mask, 8, 1, False, scale=1.0)
    got = ref.hybrid_attention_blocked(q, k, v, phi_q, phi_k * 0, mask, 8, 1, False, scale=1.0)
    torch.testing.assert_close(_real_rows(got, mask), _real_rows(local, mask), atol=1e-5, rtol=1e-5)
    near = ref.local_pattern(70, 70, 8, 1, False) & (mask != 0)[:, None, None, :]  # (B, 1, T, T)
    m = k.transpose(-2, -1).expand(-1, -1, 70, -1).masked_fill(~near, -1e30).logsumexp(-1, keepdim=True)  # (B,H,T,1)
    softmax = ref.block_sparse_attention_ref(q, k, v, mask, 1 << 20, 0, False, scale=1.0)  # one block: all keys
    got = ref.hybrid_attention_blocked(q, k, v, torch.exp(-m), torch.exp(k), mask, 8, 1, False, scale=1.0)
    torch.testing.assert_close(_real_rows(got, mask), _real_rows(softmax, mask), atol=1e-5, rtol=1e-4)


def test_local_pattern_global_rows_and_columns():
    allowed = ref.local_pattern(20, 20, window=4, global_tokens=1, causal=False)
    assert allowed[0].all() and allowed[:, 0].all()  # the global token sees and is seen by all
    assert allowed[9, 4:16].all() and not allowed[9, 1:4].any() and not allowed[9, 16:].any()  # blocks 1..3
    causal = ref.local_pattern(20, 20, window=4, global_tokens=1, causal=True)
    assert causal[9, 4:10].all() and not causal[9, 10:].any() and causal[9, 0]


# ---- Triton kernels, in the interpreter ----------------------------------------------------

triton = pytest.importorskip("triton")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", LENGTHS)
def test_linear_triton_matches_reference(T, causal):
    from slimformer.kernels.linear_attention import linear_attention

    q, k, v = _qkv(T, seed=T)
    phi_q, phi_k = _features(q, k)
    got = linear_attention(phi_q, phi_k, v, causal, 1e-6)
    torch.testing.assert_close(got, ref.linear_attention_ref(phi_q, phi_k, v, causal), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_triton_wide_features_split_the_value_dim(causal):
    """300 features (a wide Hedgehog map): BLOCK_F 512, so each program takes a 16-wide slice
    of D = 40 (three slices, the last partial) to keep its state small."""
    from slimformer.kernels.linear_attention import launch_params, linear_attention

    q, k, v = _qkv(53, dq=300, d=40, seed=3)
    phi_q, phi_k = _features(q, k)
    assert launch_params(53, 300, 40)["BLOCK_D"] == 16
    got = linear_attention(phi_q, phi_k, v, causal, 1e-6)
    torch.testing.assert_close(got, ref.linear_attention_ref(phi_q, phi_k, v, causal), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", LENGTHS)
def test_block_sparse_triton_matches_reference(T, causal):
    from slimformer.kernels.block_sparse_attention import block_sparse_attention

    q, k, v = _qkv(T, seed=T)
    mask = _padding_mask(T)
    for window, glob in ((16, 1), (40, 3)):
        got = block_sparse_attention(q, k, v, mask, window, glob, causal, 16 ** -0.5)
        want = ref.block_sparse_attention_ref(q, k, v, mask, window, glob, causal)
        torch.testing.assert_close(_real_rows(got, mask), _real_rows(want, mask), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", LENGTHS)
def test_hybrid_triton_matches_reference(T, causal, monkeypatch):
    """The op on the Triton path: the block-sparse kernel for the near keys, the far keys'
    per-block states, combined."""
    monkeypatch.setenv("SLIMFORMER_KERNELS", "triton")
    q, k, v = _qkv(T, seed=T + 2)
    phi_q, phi_k = _features(q, k)
    mask = _padding_mask(T)
    for window, glob in ((16, 1), (40, 3)):
        got = torch.ops.slimformer.hybrid_attention(q, k, v, phi_q, phi_k, mask, window, glob, causal, 0.25, 1e-6)
        want = ref.hybrid_attention_ref(q, k, v, phi_q, phi_k, mask, window, glob, causal, 0.25)
        torch.testing.assert_close(_real_rows(got, mask), _real_rows(want, mask), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_take_half_precision(dtype):
    from slimformer.kernels.block_sparse_attention import block_sparse_attention
    from slimformer.kernels.linear_attention import linear_attention

    q, k, v = _qkv(37, dtype=dtype)
    phi_q, phi_k = _features(q.float(), k.float())
    lin = linear_attention(phi_q.to(dtype), phi_k.to(dtype), v, True, 1e-6)
    assert lin.dtype == dtype
    torch.testing.assert_close(lin.float(), ref.linear_attention_ref(phi_q, phi_k, v.float(), True),
                               atol=3e-2, rtol=3e-2)
    loc = block_sparse_attention(q, k, v, None, 16, 1, False, 0.25)
    assert loc.dtype == dtype
    torch.testing.assert_close(loc.float(), ref.block_sparse_attention_ref(q.float(), k.float(), v.float(),
                                                                         None, 16, 1, False), atol=3e-2, rtol=3e-2)


def test_ops_dispatch_fake_and_autograd(monkeypatch):
    """The op picks Triton (interpreter) or the reference by SLIMFORMER_KERNELS, traces with
    its fake kernel, and differentiates through the plain-PyTorch form."""
    q, k, v = _qkv(37)
    phi_q, phi_k = _features(q, k)
    outs = {}
    for mode in ("triton", "reference"):
        monkeypatch.setenv("SLIMFORMER_KERNELS", mode)
        outs[mode] = (torch.ops.slimformer.linear_attention(phi_q, phi_k, v, True, 1e-6),
                      torch.ops.slimformer.block_sparse_attention(q, k, v, _padding_mask(37), 16, 1, False, 0.25))
    torch.testing.assert_close(outs["triton"][0], outs["reference"][0], atol=1e-5, rtol=1e-4)
    mask = _padding_mask(37)
    torch.testing.assert_close(_real_rows(outs["triton"][1], mask), _real_rows(outs["reference"][1], mask),
                               atol=1e-5, rtol=1e-4)

    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(phi_q)
        fv = mode.from_tensor(v)
        assert torch.ops.slimformer.linear_attention(fq, fq, fv, False, 1e-6).shape == v.shape

    monkeypatch.setenv("SLIMFORMER_KERNELS", "reference")
    qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
    torch.ops.slimformer.block_sparse_attention(qq, kk, vv, None, 8, 1, True, 0.25).square().sum().backward()
    q2, k2, v2 = (x.clone().requires_grad_(True) for x in (q, k, v))
    ref.block_sparse_attention_ref(q2, k2, v2, None, 8, 1, True, 0.25).square().sum().backward()
    for a, b in ((qq, q2), (kk, k2), (vv, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
    fq, fk = (x.detach().clone().requires_grad_(True) for x in (phi_q, phi_k))
    torch.ops.slimformer.linear_attention(fq, fk, v, True, 1e-6).sum().backward()
    gq, gk = (x.detach().clone().requires_grad_(True) for x in (phi_q, phi_k))
    ref.linear_attention_ref(gq, gk, v, True).sum().backward()
    torch.testing.assert_close(fq.grad, gq.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fk.grad, gk.grad, atol=1e-4, rtol=1e-4)


def test_hybrid_op_dispatch_and_autograd(monkeypatch):
    """Triton (interpreter) and the reference agree through the op; gradients (q, k, v and
    both feature maps: recovery trains the Hedgehog maps through them) match the quadratic
    definition's."""
    q, k, v = _qkv(45, seed=11)
    phi_q, phi_k = _features(q, k)
    mask = _padding_mask(45)
    outs = {}
    for mode in ("triton", "reference"):
        monkeypatch.setenv("SLIMFORMER_KERNELS", mode)
        outs[mode] = torch.ops.slimformer.hybrid_attention(q, k, v, phi_q, phi_k, mask, 8, 1, True, 0.25, 1e-6)
    torch.testing.assert_close(_real_rows(outs["triton"], mask), _real_rows(outs["reference"], mask),
                               atol=1e-5, rtol=1e-4)
    monkeypatch.setenv("SLIMFORMER_KERNELS", "reference")
    a = [x.clone().requires_grad_(True) for x in (q, k, v, phi_q, phi_k)]
    b = [x.clone().requires_grad_(True) for x in (q, k, v, phi_q, phi_k)]
    w = mask[:, None, :, None]  # real query rows only
    (torch.ops.slimformer.hybrid_attention(*a, mask, 8, 1, False, 0.25, 1e-6) * w).square().sum().backward()
    (ref.hybrid_attention_ref(*b, mask, 8, 1, False, 0.25) * w).square().sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-4, rtol=1e-4)
