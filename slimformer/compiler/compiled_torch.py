"""GPU targets' CompiledModel: the compressed graph run by PyTorch, saved as a torch.export program.

The graph calls `slimformer::*` ops, which run their Triton kernels on CUDA tensors (and on CPU
tensors under TRITON_INTERPRET=1). The device follows the inputs: on the first call with
inputs on a new device, a runnable copy of the graph is made there, in float16 on CUDA and in
float32 elsewhere (CPU fp16 kernels are slow or missing). On CUDA the forward is replayed from
captured CUDA graphs unless `cuda_graphs=False` (see cuda_graphs.py: without them the forward
is bound by the host's op dispatch, not by the kernels).

Artifact (nothing pickled, nothing unpickled on load):
  weights.safetensors   every parameter, buffer and lifted constant of the program
  graph.json            the program without its weights, in torch.export's JSON schema
                        (`torch._export.serde`; what `torch.export.save` writes as models/*.json)
`torch.export.load` is not used to read it back: it `torch.load`s the sample inputs and falls
back to `weights_only=False`. The JSON schema is versioned by torch; an artifact written by
one torch may not load in a much newer one (then: convert again).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from pathlib import Path

import torch
from torch.fx import GraphModule
from torch.fx.node import map_aggregate

from slimformer.compiler.compiled import CompiledModel
from slimformer.compiler.cuda_graphs import CudaGraphRunner
from slimformer.compiler.numerics import flat_tensors
from slimformer.errors import SlimformerError

GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"
EXAMPLE_PREFIX = "__example_input__."  # safetensors keys of the tracing examples
_SLIMFORMER_SCALE_ARG = 2  # slimformer::int8_linear / int4_linear: arg 2 is the weight scale


class TorchCompiledModel(CompiledModel):
    """Holds the compressed graph (float32, CPU) and runs a per-device copy of it.

    Made by compile() from the pass pipeline's GraphModule (the torch.export program is built
    only when saving: re-tracing costs seconds), or by load() from a saved program.
    """

    def __init__(self, target, input_names, outputs, report, graph_module: GraphModule | None = None,
                 program: torch.export.ExportedProgram | None = None, cuda_graphs: bool = True):
        super().__init__(target, input_names, outputs, report)
        if (graph_module is None) == (program is None):
            raise ValueError("TorchCompiledModel takes a graph_module or a program")
        self.graph_module, self._program = graph_module, program
        # CUDA inputs: replay captured CUDA graphs (may be switched at any time; CPU: unused)
        self.cuda_graphs = cuda_graphs
        self._runners: dict[torch.device, tuple[GraphModule, torch.dtype]] = {}
        self._graph_runners: dict[torch.device, CudaGraphRunner] = {}
        self.gpu_rewrites: dict | None = None  # what rewrite_for_gpu changed (CUDA only)

    @property
    def program(self) -> torch.export.ExportedProgram:
        """The graph as a torch.export program (traced on first use)."""
        if self._program is None:
            self._program = export_program(self.graph_module)
        return self._program

    def module(self) -> GraphModule:
        """A fresh runnable copy of the graph, float32 on the CPU."""
        if self.graph_module is None:
            return self.program.module()
        from slimformer.compiler import analysis

        analysis.invalidate(self.graph_module)  # cached analyses hold uncopyable fake tensors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation notes
            return copy.deepcopy(self.graph_module)

    def _run(self, inputs: dict) -> list[torch.Tensor]:
        device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)),
                      torch.device("cpu"))
        if device not in self._runners:
            self._runners[device] = self._prepare(device)
        gm, dtype = self._runners[device]
        feeds = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in inputs.items()}
        if self.cuda_graphs and device.type == "cuda":
            if device not in self._graph_runners:
                self._graph_runners[device] = CudaGraphRunner(functools.partial(_forward, gm))
            with torch.cuda.device(device):
                return self._graph_runners[device](feeds)
        return _forward(gm, **feeds)

    def _prepare(self, device: torch.device) -> tuple[GraphModule, torch.dtype]:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        gm = retarget(self.module(), device, dtype)
        if device.type == "cuda":  # fewer launches, no dispatcher (gpu_rewrites.py)
            from slimformer.compiler.gpu_rewrites import rewrite_for_gpu

            self.gpu_rewrites = rewrite_for_gpu(gm)
        return gm, dtype

    def _write(self, tmp: Path) -> dict:
        from safetensors.torch import save_file
        from torch._export.serde.serialize import serialize

        ep = self.program
        state = dict(ep.state_dict)
        params = {n for n, _ in ep.named_parameters()}
        consts = {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
        if len(consts) != len(ep.constants):
            raise SlimformerError("the compiled program holds non-tensor constants",
                                  "this model cannot be saved as a GPU artifact")
        # clone: safetensors refuses tensors that share memory (tied weights)
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in {**state, **consts}.items()}
        args, kwargs = ep.example_inputs or ((), {})
        examples = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        if args or len(examples) != len(kwargs):
            examples = {}  # only keyword tensors are kept; without them the guards are skipped
        tensors.update({EXAMPLE_PREFIX + k: v.detach().cpu().contiguous() for k, v in examples.items()})
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        try:
            artifact = serialize(ep, serialize_state_dict=False, serialize_constants=False,
                                 serialize_example_inputs=False)
        except TypeError:  # older torch: no serialize_* switches; the extra bytes are dropped
            artifact = serialize(ep)
        (tmp / GRAPH_FILE).write_bytes(artifact.exported_program)
        return {"model": GRAPH_FILE, "weights": WEIGHTS_FILE, "runtime": "torch",
                "torch": torch.__version__, "parameters": sorted(set(state) & params),
                "buffers": sorted(set(state) - params),
                "constants": sorted(consts), "examples": list(examples),
                "cuda_graphs": self.cuda_graphs}


def _forward(gm: GraphModule, **feeds) -> list[torch.Tensor]:
    with torch.no_grad():
        return flat_tensors(gm(**feeds))


def export_program(gm: GraphModule) -> torch.export.ExportedProgram:
    """Re-traces a compressed graph (custom ops trace through their fake kernels)."""
    from slimformer.compiler.frontend import dynamic_shapes_for

    examples = gm.meta["example_inputs"]
    shapes = dynamic_shapes_for(examples, gm.meta.get("max_seq", 65536))
    try:
        with torch.no_grad():
            return torch.export.export(gm, (), kwargs=examples, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise SlimformerError(f"re-exporting the compressed graph failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]}",
                              "run with --dump-ir DIR to see the graph") from e


def load_torch(directory: Path, meta: dict, report, outputs) -> TorchCompiledModel:
    """Reads an artifact written by TorchCompiledModel.save: JSON graph + safetensors."""
    from safetensors.torch import load_file

    from slimformer.kernels import ops  # noqa: F401  (the graph calls slimformer::* ops)

    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    except ImportError as e:
        raise SlimformerError(f"this torch ({torch.__version__}) cannot read torch.export graphs: {e}",
                              f"use the torch that wrote the artifact ({meta.get('torch')})") from e
    tensors = load_file(str(directory / meta["weights"]))
    params = set(meta.get("parameters", []))
    state_dict = {k: torch.nn.Parameter(tensors[k], requires_grad=False) if k in params else tensors[k]
                  for k in [*meta.get("parameters", []), *meta.get("buffers", [])]}
    constants = {k: tensors[k] for k in meta.get("constants", [])}
    try:
        serialized = _bytes_to_dataclass(schema.ExportedProgram, (directory / meta["model"]).read_bytes())
        # the example inputs give the loaded module its input guards, as in the compiling process
        examples = {k: tensors[EXAMPLE_PREFIX + k] for k in meta.get("examples", [])}
        program = ExportedProgramDeserializer().deserialize(
            serialized, state_dict, constants, ((), examples) if examples else None)
    except Exception as e:
        raise SlimformerError(
            f"{directory}: cannot read the graph ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            f"it was written by torch {meta.get('torch')}; this is torch {torch.__version__}: "
            "convert the model again with this torch") from e
    return TorchCompiledModel(meta["target"], meta["inputs"], outputs, report, program=program,
                              cuda_graphs=bool(meta.get("cuda_graphs", True)))


def retarget(gm: GraphModule, device: torch.device, dtype: torch.dtype) -> GraphModule:
    """Moves a graph to `device` and its float32 computation to `dtype`, in place.

    torch.export bakes the tracing device and dtype into the graph (arange(device=cpu),
    _assert_tensor_metadata(dtype=float32), mask fills with float32's lowest value): those
    arguments are rewritten too, not only the weights. Quantization scales stay float32:
    the kernels read them as fp32 anyway.
    """
    low = dtype != torch.float32
    keep_fp32 = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "slimformer":
            scale = n.args[_SLIMFORMER_SCALE_ARG] if len(n.args) > _SLIMFORMER_SCALE_ARG else None
            if isinstance(scale, torch.fx.Node) and scale.op == "get_attr":
                keep_fp32.add(scale.target)
    # every tensor the graph reads: parameters, buffers and plain attributes (lifted constants)
    names = {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}
    names |= {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in sorted(names):
        t = _get(gm, name)
        if not isinstance(t, torch.Tensor):
            continue
        new = t.detach().to(device)
        if low and new.dtype == torch.float32 and name not in keep_fp32:
            new = new.to(dtype)
        _set(gm, name, new, isinstance(t, torch.nn.Parameter))
    finfo = torch.finfo(dtype)

    def fix(a):
        if isinstance(a, torch.device):
            return device
        if low and isinstance(a, torch.dtype) and a == torch.float32:
            return dtype
        if low and isinstance(a, float) and math.isfinite(a) and abs(a) > finfo.max:
            return finfo.min if a < 0 else finfo.max  # e.g. masks filled with finfo(fp32).min
        return a

    for n in gm.graph.nodes:
        if n.op == "call_function":
            n.args = map_aggregate(n.args, fix)
            n.kwargs = map_aggregate(n.kwargs, fix)
    gm.recompile()
    return gm


def _get(gm: GraphModule, name: str):
    obj = gm
    for p in name.split("."):
        obj = getattr(obj, p, None)
    return obj


def _set(gm: GraphModule, name: str, tensor: torch.Tensor, param: bool) -> None:
    *path, leaf = name.split(".")
    owner = gm
    for p in path:
        owner = getattr(owner, p)
    if param:
        setattr(owner, leaf, torch.nn.Parameter(tensor, requires_grad=False))
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        setattr(owner, leaf, tensor)
