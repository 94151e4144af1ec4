"""Block-wise reconstruction: learn each block's quantizers against the float block (OmniQuant, AutoRound,
EfficientQAT's Block-AP).

`quantize_model` walks a model block by block (`jquant.graph`) and returns
ordinary packed `jquant.QArray` params; `core` holds the learnable quantizer.

Example:
    >>> from jquant import blockwise
    >>> qparams = blockwise.quantize_model(model, model.params, calib, rules, steps=100)
"""

from jquant.blockwise import core
from jquant.blockwise.model import (OPTIMIZERS, TARGETS, BlockReport, BlockwiseConfig, BlockwiseReport,
                                    BlockwiseResult, quantize_model)

__all__ = ["core", "quantize_model", "BlockwiseConfig", "BlockReport", "BlockwiseReport", "BlockwiseResult",
           "TARGETS", "OPTIMIZERS"]
