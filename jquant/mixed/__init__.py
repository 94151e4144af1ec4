"""Mixed precision per weight under a size budget, chosen from measurement.

llama.cpp's ``Q4_K_M`` keeps some ``attn_v`` and ``ffn_down`` tensors at 6
bits by a hand-written rule. `jquant.mixed` measures instead: the layer loss
under the calibration Hessian of every candidate spec on every weight
(`sensitivity`), then picks one spec per weight minimising the summed loss
within a byte or bits-per-weight budget (`allocate`: exact knapsack DP, or a
Lagrangian hull sweep). The result is a list of `jquant.Rule` s for RTN,
GPTQ, AWQ and the GGUF export.

Example:
    >>> import jquant
    >>> m = jquant.models.from_gguf()
    >>> calib = jquant.data.calibration_windows(m.tokenizer, 16)
    >>> hs = jquant.mixed.hessians(m, calib, batch_size=2)
    >>> sens = jquant.mixed.measure(m.params, hs, jquant.mixed.gguf_candidates())
    >>> alloc = jquant.mixed.allocate(sens, bits_per_weight=5.0)
    >>> qparams = jquant.quantize_params(m.params, alloc.rules)          # or GPTQ with the same rules
    >>> jquant.gguf.export("/tmp/mixed.gguf", qparams)                   # each weight as its chosen type
"""

from jquant.mixed.sensitivity import hessians, fisher, measure, layer_loss, gguf_candidates, Sensitivity
from jquant.mixed.allocate import allocate, budget_bytes, Allocation, METHODS

__all__ = ["hessians", "fisher", "measure", "layer_loss", "gguf_candidates", "Sensitivity", "allocate", "budget_bytes",
           "Allocation", "METHODS"]
