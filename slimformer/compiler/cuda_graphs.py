"""CUDA-graph replay of a compiled graph's forward, one graph per input signature.

Why: the GPU targets run their graph from Python, one op at a time. At BERT-base sizes the
host issues the ops slower than the GPU runs them (each `slimformer::int8_linear` is a
custom-op dispatch, a Python wrapper and two Triton launches), so the forward measures the
host, not the kernels. A captured CUDA graph replays every kernel of the forward with one
launch: the time becomes the kernels' time.

How: the first call with a new signature (input names, shapes, dtypes, non-tensor values)
runs the plain path: Triton autotuning, kernel compilation and cuBLAS set-up happen there,
never inside a capture. The second call copies the inputs into static buffers, captures the
forward into a `torch.cuda.CUDAGraph` and replays it; later calls copy and replay. Outputs
are cloned out of the graph's static buffers, so a caller's tensors are not overwritten by
the next replay. If capture fails (an op that syncs or allocates on the host, ...), the model
warns once and runs the plain path from then on.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

MAX_GRAPHS = 8  # captured signatures kept (each holds a private pool of activation memory)


def signature(feeds: dict) -> tuple:
    """What a captured graph is specialised to: every tensor's shape, dtype and device, every
    other input's value."""
    sig = []
    for k, v in feeds.items():
        if isinstance(v, torch.Tensor):
            sig.append((k, tuple(v.shape), v.dtype, v.device))
        else:
            sig.append((k, repr(v)))
    return tuple(sig)


class _Captured:
    """One signature's graph: static input buffers, the graph, its static outputs."""

    def __init__(self, graph, static_in: dict, static_out: list[torch.Tensor]):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out

    def __call__(self, feeds: dict) -> list[torch.Tensor]:
        for k, buf in self.static_in.items():
            buf.copy_(feeds[k])
        self.graph.replay()
        return [t.clone() for t in self.static_out]


class CudaGraphRunner:
    """Runs `fn(**feeds) -> list[Tensor]` through captured CUDA graphs (see the module doc).

    `fn` must read only its inputs and fixed weights (the compiled graph does), so that a
    replay with new values in the static buffers computes the new forward.
    """

    def __init__(self, fn: Callable[..., list[torch.Tensor]], max_graphs: int = MAX_GRAPHS):
        self.fn, self.max_graphs = fn, max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.warmed: set[tuple] = set()
        self.failed: str | None = None  # why capture failed; then every call runs the plain path

    def __call__(self, feeds: dict) -> list[torch.Tensor]:
        if self.failed is not None:
            return self.fn(**feeds)
        sig = signature(feeds)
        captured = self.graphs.get(sig)
        if captured is not None:
            self.graphs.move_to_end(sig)
            return captured(feeds)
        if sig not in self.warmed:  # warm-up: autotuning and compilation outside any capture
            self.warmed.add(sig)
            return self.fn(**feeds)
        try:
            captured = self.capture(feeds)
        except Exception as e:  # noqa: BLE001  (any failure: the plain path still works)
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            warnings.warn(f"CUDA graph capture failed ({self.failed}); running without CUDA graphs",
                          RuntimeWarning, stacklevel=3)
            _clear_capture_error()
            return self.fn(**feeds)
        self.graphs[sig] = captured
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return captured(feeds)

    def capture(self, feeds: dict) -> _Captured:
        """Static buffers, one warm-up run on a side stream (as torch's docs ask: lazy
        initialisations stay out of the graph), then the capture."""
        static_in = {k: v.clone() for k, v in feeds.items() if isinstance(v, torch.Tensor)}
        args = {**feeds, **static_in}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(**args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(**args)
        return _Captured(graph, static_in, static_out)


def _clear_capture_error() -> None:
    """A failed capture can leave a sticky error on the stream; surface and drop it."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass
