"""GPTQ: second-order post-training quantization of Flax kernels.

* `solve` / `solve_codes`: one kernel ``(in, out)`` and the Hessian of its inputs.
* `hessian`, `hessian_init`, `hessian_update`, `hessian_finalize`: ``H = 2/N sum x x^T``.
* `quantize_model`: any model (a Linen or NNX module, jquant's own, an apply
  function), unmodified, block by block, sequentially (`jquant.graph`).

Example:
    >>> import jquant
    >>> q, loss = jquant.gptq.solve(w, jquant.gptq.hessian(x), jquant.QuantSpec(bits=4))
    >>> qparams = jquant.gptq.quantize_model(net, params, tokens, rules)     # a Linen module
    >>> qstate = jquant.gptq.quantize_model(nnx_model, None, x, rules)       # an NNX module
"""

from jquant.gptq.core import (Factor, HessianState, Solution, factor_hessian, hessian, hessian_finalize,
                              hessian_init, hessian_update, pack, quant_loss, solve, solve_codes)
from jquant.gptq.model import GPTQReport, GPTQResult, LayerReport, quantize_model

__all__ = ["Factor", "HessianState", "Solution", "factor_hessian", "hessian", "hessian_finalize", "hessian_init",
           "hessian_update", "pack", "quant_loss", "solve", "solve_codes", "GPTQReport", "GPTQResult", "LayerReport",
           "quantize_model"]
