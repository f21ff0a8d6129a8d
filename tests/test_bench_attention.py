"""bench/attention.py's fidelity-graph mode with recovery, on the real MiniLM, a step each: the
command the README gives must not die of a Python error (it once called the recovery with the
wrong arguments)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reference_kernels")]


def test_fidelity_graph_with_recovery_runs(tmp_path):
    from bench import attention

    threads = torch.get_num_threads()
    try:  # the mode runs on one thread, as the README's measurement did
        assert attention.main(["fidelity-graph", "--kind", "local", "--transfer-steps", "1",
                               "--recover-steps", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "attention_cpu.json").read_text())["fidelity_graph"]["local_t1_r2"]
    assert result["recover"]["steps"] == 2
    for stage in ("after_transfer", "after_recover"):
        pooled = result[stage]["pooled"]
        assert 0.5 < pooled["cos_min"] <= pooled["cos_mean"] <= 1.0 + 1e-6
