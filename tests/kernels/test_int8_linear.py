"""`slimformer::int8_linear` (act_mode 1): the Triton kernels, under the interpreter, vs the
plain-PyTorch reference. The integer accumulator must be exact: values near +-127 and K > 1040
catch any accumulation in fp32 (exact only below 2**24)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from slimformer.kernels import int8_linear as k8  # noqa: E402
from slimformer.kernels import naive, ops  # noqa: E402, F401  (ops registers the custom ops)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def near_127(gen, *shape):
    """int8 values in +-[120, 127] with random signs."""
    mag = torch.randint(120, 128, shape, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (mag * sign).to(torch.int8)


def big_sum_operands(gen, M, N, K):
    """a (M, K), w (N, K) near +-127 where some w rows are +-127 with a row's signs: those dot
    products are 127 * sum|a| > 2**24 (K > 1040), about half of them odd: fp32 cannot hold them."""
    a, w = near_127(gen, M, K), near_127(gen, N, K)
    if int(a[0].abs().sum()) % 2 == 0:  # make the first of them odd
        a[0, 0] -= a[0, 0].sign()
    r = min(M, N)
    w[:r] = torch.where(a[:r] > 0, 127, -127).to(torch.int8)
    return a, w


def assert_close_ulps(y, ref, ulps=2):
    """Within a few output ulps at the output's scale (the interpreter truncates fp32 -> bf16
    where the GPU rounds to nearest, so bf16 may be off by one ulp)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = ulps * ULP[ref.dtype] * ref.float().abs().max().item()
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= tol, f"max error {err} > {tol}"


def test_interpreter_is_on():
    assert k8.INTERPRET, "TRITON_INTERPRET=1 must be set before the kernel modules import"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_block_k", [16384, 256])  # one tile a row / the two-pass loop
def test_quantize_rows_bit_exact(dtype, max_block_k):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(129, 1093, generator=gen) * 3).to(dtype)
    x[3] = 0.0  # an all-zero row: scale clamps to 1e-8 / 127
    x[5, :7] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 127.0, 63.5]).to(dtype)  # ties
    q, s = k8.quantize_rows(x, max_block_k=max_block_k)
    q_ref, s_ref = naive.quantize_per_token_i8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q.float(), q_ref)
    assert torch.equal(s, s_ref[:, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_block_k", [16384, 256])
def test_quantize_rows_with_folded_smoothing_bit_exact(dtype, max_block_k):
    """smooth=c quantizes exactly what torch's x * c (in x's dtype) would hand the kernel."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(33, 1093, generator=gen) * 3).to(dtype)
    c = (torch.rand(1093, generator=gen) * 4 + 0.05).to(dtype)
    q, s = k8.quantize_rows(x, max_block_k=max_block_k, smooth=c)
    xc = x * c
    if dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (the GPU rounds, as torch)
        xc = ((x.float() * c.float()).view(torch.int32) & -65536).view(torch.float32).to(dtype)
    q_ref, s_ref = naive.quantize_per_token_i8(xc)
    assert torch.equal(q.float(), q_ref) and torch.equal(s, s_ref[:, 0])
    y = ops.int8_linear_impl(x, torch.ones(5, 1093, dtype=torch.int8), torch.ones(5), None,
                             naive.ACT_PER_TOKEN_I8, smooth=c)
    ref = naive.int8_linear_ref(xc, torch.ones(5, 1093, dtype=torch.int8), torch.ones(5), None,
                                naive.ACT_PER_TOKEN_I8)
    if dtype == torch.bfloat16:  # the output store truncates under the interpreter too
        assert_close_ulps(y, ref)
    else:
        assert torch.equal(y, ref)


@pytest.mark.parametrize("M", [1, 17, 129])
@pytest.mark.parametrize("K", [1093, 1152])  # masked K tail / whole K tiles (EVEN_K)
def test_int32_accumulator_exact(M, K):
    gen = torch.Generator().manual_seed(M + K)
    N = 781
    a, w = big_sum_operands(gen, M, N, K)
    acc = k8.int8_matmul(a, torch.ones(M), w, torch.ones(N), None, torch.float32, raw_acc=True)
    assert acc.dtype == torch.int32
    ref = a.long() @ w.long().t()
    big = ref[ref.abs() > 2**24]
    assert big.numel() > 0 and (big % 2 == 1).any()  # sums fp32 cannot represent
    assert torch.equal(acc.long(), ref)


@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),  # several K steps, many tiles
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=256, GROUP_M=2),  # grouped order with few row tiles
])
def test_int32_accumulator_exact_other_tiles(config):
    gen = torch.Generator().manual_seed(3)
    M, N, K = 70, 45, 1093
    a, w = big_sum_operands(gen, M, N, K)
    acc = k8.int8_matmul(a, torch.ones(M), w, torch.ones(N), None, torch.float32,
                         raw_acc=True, config=config)
    assert torch.equal(acc.long(), a.long() @ w.long().t())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 17, 129])
def test_int8_linear_matches_reference(dtype, M):
    gen = torch.Generator().manual_seed(M)
    N, K = 781, 1093
    a, w_q = big_sum_operands(gen, M, N, K)
    x = (a.float() * (torch.rand(M, 1, generator=gen) + 0.5)).to(dtype)  # quantizes back to ~a
    w_scale = torch.rand(N, generator=gen) * 1e-4  # |y| ~ 1e3: no fp16 overflow
    bias = torch.randn(N, generator=gen).to(dtype)
    y = torch.ops.slimformer.int8_linear(x, w_q, w_scale, bias, naive.ACT_PER_TOKEN_I8)
    ref = naive.int8_linear_ref(x, w_q, w_scale, bias, naive.ACT_PER_TOKEN_I8)
    if dtype == torch.bfloat16:
        assert_close_ulps(y, ref, ulps=1)
    else:  # same fp32 arithmetic in the same order: bit for bit
        assert torch.equal(y, ref)


def test_int8_linear_3d_no_bias_fp32_exact():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 200, generator=gen)
    w_q = torch.randint(-127, 128, (48, 200), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(48, generator=gen)
    y = k8.int8_linear(x, w_q, w_scale, None)
    assert y.shape == (2, 9, 48)
    assert torch.equal(y, naive.int8_linear_ref(x, w_q, w_scale, None, naive.ACT_PER_TOKEN_I8))


def test_act_mode_0_uses_reference():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 64, generator=gen)
    w_q = torch.randint(-127, 128, (8, 64), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(8, generator=gen)
    y = torch.ops.slimformer.int8_linear(x, w_q, w_scale, None, naive.ACT_PER_TENSOR_U8)
    assert torch.equal(y, naive.int8_linear_ref(x, w_q, w_scale, None, naive.ACT_PER_TENSOR_U8))


def test_reference_override(monkeypatch):
    monkeypatch.setenv("SLIMFORMER_KERNELS", "reference")
    from slimformer.kernels._triton import use_triton

    assert not use_triton(torch.zeros(1))


class _Int8Linear(torch.nn.Module):
    def __init__(self, w_q, w_scale, bias):
        super().__init__()
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return torch.ops.slimformer.int8_linear(x, self.w_q, self.w_scale, self.bias, 1)


def test_torch_export_with_dynamic_batch():
    gen = torch.Generator().manual_seed(9)
    mod = _Int8Linear(torch.randint(-127, 128, (24, 40), generator=gen, dtype=torch.int8),
                      torch.rand(24, generator=gen), torch.randn(24, generator=gen))
    x = torch.randn(4, 3, 40, generator=gen)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(mod, (x,), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.slimformer.int8_linear.default in targets
    x2 = torch.randn(6, 3, 40, generator=gen)
    assert torch.equal(ep.module()(x2), mod(x2))


def test_prefer_int8_policy():
    # measured table (bench/gpu.sh on an H200): BERT-base shapes never win, Llama from M=2048
    assert not k8.prefer_int8(4096, 768, 768)
    assert not k8.prefer_int8(1024, 4096, 4096) and k8.prefer_int8(2048, 4096, 4096)
    # shapes not in the table fall back to the rule: many tokens or a big weight
    assert not k8.prefer_int8(1, 640, 640)
    assert k8.prefer_int8(2048, 640, 640)
    assert k8.prefer_int8(1, 8192, 8192)
    saved = dict(k8.INT8_MIN_M)
    k8.INT8_MIN_M[(768, 3072)] = 64
    try:
        assert not k8.prefer_int8(32, 768, 3072) and k8.prefer_int8(64, 768, 3072)
    finally:
        k8.INT8_MIN_M.clear()
        k8.INT8_MIN_M.update(saved)


# --- one launch: quantization fused into the GEMM (kernels/int8_fused.py) ---------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 17, 129])
@pytest.mark.parametrize("K", [1093, 1152])  # masked K tail / whole K tiles
def test_fused_int8_linear_matches_reference(dtype, M, K):
    """Same numbers as the reference and the two-launch path: big exact integer sums included."""
    gen = torch.Generator().manual_seed(M + K)
    N = 781
    a, w_q = big_sum_operands(gen, M, N, K)
    x = (a.float() * (torch.rand(M, 1, generator=gen) + 0.5)).to(dtype)
    w_scale = torch.rand(N, generator=gen) * 1e-4
    bias = torch.randn(N, generator=gen).to(dtype)
    y = k8.int8_linear(x, w_q, w_scale, bias, fused=True)
    ref = naive.int8_linear_ref(x, w_q, w_scale, bias, naive.ACT_PER_TOKEN_I8)
    two = k8.int8_linear(x, w_q, w_scale, bias, fused=False)
    if dtype == torch.bfloat16:  # the interpreter's bf16 store truncates (both paths alike)
        assert_close_ulps(y, ref)
        assert torch.equal(y, two)
    else:
        assert torch.equal(y, ref) and torch.equal(y, two)


@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),  # many K steps in both loops, many tiles
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=256, GROUP_M=2),
])
def test_fused_other_tiles_and_smoothing(config):
    from slimformer.kernels.int8_fused import int8_linear_fused

    gen = torch.Generator().manual_seed(4)
    M, N, K = 70, 45, 1093
    x = (torch.randn(2, M // 2, K, generator=gen) * 3).half()  # (..., K): leading dims kept
    x[0, 3] = 0.0  # an all-zero row
    c = (torch.rand(K, generator=gen) * 4 + 0.05).half()
    w_q = near_127(gen, N, K)
    w_scale = torch.rand(N, generator=gen) * 1e-3
    y = int8_linear_fused(x, w_q, w_scale, None, smooth=c, config=config)
    assert y.shape == (2, M // 2, N) and y.dtype == torch.float16
    ref = naive.int8_linear_ref(x * c, w_q, w_scale, None, naive.ACT_PER_TOKEN_I8)
    assert torch.equal(y, ref)
    assert torch.equal(y, k8.int8_linear(x, w_q, w_scale, None, smooth=c, fused=False))
