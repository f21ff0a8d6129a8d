"""slimformer: a compiler that makes transformer language models smaller and faster.

    compiled = slimformer.compile(model, target="cpu-int8", example_inputs=inputs, calibration=batches)
    compiled(**inputs)            # same outputs structure as the original
    compiled.save("out/")         # model.onnx + report.json, nothing pickled
    slimformer.load("out/")
"""

from slimformer.compiler.api import compile
from slimformer.compiler.compiled import CompiledModel, load
from slimformer.compiler.targets import target_names
from slimformer.errors import SlimformerError

__version__ = "0.1.0"
__all__ = ["compile", "load", "CompiledModel", "SlimformerError", "target_names", "__version__"]
