"""Shared tile scheduling: autotune configs by row bucket (grouped_tile runs in every GEMM test)."""

from __future__ import annotations

from slimformer.kernels.tiles import m_bucket_pruner


def test_pruner_keeps_the_configs_of_the_row_bucket():
    small, mid, large = ["s1", "s2"], ["m1"], ["l1", "l2"]
    everything = small + mid + large
    prune = m_bucket_pruner(False, small, mid, large)
    assert prune(everything, {"M_BUCKET": 1}) == small
    assert prune(everything, {"M_BUCKET": 16}) == small
    assert prune(everything, {"M_BUCKET": 32}) == mid
    assert prune(everything, {"M_BUCKET": 256}) == mid
    assert prune(everything, {"M_BUCKET": 4096}) == large
    assert m_bucket_pruner(True, small, mid, large)(everything, {"M_BUCKET": 4096}) == everything
