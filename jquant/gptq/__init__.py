"""GPTQ: second-order post-training quantization of Flax kernels.

* `solve` / `solve_codes`: one kernel ``(in, out)`` and the Hessian of its inputs.
* `hessian`, `hessian_init`, `hessian_update`, `hessian_finalize`: ``H = 2/N sum x x^T``.
* `quantize_model`: a whole model, block by block, sequentially.

Example:
    >>> import jquant
    >>> q, loss = jquant.gptq.solve(w, jquant.gptq.hessian(x), jquant.QuantSpec(bits=4))
"""

from jquant.gptq.core import (Factor, HessianState, Solution, factor_hessian, hessian, hessian_finalize,
                              hessian_init, hessian_update, pack, quant_loss, solve, solve_codes)
from jquant.gptq.model import GPTQReport, GPTQResult, LayerReport, quantize_model

__all__ = ["Factor", "HessianState", "Solution", "factor_hessian", "hessian", "hessian_finalize", "hessian_init",
           "hessian_update", "pack", "quant_loss", "solve", "solve_codes", "GPTQReport", "GPTQResult", "LayerReport",
           "quantize_model"]
