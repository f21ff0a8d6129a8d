"""Front end: every family traces with torch.export into a graph that matches eager, at any
batch and sequence length, and untraceable models fail with an error naming the construct."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, FAMILY_NAMES, exported, inputs

from slimformer import SlimformerError
from slimformer.compiler import frontend

pytestmark = pytest.mark.usefixtures("reference_kernels")


def _close(a, b, atol=1e-5):
    fa = [t for t in (a.values() if isinstance(a, dict) else a) if isinstance(t, torch.Tensor)]
    fb = [t for t in (b.values() if isinstance(b, dict) else b) if isinstance(t, torch.Tensor)]
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_traces_and_matches_eager(name):
    model, example, gm = exported(name)
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        ref, out = model(**example), gm(**example)
    assert type(out) is type(ref)  # the original output structure, e.g. BaseModelOutput
    _close(ref, out)
    assert torch.equal(out[0], out.last_hidden_state)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_batch_and_seq_are_dynamic(name):
    model, _, gm = exported(name)
    for batch, seq in [(5, 7), (1, 20), (2, 3)]:
        x = inputs(model, batch=batch, seq=seq, seed=batch * 31 + seq)
        with torch.no_grad():
            _close(model(**x), gm(**x))


def test_nodes_keep_module_paths():
    _, _, gm = exported("bert")
    stacks = [n.meta.get("nn_module_stack") for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(1 for s in stacks if s) > 0.9 * len(stacks)
    paths = {list(s.values())[-1][0] for s in stacks if s}
    assert any("encoder.layer.0.attention.self.query" in p for p in paths)


def test_example_meta_kept():
    _, example, gm = exported("bert")
    assert set(gm.meta["example_inputs"]) == set(example)
    assert gm.meta["max_seq"] == 64  # the config's max_position_embeddings bounds the seq dim


def test_batch_one_example_still_traces_dynamic_batch():
    model = FAMILIES["bert"].build()
    gm = frontend.export(model, inputs(model, batch=1, seq=6, pad=False))
    x = inputs(model, batch=3, seq=9)
    with torch.no_grad():
        _close(model(**x), gm(**x))


def test_decoder_use_cache_is_restored():
    model = FAMILIES["gpt2"].build()
    assert model.config.use_cache is True
    frontend.export(model, inputs(model))
    assert model.config.use_cache is True


class _Branchy(torch.nn.Module):
    """Data-dependent Python control flow: not traceable by torch.export."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        x = self.lin(self.emb(input_ids))
        if x.sum() > 0:
            return x * 2
        return x


class _FixedLength(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, input_ids):
        if input_ids.shape[1] != 6:
            raise ValueError("sequence length must be 6")
        return self.lin(input_ids.float())


def test_data_dependent_control_flow_is_named(capfd):
    ids = torch.randint(0, 50, (2, 5))
    with pytest.raises(SlimformerError) as info:
        frontend.export(_Branchy(), {"input_ids": ids})
    msg = str(info.value)
    assert "_Branchy" in msg
    assert "data-dependent control flow" in msg
    assert "if x.sum() > 0:" in msg  # the offending line of the model's source
    assert "test_frontend.py" in msg
    assert "torch.cond" in info.value.hint
    # torch.export's partial-graph dump is not printed on top of the error
    assert "def forward" not in capfd.readouterr().err


def test_specialised_shape_is_named():
    with pytest.raises(SlimformerError) as info:
        frontend.export(_FixedLength(), {"input_ids": torch.randint(0, 9, (2, 6))})
    assert "fixes the batch or sequence length" in str(info.value)
    assert info.value.hint


def test_bad_inputs_are_user_errors():
    model = FAMILIES["bert"].build()
    with pytest.raises(SlimformerError, match="not arguments of BertModel.forward") as info:
        frontend.export(model, {"input_idz": torch.zeros(2, 4, dtype=torch.long)})
    assert "input_ids" in info.value.hint
    with pytest.raises(SlimformerError, match="no example inputs"):
        frontend.export(model, {})
    with pytest.raises(SlimformerError, match="expected a torch.nn.Module"):
        frontend.export(lambda x: x, {"x": torch.zeros(2, 2)})
    with pytest.raises(SlimformerError, match="sequence length 1"):
        frontend.export(model, {"input_ids": torch.zeros(2, 1, dtype=torch.long)})


def test_dynamic_shapes_spec():
    spec = frontend.dynamic_shapes_for({"input_ids": torch.zeros(2, 4), "lengths": torch.zeros(2),
                                        "flag": True}, max_seq=32)
    assert set(spec["input_ids"]) == {0, 1}
    assert set(spec["lengths"]) == {0}
    assert spec["flag"] is None
