"""bench/e2e_cpu.py times every ONNX model the way slimformer's runtime runs it: denormals
flushed to zero (ORT's softmax meets them on padded batches), the anchors included."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from bench import common, e2e_cpu

FLAG = "session.set_denormal_as_zero"


def _identity_model(path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


def test_sessions_flush_denormals_unless_told_not_to(tmp_path):
    path = _identity_model(tmp_path / "m.onnx")
    assert common.ort_session(path).get_session_options().get_session_config_entry(FLAG) == "1"
    plain = common.ort_session(path, flush_denormals=False).get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        plain.get_session_config_entry(FLAG)


def test_table_says_which_session_options_ran():
    machine = {"cpu": "cpu", "cores": 2, "onnxruntime": "1"}
    assert FLAG in e2e_cpu.markdown([], machine, None, flush=True)
    assert "default session options" in e2e_cpu.markdown([], machine, None, flush=False)
