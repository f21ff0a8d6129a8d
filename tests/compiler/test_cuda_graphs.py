"""CUDA-graph replay of the GPU targets (compiler/cuda_graphs.py), on a machine without a GPU:
the option is validated and carried through save/load, the CPU path never touches it, and the
runner's bookkeeping (warm-up, capture, replay from static buffers, cloned outputs, eviction,
fallback after a failed capture) is checked with a stand-in for torch.cuda.CUDAGraph."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from models import FAMILIES, inputs

import slimformer
from slimformer.compiler import cuda_graphs
from slimformer.compiler.compiled_torch import TorchCompiledModel


@functools.cache
def fp16_model(**options):
    model = FAMILIES["bert"].build()
    x = inputs(model, batch=2, seq=8, seed=3)
    return model, x, slimformer.compile(model, "cuda-fp16", x, [x], **options)


def last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def test_option_is_validated():
    model, x, compiled = fp16_model()
    assert isinstance(compiled, TorchCompiledModel) and compiled.cuda_graphs is True  # default
    with pytest.raises(slimformer.SlimformerError, match="cuda_graphs='yes' is not a bool"):
        slimformer.compile(model, "cuda-fp16", x, [x], cuda_graphs="yes")
    with pytest.raises(slimformer.SlimformerError, match="'cuda_graph' -> 'cuda_graphs'"):
        slimformer.compile(model, "cuda-int8", x, [x], cuda_graph=False)
    with pytest.raises(slimformer.SlimformerError, match="unknown option"):  # not an ONNX option
        slimformer.compile(model, "cpu-int8", x, [x], cuda_graphs=False)


def test_cpu_path_unchanged(tmp_path):
    """On CPU tensors the option changes nothing: no runner is made, the numbers are identical."""
    model, x, on = fp16_model()
    _, _, off = fp16_model(cuda_graphs=False)
    assert off.cuda_graphs is False
    y_on, y_again, y_off = last_hidden(on(**x)), last_hidden(on(**x)), last_hidden(off(**x))
    assert on._graph_runners == {} and off._graph_runners == {}
    torch.testing.assert_close(y_on, y_off, rtol=0, atol=0)
    torch.testing.assert_close(y_on, y_again, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(y_on, last_hidden(model(**x)))
    off.save(tmp_path / "off")  # the setting travels with the artifact
    assert json.loads((tmp_path / "off" / "slimformer.json").read_text())["cuda_graphs"] is False
    assert slimformer.load(tmp_path / "off").cuda_graphs is False


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: replay re-runs the recorded function on the static
    buffers it was captured with, and writes into the static outputs (as a real replay does)."""

    def __init__(self, fn, args, static_out):
        self.fn, self.args, self.static_out = fn, args, static_out

    def replay(self):
        for buf, new in zip(self.static_out, self.fn(**self.args)):
            buf.copy_(new)


class FakeRunner(cuda_graphs.CudaGraphRunner):
    fail = False

    def capture(self, feeds):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        static_in = {k: v.clone() for k, v in feeds.items() if isinstance(v, torch.Tensor)}
        args = {**feeds, **static_in}
        static_out = self.fn(**args)
        return cuda_graphs._Captured(FakeGraph(self.fn, args, static_out), static_in, static_out)


def test_runner_warms_up_captures_and_replays():
    seen = []

    def fn(x, scale):
        seen.append(x)
        return [x * scale, x.sum(dim=-1)]

    runner = FakeRunner(fn, max_graphs=2)
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    out = runner({"x": a, "scale": 2.0})  # warm-up: the plain path on the caller's tensor
    assert seen[-1] is a and not runner.graphs
    torch.testing.assert_close(out[0], a * 2.0)
    out = runner({"x": a, "scale": 2.0})  # capture, then replay
    assert len(runner.graphs) == 1 and seen[-1] is not a
    torch.testing.assert_close(out[0], a * 2.0)
    out_b = runner({"x": b, "scale": 2.0})  # replay: new values through the static buffer
    torch.testing.assert_close(out_b[0], b * 2.0)
    torch.testing.assert_close(out_b[1], b.sum(dim=-1))
    torch.testing.assert_close(out[0], a * 2.0)  # an earlier result is not overwritten
    captured = next(iter(runner.graphs.values()))
    assert out_b[0].data_ptr() != captured.static_out[0].data_ptr()  # a clone
    runner({"x": b, "scale": 3.0})  # a non-tensor input is part of the signature: warm-up
    assert len(runner.graphs) == 1
    for shape in [(4, 3), (4, 3), (5, 3), (5, 3)]:  # two more signatures: the oldest is evicted
        runner({"x": torch.randn(shape), "scale": 2.0})
    assert len(runner.graphs) == 2
    assert [s[0][1] for s in runner.graphs] == [(4, 3), (5, 3)]


def test_runner_falls_back_once_when_capture_fails(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "_clear_capture_error", lambda: None)  # no CUDA here
    runner = FakeRunner(lambda x: [x + 1])
    runner.fail = True
    x = torch.randn(3)
    runner({"x": x})
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed .*stream is capturing"):
        out = runner({"x": x})
    torch.testing.assert_close(out[0], x + 1)
    assert runner.failed and not runner.graphs
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning; the plain path from now on
        torch.testing.assert_close(runner({"x": x * 2})[0], x * 2 + 1)
