"""jquant: quantized transformers in JAX, pure functions over Flax parameter trees.

Example:
    >>> import jax, jquant
    >>> w = jax.random.normal(jax.random.key(0), (512, 256))
    >>> q = jquant.quantize(w, jquant.QuantSpec(bits=4, granularity="group", group_size=128))
    >>> q.nbytes, w.nbytes                      # half a byte per weight + scales
    (69632, 524288)
"""

from jquant.spec import QuantSpec, Rule
from jquant.qarray import (QArray, quantize, dequantize, fake_quant, quantize_values, compute_scale_zero,
                           expand_to_groups)
from jquant.tree import quantize_params, dequantize_params, footprint, Footprint, is_qarray
from jquant.checkpoint import save, load
from jquant.intercept import quantized
from jquant import packing, ops, utils
from jquant import capture, data, eval, graph, models  # noqa: A004  (jquant.eval is the evaluation module)
from jquant import dataflow, folds  # noqa: E402  (folds as data, shared by AWQ and SmoothQuant)
from jquant import awq, gptq, observers, qat, smoothquant
from jquant import gguf  # noqa: E402  (GGUF grids, export and packed import)
from jquant import mixed  # noqa: E402  (mixed precision per weight under a size budget)
from jquant.calibrate import calibrate, convert
from jquant import export  # noqa: E402  (registers jquant's pytrees for jax.export serialization)
from jquant import generate, kvcache  # noqa: E402  (KV-cache decoding)
from jquant import blockwise, rotation, sharding  # noqa: E402  (block-wise reconstruction; rotations; Mesh layouts)

export.register_serialization()

__version__ = "0.1.0"

__all__ = [
    "QuantSpec", "Rule", "QArray", "quantize", "dequantize", "fake_quant", "quantize_values",
    "compute_scale_zero", "expand_to_groups", "quantize_params", "dequantize_params", "footprint",
    "Footprint", "is_qarray", "save", "load", "quantized", "packing", "ops", "utils", "capture", "data", "eval", "graph", "models",
    "dataflow", "folds", "awq", "gptq", "gguf", "mixed", "observers", "qat", "smoothquant", "calibrate", "convert", "export",
    "generate", "kvcache", "blockwise", "rotation", "sharding",
]
