"""CPU lowering: the compressed FX graph -> a plain ONNX model for vanilla ONNX Runtime.

Each slimformer op is swapped for the ONNX Runtime operators that compute the same arithmetic
(`torch.onnx.ops.symbolic` emits a `com.microsoft` node the exporter passes through), then
`torch.onnx.export(dynamo=True)` writes the model. Attention is re-spelt rather than left to
the exporter's SDPA decomposition (NaN guards and shape plumbing that ONNX Runtime runs slowly):
as one com.microsoft.MultiHeadAttention node where it fits (multihead_attention), else as
matmul -> softmax -> matmul (explicit_attention).
"""

from __future__ import annotations

import io
import logging
import math
import warnings

import torch
from torch.fx import GraphModule

from slimformer.compiler.graph_utils import (
    add_constant,
    attr_tensor,
    remove_unused_attrs,
    replace_node,
)
from slimformer.errors import SlimformerError
from slimformer.kernels import naive, naive_attention
from slimformer.passes.int4_act_modes import to_w4a8, w4a8_linear
from slimformer.passes.quantize import weight_only_int8_linear

aten = torch.ops.aten


def dynamic_quantize_matmul(x, w_t, w_scale, bias, w_zero_point=None):
    """ORT com.microsoft.DynamicQuantizeMatMul: x (..., K) fp32, w_t (K, N) int8 or uint8 (with
    its zero point), per-column scale."""
    n = w_t.shape[1]
    return torch.onnx.ops.symbolic(
        "com.microsoft::DynamicQuantizeMatMul", [x, w_t, w_scale, w_zero_point, bias],
        dtype=torch.float32, shape=[*x.shape[:-1], n], version=1)


def row_norm_int8_matmul(x, w_t, w_scale, bias, w_zero_point=None):
    """Per-token precision: rows scaled to absmax 1, per-tensor quantized matmul, scaled back."""
    r = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)  # (..., 1)
    y = dynamic_quantize_matmul(x / r, w_t, w_scale, None, w_zero_point) * r
    return y if bias is None else y + bias


# x86 without VNNI multiplies u8 x s8 with int16 pair sums that saturate past |w| = 64; weights
# that use the full int8 range are stored as uint8 + 128 with zero point 128 (u8 x u8: exact).
S8_SAFE_MAX = 64


def dequantize_matmul(x, w_t, w_scale, bias):
    """Weight-only int8: the file stores int8; ONNX Runtime folds Cast * scale into a float
    weight once, at session start. (A DequantizeLinear -> MatMul spelling gets fused by ORT
    into an 8-bit MatMulNBits, which measured several times slower than the float MatMul.)"""
    y = torch.matmul(x, w_t.to(torch.float32) * w_scale)  # (K, N) * (N,)
    return y if bias is None else y + bias


def matmul_nbits(x, qweight, scales, zero_points, bias, K, block_size, accuracy_level=0):
    """ORT com.microsoft.MatMulNBits: x (..., K) fp32, int4 weight in its own packing (the
    layout slimformer::int4_linear takes). accuracy_level 4 quantizes x to int8 per block and
    runs an integer kernel; 0 dequantizes the weight to fp32."""
    n = qweight.shape[0]
    attrs = {"K": K, "N": n, "bits": 4, "block_size": block_size, "accuracy_level": accuracy_level}
    return torch.onnx.ops.symbolic(
        "com.microsoft::MatMulNBits", [x, qweight, scales, zero_points, None, bias], attrs,
        dtype=torch.float32, shape=[*x.shape[:-1], n], version=1)


def unpack_int4_as_int8(qweight, scales16, zero_points, K, block_size, ch_scale):
    """The packed int4 weight (MatMulNBits layout, fp16 block scales) -> int8 per output
    channel, (N, K), |w| <= 64, scale ch_scale (N,): `int4_act_modes.int4_to_int8` spelt in
    ONNX. It reads only constants, so ONNX Runtime folds it once at session start."""
    n, nb = qweight.shape[0], qweight.shape[1]

    def nibbles(packed):  # (..., L) uint8 -> (..., 2L) float codes, the low nibble first
        # % and // rather than & and >> (those export with mixed uint8/int8 types), and on
        # uint8: the exporter folds small constants, and would otherwise store int32 codes.
        return torch.stack((packed % 16, packed // 16), dim=-1).flatten(-2).float()

    q = nibbles(qweight).reshape(n, nb, block_size)
    zp = torch.full((n, nb, 1), 8.0) if zero_points is None else nibbles(zero_points)[:, :nb, None]
    w = ((q - zp) * scales16.reshape(n, nb, 1).float()).reshape(n, nb * block_size)[:, :K]  # (N, K)
    return torch.clamp(torch.round(w / ch_scale[:, None]), -S8_SAFE_MAX, S8_SAFE_MAX).to(torch.int8)


def int4_group_as_int8_matmul(x, weights: list, ch_scale, bias, act_mode: int):
    """W4A8 for linears reading one input x (q, k and v): the file keeps each packed int4
    weight; their unpacking to int8 and concatenation (N_total, K) fold at session start, and
    one DynamicQuantizeMatMul (per-tensor activations, or row-normalised for per-token
    precision) runs. On CPUs without VNNI, MatMulNBits computes in fp32 whatever its
    accuracy_level: int4 storage at int8 speed this way. weights: [(qweight, scales16,
    zero_points, K, block_size, ch_scale_i)]; ch_scale, bias: concatenated, (N_total,)."""
    w8 = torch.cat([unpack_int4_as_int8(*w) for w in weights]) if len(weights) > 1 \
        else unpack_int4_as_int8(*weights[0])
    fn = dynamic_quantize_matmul if act_mode == naive.ACT_PER_TENSOR_U8 else row_norm_int8_matmul
    return fn(x, w8.t(), ch_scale, bias)  # per-tensor: the bias goes into the matmul, no Add


def residual_sum(a, b):
    """The residual add before a LayerNorm, spelt as ONNX `Sum`: ONNX Runtime fuses Add ->
    LayerNormalization into SkipLayerNormalization, which measured 5x slower than the pair on
    an AVX2 CPU (2.6 vs 0.5 ms at 1024 x 384); it leaves Sum alone."""
    return torch.onnx.ops.symbolic("::Sum", [a, b], dtype=a.dtype,
                                   shape=torch.broadcast_shapes(a.shape, b.shape), version=13)


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as matmul -> softmax -> matmul. q: (B, H, T, D), k/v: (B, Hkv, S, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if enable_gqa and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, H, T, S)
    if is_causal:
        t, s = q.shape[-2], k.shape[-2]
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            # An additive mask, made on the small (B, 1, T, S) tensor: ORT's broadcasting Add
            # beats its Where on the (B, H, T, S) scores (1.6 ms per layer on MiniLM, batch 8).
            scores = scores + naive_attention.additive_mask(attn_mask, scores.dtype)
        else:
            scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def multihead_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as one ORT com.microsoft.MultiHeadAttention node (non-causal, as many k/v heads as q
    heads, mask None or bool (B or 1, 1, T or 1, S)). q/k/v go in as (B, T, H * D): the
    head transposes around it cancel against the model's own, so the attention block loses its
    Transposes, the score MatMuls, the mask Add and the Softmax to one kernel."""
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    def merged(t):  # (B, H, L, D) -> (B, L, H * D)
        return t.transpose(1, 2).reshape(B, t.shape[2], H * D)

    bias = None
    if attn_mask is not None:  # (B or 1, 1, T, S)
        bias = naive_attention.additive_mask(attn_mask, q.dtype).expand(attn_mask.shape[0], 1, T, S)
    out = torch.onnx.ops.symbolic(
        "com.microsoft::MultiHeadAttention", [merged(q), merged(k), merged(v), None, None, bias],
        {"num_heads": H, "scale": float(scale)}, dtype=q.dtype, shape=[B, T, H * D], version=1)
    return out.reshape(B, T, H, D).transpose(1, 2)


def mha_fits(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> bool:
    """Whether SDPA with these arguments (tensors or their fake values) fits multihead_attention:
    fp32, non-causal, no dropout, as many k/v heads as q heads, equal head dims, and a bool mask
    without a per-head axis, or none."""
    if is_causal or dropout_p or q.dtype != torch.float32 or q.dim() != 4:
        return False
    if k.shape[1] != q.shape[1] or v.shape[-1] != q.shape[-1]:
        return False
    return attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.dim() == 4 and attn_mask.shape[1] == 1)


def mha_eligible(node) -> bool:
    """mha_fits on an SDPA node's fake values; an input without one keeps the explicit form."""
    if any("val" not in a.meta for a in node.all_input_nodes):
        return False

    def val(a):
        return a.meta["val"] if isinstance(a, torch.fx.Node) else a
    return mha_fits(*map(val, node.args), **{n: val(a) for n, a in node.kwargs.items()})


def fuse_shared_input_int8(gm: GraphModule) -> None:
    """int8 linears reading the same input with the same activation mode (q, k and v) become
    one int8 linear over the concatenated weights, sliced after: the input is row-normalised
    and quantized once instead of three times, and one wider GEMM runs."""
    groups: dict[tuple, list] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.slimformer.int8_linear.default:
            x, wq, ws, bias, mode = node.args
            wide = attr_tensor(gm, wq.target).abs().max().item() > S8_SAFE_MAX
            groups.setdefault((x, mode, wide), []).append(node)
    for (x, mode, _), members in groups.items():
        if len(members) < 2:
            continue
        ws = [attr_tensor(gm, m.args[1].target) for m in members]  # (N_i, K) int8
        widths = [w.shape[0] for w in ws]
        scales = torch.cat([attr_tensor(gm, m.args[2].target) for m in members])
        first = members[0]
        name = f"{first.args[1].target}_fused"
        w_node = add_constant(gm, name, torch.cat(ws), first)
        s_node = add_constant(gm, f"{name}_scale", scales, first)
        b_node = _concat_biases(gm, f"{name}_bias", [m.args[3] for m in members], widths, first)
        with gm.graph.inserting_before(first):
            fused = gm.graph.call_function(torch.ops.slimformer.int8_linear.default,
                                           (x, w_node, s_node, b_node, mode))
        _hand_out_columns(gm, members, fused, widths)
    gm.graph.eliminate_dead_code()


def _concat_biases(gm: GraphModule, name: str, biases: list, widths: list[int], before) -> torch.fx.Node | None:
    """One fp32 bias constant for a fused group (zeros for members without one); None if none has one."""
    if all(b is None for b in biases):
        return None
    parts = [attr_tensor(gm, b.target).float() if b is not None else torch.zeros(w) for b, w in zip(biases, widths)]
    return add_constant(gm, name, torch.cat(parts), before)


def _hand_out_columns(gm: GraphModule, members: list, fused, widths: list[int]) -> None:
    """Each member's users read its `widths` columns of the fused output; the members go."""
    first = members[0]
    parts, start = [], 0
    for w in widths:  # all slices first: inserting before an erased node would lose them
        with gm.graph.inserting_before(first):
            parts.append(fused if len(members) == 1 else
                         gm.graph.call_function(aten.slice.Tensor, (fused, -1, start, start + w)))
        start += w
    for m, part in zip(members, parts):
        m.replace_all_uses_with(part)
        gm.graph.erase_node(m)


def lower_w4a8_groups(gm: GraphModule) -> None:
    """w4a8_linear nodes reading one input with one activation mode (q, k and v) become one
    int8 matmul over their concatenated unpacked weights, sliced after (see
    fuse_shared_input_int8); the compile-time int8 copies (w8) are dropped."""
    groups: dict[tuple, list] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is w4a8_linear:
            groups.setdefault((node.args[0], node.args[-1]), []).append(node)
    for (x, mode), members in groups.items():
        weights = [(qw, sc, zp, k, bs, ch) for _, qw, sc, zp, _, k, bs, ch, _, _ in (m.args for m in members)]
        chs = [attr_tensor(gm, m.args[7].target) for m in members]
        widths = [c.shape[0] for c in chs]
        first = members[0]
        for m in members[1:]:  # the later members' constants, moved up to where the fused node goes
            for a in m.args[1:4] + m.args[7:8]:
                if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                    first.prepend(a)
        bias = _concat_biases(gm, f"{first.args[1].target}_bias_cat", [m.args[4] for m in members], widths, first)
        ch = add_constant(gm, f"{first.args[1].target}_ch_cat", torch.cat(chs), first) if len(members) > 1 \
            else first.args[7]
        with gm.graph.inserting_before(first):
            fused = gm.graph.call_function(int4_group_as_int8_matmul, (x, weights, ch, bias, mode))
        _hand_out_columns(gm, members, fused, widths)
    remove_unused_attrs(gm)


def prepare_for_onnx(gm: GraphModule) -> GraphModule:
    """Swaps slimformer ops and SDPA for their ONNX Runtime spellings, in place."""
    fuse_shared_input_int8(gm)
    if gm.meta.get("int4_compute") == "int8":  # set by the cpu-int4 lowering
        for node in list(gm.graph.nodes):  # the act-mode pass did not run: per-token everywhere
            if node.target == torch.ops.slimformer.int4_linear.default:
                to_w4a8(gm, node, naive.ACT_ROW_NORM_U8)
    lower_w4a8_groups(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == torch.ops.slimformer.int8_linear.default:
            x, wq, ws, bias, mode = node.args
            w = attr_tensor(gm, wq.target)
            fn = {naive.ACT_PER_TENSOR_U8: dynamic_quantize_matmul,
                  naive.ACT_ROW_NORM_U8: row_norm_int8_matmul}.get(mode)
            if fn is None:
                raise SlimformerError(f"int8_linear act_mode {mode} has no CPU lowering",
                                      "use a cpu-* target's pipeline (act_mode 0 or 2)")
            if w.abs().max() <= S8_SAFE_MAX:
                w_t = add_constant(gm, f"{wq.target}_t", w.t().contiguous(), node)
                replace_node(gm, node, fn, (x, w_t, ws, bias))
            else:
                w_u8 = (w.t().to(torch.int16) + 128).to(torch.uint8).contiguous()  # (K, N)
                w_t = add_constant(gm, f"{wq.target}_u8", w_u8, node)
                zp = add_constant(gm, f"{wq.target}_zp", torch.full((w.shape[0],), 128, dtype=torch.uint8), node)
                replace_node(gm, node, fn, (x, w_t, ws, bias, zp))
        elif node.target == weight_only_int8_linear:
            x, wq, ws, bias = node.args
            w_t = add_constant(gm, f"{wq.target}_t", attr_tensor(gm, wq.target).t().contiguous(), node)
            replace_node(gm, node, dequantize_matmul, (x, w_t, ws, bias))
        elif node.target == torch.ops.slimformer.int4_linear.default:
            level = gm.meta.get("matmulnbits_accuracy_level", 0)  # set by the cpu-int4 lowering
            replace_node(gm, node, matmul_nbits, (*node.args, level))
        elif node.target == torch.ops.slimformer.linear_attention.default:
            # matmuls only (causal: chunked cumulative form), no (T x T) intermediate
            replace_node(gm, node, naive_attention.linear_attention_chunked, node.args)
        elif node.target == torch.ops.slimformer.block_sparse_attention.default:
            # blocked matmuls over padded windows plus the global rows
            replace_node(gm, node, naive_attention.block_sparse_attention_blocked, node.args)
        elif node.target == torch.ops.slimformer.hybrid_attention.default:
            # the blocked local attention, plus the far keys from per-block linear states
            replace_node(gm, node, naive_attention.hybrid_attention_blocked, node.args)
        elif node.target == aten.scaled_dot_product_attention.default:
            fn = multihead_attention if mha_eligible(node) else explicit_attention
            replace_node(gm, node, fn, node.args, node.kwargs)
        elif node.target == aten.layer_norm.default:
            add = node.args[0]
            if isinstance(add, torch.fx.Node) and add.target == aten.add.Tensor and len(add.args) == 2 \
                    and all(isinstance(a, torch.fx.Node) for a in add.args) \
                    and add.args[0].meta["val"].dtype == add.args[1].meta["val"].dtype:
                replace_node(gm, add, residual_sum, add.args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def export_onnx(gm: GraphModule, example_inputs: dict, dynamic_shapes: dict,
                output_names: list[str]) -> bytes:
    """One self-contained ONNX model (no external data), serialized."""
    prepare_for_onnx(gm)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib_redirect():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                gm, (), kwargs=example_inputs, dynamic_shapes=dynamic_shapes, dynamo=True,
                input_names=list(example_inputs), output_names=output_names, optimize=True,
                verbose=False)
        except Exception as e:
            raise SlimformerError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                                  "run with --dump-ir DIR to see the graph that failed to export") from e
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's per-node stack traces: 2.5 MB on MiniLM
        del node.metadata_props[:]
        node.doc_string = ""
    # Intermediate shapes: ONNX Runtime infers them again at load (0.1 MB on MiniLM).
    del proto.graph.value_info[:]
    return proto.SerializeToString()


def contextlib_redirect():
    """The exporter prints progress lines to stdout; keep the CLI output readable."""
    import contextlib
    return contextlib.redirect_stdout(io.StringIO())
