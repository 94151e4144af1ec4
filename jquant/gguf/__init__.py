"""GGUF both ways: jquant quantizations that llama.cpp runs, and GGUF models that run packed in JAX.

* `types`: a `jquant.QuantSpec` preset per GGML block type (`spec_for`), whose
  values are exactly the type's (float16 scales, float mins, two-level
  k-quant scales), so RTN, GPTQ and AWQ solve directly on llama.cpp's grids.
* `blocks`: GGML block bytes from jquant's codes and scales, and back.
* `writer` (`export`): writes a GGUF that llama.cpp loads, metadata copied from a source
  GGUF, with a per-tensor report (types, llama.cpp's fallbacks).
* `reader` (`load`): a GGUF as a jquant `Model` whose quantized tensors are packed
  `QArray` s at their own size (or float32).
* `arith` (`llamacpp_params`): llama.cpp's CPU matmul arithmetic (activations
  quantized to Q8_0/Q8_1/Q8_K first), to predict llama.cpp's perplexity.

Example:
    >>> import jquant
    >>> m = jquant.models.from_gguf()                                    # SmolLM2-135M, float32
    >>> rules = jquant.gguf.rules(m.params, "Q4_K")                      # per-tensor type, fallbacks
    >>> qparams = jquant.quantize_params(m.params, rules)                # RTN on Q4_K's grid
    >>> report = jquant.gguf.export("/tmp/smollm2-q4_k.gguf", qparams)   # metadata from SmolLM2's GGUF
    >>> packed = jquant.gguf.load("/tmp/smollm2-q4_k.gguf")              # QArrays, bit-exact
"""

from jquant.gguf import types, blocks, tokenizer
from jquant.gguf.types import TYPES, QUANT_TYPES, FLOAT_TYPES, spec_for, type_of, fallback_type, bits_per_weight
from jquant.gguf.writer import export, rules, ExportReport, TensorReport
from jquant.gguf.reader import load, read_config
from jquant.gguf import arith
from jquant.gguf.arith import llamacpp_params, GGMLWeight, quantize_activations, tensor_types

__all__ = ["types", "blocks", "tokenizer", "TYPES", "QUANT_TYPES", "FLOAT_TYPES", "spec_for", "type_of", "fallback_type",
           "bits_per_weight", "export", "rules", "ExportReport", "TensorReport", "load", "read_config", "arith",
           "llamacpp_params", "GGMLWeight", "quantize_activations", "tensor_types"]
