"""QuantizeEmbeddings: word/position tables stored int8 with one scale per row."""

from __future__ import annotations

import pytest
import torch
from models import calibration, context, exported, fresh_copy, inputs, token_cosines

from slimformer.passes.quantize_embeddings import (
    QuantizeEmbeddings,
    int8_embedding,
    quantize_rows_int8,
)

pytestmark = pytest.mark.usefixtures("reference_kernels")


def test_rows_quantized_with_own_scale():
    torch.manual_seed(0)
    table = torch.randn(20, 8)
    table[4] *= 1000  # a huge row must not cost the others their precision
    table[7] = 0  # an all-zero row stays exactly zero
    q, s = quantize_rows_int8(table)
    assert q.dtype == torch.int8 and q.shape == (20, 8) and s.shape == (20, 1)
    assert q.abs().max() <= 127
    deq = q.float() * s
    assert ((deq - table).abs() <= s / 2 + 1e-6).all()
    assert torch.equal(deq[7], torch.zeros(8))
    ids = torch.tensor([[4, 7, 0], [1, 2, 3]])
    torch.testing.assert_close(int8_embedding(ids, q, s), deq[ids])


def test_bert_tables_become_int8():
    model, _, traced = exported("bert")
    gm = fresh_copy(traced)
    result = QuantizeEmbeddings().run(gm, context(model, calibration(model, n=1)))
    tables = result.details["tables"]
    assert tables == {"embeddings.word_embeddings": [256, 64], "embeddings.position_embeddings": [64, 64]}
    # token types (2 rows) stay float: below min_rows
    assert sum(1 for n in gm.graph.nodes if n.target is int8_embedding) == 2
    params = dict(gm.named_parameters())
    assert "embeddings.word_embeddings.weight" not in params
    assert "embeddings.token_type_embeddings.weight" in params
    int8 = {n: t for n, t in gm.named_buffers() if t.dtype == torch.int8}
    assert {t.shape for t in int8.values()} == {torch.Size([256, 64]), torch.Size([64, 64])}
    held = inputs(model, batch=3, seq=10, seed=3)
    with torch.no_grad():
        cos = token_cosines(model(**held)[0], gm(**held)[0], held["attention_mask"])
    assert cos.min() > 0.999


def test_min_rows_option():
    model, _, traced = exported("bert")
    gm = fresh_copy(traced)
    result = QuantizeEmbeddings(min_rows=1000).run(gm, context(model, calibration(model, n=1)))
    assert not result.modified and result.summary == "no embedding tables"
