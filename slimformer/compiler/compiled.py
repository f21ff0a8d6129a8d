"""CompiledModel: callable like the original, saves to and loads from an artifact directory.

An artifact directory holds `slimformer.json` (what the model takes and returns), the model
(`model.onnx` for CPU targets), `report.json`, and, from the CLI, the tokenizer files.
Nothing is pickled.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import torch

from slimformer.compiler.artifact import atomic_dir
from slimformer.compiler.report import Report
from slimformer.errors import SlimformerError

FORMAT_VERSION = 1


class OutputSpec:
    """How to rebuild the original's output from a flat list of tensors."""

    def __init__(self, kind: str, names: list[str], cls: str | None = None):
        self.kind, self.names, self.cls = kind, names, cls  # kind: tensor | tuple | dict | model_output

    @classmethod
    def of(cls, output) -> OutputSpec:
        if isinstance(output, torch.Tensor):
            return cls("tensor", ["output"])
        if isinstance(output, (tuple, list)):
            return cls("tuple", [f"output_{i}" for i in range(len(output))])
        if isinstance(output, dict):  # HF ModelOutput is an OrderedDict of its non-None fields
            names = [k for k, v in output.items() if isinstance(v, torch.Tensor)]
            kind = "dict" if type(output) is dict else "model_output"
            return cls(kind, names, f"{type(output).__module__}.{type(output).__qualname__}")
        raise SlimformerError(f"unsupported model output type {type(output).__name__}",
                              "return a tensor, a tuple of tensors, or a dict / ModelOutput")

    def build(self, tensors: list[torch.Tensor]):
        if self.kind == "tensor":
            return tensors[0]
        if self.kind == "tuple":
            return tuple(tensors)
        fields = dict(zip(self.names, tensors))
        if self.kind == "model_output" and self.cls:
            module, _, name = self.cls.rpartition(".")
            try:
                return getattr(importlib.import_module(module), name)(**fields)
            except Exception:
                return fields
        return fields

    def to_json(self) -> dict:
        return {"kind": self.kind, "names": self.names, "class": self.cls}

    @classmethod
    def from_json(cls, d: dict) -> OutputSpec:
        return cls(d["kind"], d["names"], d.get("class"))


class CompiledModel:
    """Base: `model(**inputs)` returns what the original returned; `.save(dir)`; `.report`."""

    target: str
    report: Report

    def __init__(self, target: str, input_names: list[str], outputs: OutputSpec, report: Report):
        self.target, self.input_names, self.outputs, self.report = target, input_names, outputs, report

    def __call__(self, *args, **kwargs):
        if args:
            kwargs = {**dict(zip(self.input_names, args)), **kwargs}
        missing = [n for n in self.input_names if n not in kwargs]
        if missing:
            raise SlimformerError(f"missing inputs {missing}", f"this model takes {self.input_names}")
        return self.outputs.build(self._run({n: kwargs[n] for n in self.input_names}))

    def _run(self, inputs: dict) -> list[torch.Tensor]:
        raise NotImplementedError

    def _write(self, tmp: Path) -> dict:
        """Writes the model files into tmp; returns extra metadata."""
        raise NotImplementedError

    def save(self, directory: str | Path, force: bool = False, extra_files=None) -> Path:
        """Atomic: the directory appears complete or not at all. extra_files(tmp) may add files."""
        with atomic_dir(directory, force=force) as tmp:
            meta = {"format": FORMAT_VERSION, "target": self.target, "inputs": self.input_names,
                    "outputs": self.outputs.to_json(), **self._write(tmp)}
            (tmp / "slimformer.json").write_text(json.dumps(meta, indent=2))
            (tmp / "report.json").write_text(self.report.to_json())
            if extra_files is not None:
                extra_files(tmp)
        return Path(directory)


def session_options(threads: int | None = None):
    """The ONNX Runtime options slimformer runs its CPU artifacts with (bench/e2e_cpu.py times
    every ONNX model with them too)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    # Padded batches: ORT's softmax (MLAS) takes the exponential of masked scores through
    # denormal arithmetic, in its MultiHeadAttention kernel most (profile, fp32 MiniLM: 31.9
    # -> 11.8 ms flushed), whatever form the mask takes. MiniLM batch 8 x 128, first 8 bench
    # sentences (146 of 1024 tokens real): cpu-int8 61.6 -> 42.9 ms flushed to zero,
    # cpu-fp32 106 -> 88, and no change with an all-ones mask. A mask bias of -60 instead of
    # the float minimum avoids it too, but is exact only while a padded key scores < ~43
    # above a row's best real key (MiniLM: 17.6), which no model promises.
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return so


class OnnxCompiledModel(CompiledModel):
    """CPU targets: a plain ONNX model run by vanilla ONNX Runtime."""

    def __init__(self, target, input_names, outputs, report, model_bytes: bytes, threads: int | None = None):
        super().__init__(target, input_names, outputs, report)
        import onnxruntime as ort

        self.model_bytes = model_bytes
        so = session_options(threads)
        so.log_severity_level = 3
        self.session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        self._declared = [i.name for i in self.session.get_inputs()]

    def _run(self, inputs: dict) -> list[torch.Tensor]:
        feeds = {}
        for name in self._declared:  # ONNX may drop inputs the graph never reads
            v = inputs[name]
            feeds[name] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        return [torch.from_numpy(o) for o in self.session.run(None, feeds)]

    def _write(self, tmp: Path) -> dict:
        (tmp / "model.onnx").write_bytes(self.model_bytes)
        return {"model": "model.onnx", "runtime": "onnxruntime"}


def load(directory: str | Path) -> CompiledModel:
    d = Path(directory)
    meta_path = d / "slimformer.json"
    if not meta_path.is_file():
        raise SlimformerError(f"{d} is not a slimformer artifact (no slimformer.json)",
                              "point at a directory written by `slimformer convert` or CompiledModel.save")
    try:
        meta = json.loads(meta_path.read_text())
        report = Report.from_dict(json.loads((d / "report.json").read_text()))
    except (json.JSONDecodeError, OSError, TypeError) as e:
        raise SlimformerError(f"{d}: corrupt artifact metadata ({e})", "convert the model again") from e
    outputs = OutputSpec.from_json(meta["outputs"])
    if meta.get("runtime") == "onnxruntime":
        return OnnxCompiledModel(meta["target"], meta["inputs"], outputs, report,
                                 (d / meta["model"]).read_bytes())
    if meta.get("runtime") == "torch":  # GPU targets: safetensors + torch.export graph
        from slimformer.compiler.compiled_torch import load_torch
        return load_torch(d, meta, report, outputs)
    raise SlimformerError(f"{d}: unknown runtime {meta.get('runtime')!r}", "upgrade slimformer")
