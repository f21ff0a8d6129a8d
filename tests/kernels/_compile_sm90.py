"""Build every slimformer Triton kernel for an H100 (sm_90) without a GPU; print JSON.

Run as a script, in a process WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit,
so nothing could be compiled): `python tests/kernels/_compile_sm90.py`. Used by
test_compile_sm90.py. Pointer arguments get 16-byte alignment hints, as Triton's launcher
would give aligned tensors; without them loads do not vectorize and nothing is pipelined.
"""

from __future__ import annotations

import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from slimformer.kernels import int4_linear as k4  # noqa: E402
from slimformer.kernels import int8_linear as k8  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MMA = re.compile(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)")


def build(name, fn, sig, consts, num_warps, num_stages, aligned_ints=()):
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]]
             for a, t in sig.items() if t.startswith("*") or a in aligned_ints}
    src = triton.compiler.ASTSource(
        fn=fn, signature={**sig, **{c: "constexpr" for c in consts}}, constexprs=consts,
        attrs=attrs)
    compiled = triton.compile(src, target=TARGET,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    return {"name": name, "consts": {k: str(v) for k, v in consts.items()},
            "num_warps": num_warps, "num_stages": num_stages,
            "mma": sorted(set(MMA.findall(ptx))), "shared": compiled.metadata.shared,
            "cubin_bytes": len(compiled.asm.get("cubin", b""))}


def int8_kernels():
    sig = dict(a_ptr="*i8", b_ptr="*i8", c_ptr="*fp16", sa_ptr="*fp32", sb_ptr="*fp32",
               bias_ptr="*fp16", M="i32", N="i32", K="i32", M_BUCKET="i32",
               stride_am="i32", stride_bn="i32", stride_cm="i32")
    aligned = ("N", "K", "stride_am", "stride_bn", "stride_cm")
    for cfg in k8.CONFIGS_SMALL_M + k8.CONFIGS_MID_M + k8.CONFIGS_LARGE_M:
        consts = dict(HAS_BIAS=True, RAW_ACC=False, EVEN_K=True, **cfg.kwargs)
        yield build("int8_matmul", k8._int8_matmul_kernel, sig, consts,
                    cfg.num_warps, cfg.num_stages, aligned)
    cfg = k8.CONFIGS_LARGE_M[0]  # masked K tail, bf16 output
    consts = dict(HAS_BIAS=False, RAW_ACC=False, EVEN_K=False, **cfg.kwargs)
    yield build("int8_matmul", k8._int8_matmul_kernel, {**sig, "c_ptr": "*bf16"}, consts,
                cfg.num_warps, cfg.num_stages, aligned)
    from slimformer.kernels import int8_fused as kf

    fsig = dict(x_ptr="*fp16", b_ptr="*i8", c_ptr="*fp16", sb_ptr="*fp32", bias_ptr="*fp16",
                smooth_ptr="*fp16", M="i32", N="i32", K="i32", M_BUCKET="i32",
                stride_xm="i32", stride_bn="i32", stride_cm="i32")
    for i, cfg in enumerate(kf.CONFIGS_SMALL_M + kf.CONFIGS_MID_M + kf.CONFIGS_LARGE_M):
        consts = dict(HAS_BIAS=True, HAS_SMOOTH=i % 2 == 0, EVEN_K=True, **cfg.kwargs)
        yield build("int8_fused", kf._int8_fused_kernel, fsig, consts, cfg.num_warps,
                    cfg.num_stages, ("N", "K", "stride_xm", "stride_bn", "stride_cm"))
    qsig = dict(x_ptr="*fp16", q_ptr="*i8", s_ptr="*fp32", c_ptr="*fp16", M="i32", K="i32",
                stride_xm="i32", stride_qm="i32")
    for K in (768, 4096, 11008, 20000):  # BERT, Llama, Llama's FFN, a two-pass row
        for smooth in (False, True):  # with a folded SmoothQuant multiply
            meta = k8.quant_launch_params(K)
            warps = meta.pop("num_warps")
            yield build("quant_rows", k8._quant_rows_kernel, qsig, {**meta, "HAS_SMOOTH": smooth},
                        warps, 1, ("K", "stride_xm"))


def int4_kernels():
    sig = dict(x_ptr="*fp16", qw_ptr="*u8", s_ptr="*fp16", zp_ptr="*u8", bias_ptr="*fp16",
               y_ptr="*fp16", ws_ptr="*fp32", lock_ptr="*i32", M="i32", N="i32", K="i32",
               M_BUCKET="i32", N_BLOCKS="i32", ZP_STRIDE="i32", stride_xm="i32", stride_ym="i32")
    aligned = ("N", "K", "N_BLOCKS", "stride_xm", "stride_ym")
    base = dict(HAS_ZP=True, HAS_BIAS=True, EVEN_K=True, GROUP=128, PRECISION="tf32",
                DOT_F32=False)
    for cfg in k4.CONFIGS_SMALL_M + k4.CONFIGS_MID_M + k4.CONFIGS_LARGE_M:
        yield build("int4_matmul", k4._int4_matmul_kernel, sig, {**base, **cfg.kwargs},
                    cfg.num_warps, cfg.num_stages, aligned)
    cfg = k4.CONFIGS_LARGE_M[0]
    bf16 = {**sig, "x_ptr": "*bf16", "s_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16"}
    consts = {**base, "GROUP": 32, "HAS_ZP": False, "EVEN_K": False, **cfg.kwargs}
    yield build("int4_matmul", k4._int4_matmul_kernel, bf16, consts,
                cfg.num_warps, cfg.num_stages, aligned)


def int4_dequant_kernels():
    from slimformer.kernels import int4_dequant as kd

    sig = dict(qw_ptr="*u8", s_ptr="*fp32", zp_ptr="*u8", w_ptr="*fp16", N="i32", K="i32",
               N_BLOCKS="i32", ZP_STRIDE="i32")
    for group, has_zp in ((32, True), (128, False)):
        consts = dict(HAS_ZP=has_zp, GROUP=group, BLOCK_N=max(1, min(64, 4096 // group)))
        yield build("int4_dequant", kd._dequant_kernel, sig, consts, 4, 1, ("K", "N_BLOCKS"))


def attention_kernels():
    """The attention replacements with the block sizes their launchers pick on a GPU. Linear:
    feature maps of 64 (elu + 1 on BERT's heads), 2 x 64 and 2 x 128 (Hedgehog; the widest
    gets narrower D-slices). Block-sparse: heads of 64 (BERT) and 32 (MiniLM)."""
    from slimformer.kernels import block_sparse_attention as kb
    from slimformer.kernels import linear_attention as kl

    lsig = dict(q_ptr="*fp16", k_ptr="*fp16", v_ptr="*fp16", o_ptr="*fp16", T="i32", F="i32",
                D="i32", eps="fp32")
    for F, D in ((64, 64), (128, 64), (256, 64)):
        meta = kl.launch_params(4096, F, D)
        warps = meta.pop("num_warps")
        for causal in (False, True):
            yield build("linear_attention", kl._linear_attention_kernel, lsig,
                        {**meta, "CAUSAL": causal}, warps, 1, ("T", "F", "D"))
    bsig = dict(q_ptr="*fp16", k_ptr="*fp16", v_ptr="*fp16", o_ptr="*fp16", m_ptr="*i32",
                H="i32", T="i32", Dq="i32", D="i32", W="i32", G="i32", scale="fp32")
    for has_mask, causal, head_dim in ((True, False, 64), (False, True, 64), (True, False, 32)):
        consts = dict(HAS_MASK=has_mask, CAUSAL=causal, BLOCK_M=64, BLOCK_N=64,
                      BLOCK_DQ=head_dim, BLOCK_D=head_dim)  # 32: MiniLM's heads
        yield build("block_sparse_attention", kb._block_sparse_kernel, bsig, consts, 4, 1,
                    ("T", "Dq", "D"))


def main():
    which = sys.argv[1:] or ["int8", "int4", "int4_dequant", "attention"]
    gens = {"int8": int8_kernels, "int4": int4_kernels, "int4_dequant": int4_dequant_kernels,
            "attention": attention_kernels}
    for w in which:
        for rec in gens[w]():
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
