"""Embedding tables (word, position) stored in int8, one symmetric scale per row.

The word embedding is the largest tensor of a small encoder (MiniLM: 47 of 91 MB). A gather
reads few rows, so dequantizing the gathered rows costs nothing measurable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from slimformer.compiler.analysis import get_attr_tensor, module_path
from slimformer.compiler.graph_utils import add_constant, remove_unused_attrs, replace_node
from slimformer.compiler.pass_manager import CompileContext, Pass, PassResult, register_pass

aten = torch.ops.aten


def quantize_rows_int8(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, D) float -> (V, D) int8 and (V, 1) fp32 scales."""
    scale = table.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.clamp(torch.round(table.float() / scale), -127, 127).to(torch.int8), scale


def int8_embedding(ids: torch.Tensor, table_q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Gather int8 rows and their scales; (..., ) ids -> (..., D) float32."""
    return torch.nn.functional.embedding(ids, table_q).float() * torch.nn.functional.embedding(ids, scales)


def float_embedding_tables(gm: GraphModule, min_rows: int):
    """(embedding node, its constant float table) for each table of at least `min_rows` rows."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.embedding.default:
            continue
        table = get_attr_tensor(gm, node.args[0])
        if table is not None and table.shape[0] >= min_rows and table.is_floating_point():
            yield node, table  # (padding_idx, args[2], only matters for gradients)


@register_pass
@dataclass
class QuantizeEmbeddings(Pass):
    name = "quantize_embeddings"
    min_rows: int = 64  # tiny tables (token types) are not worth a scale per row

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        done = {}
        for node, table in float_embedding_tables(gm, self.min_rows):
            q, s = quantize_rows_int8(table)
            tq = add_constant(gm, f"{node.args[0].target}_int8", q, node)
            ts = add_constant(gm, f"{node.args[0].target}_scale", s, node)
            replace_node(gm, node, int8_embedding, (node.args[1], tq, ts))
            done[module_path(node)] = list(table.shape)
        if not done:
            return PassResult(gm, False, "no embedding tables")
        remove_unused_attrs(gm)
        return PassResult(gm, True, f"{len(done)} embedding tables -> int8 per row", {"tables": done})
