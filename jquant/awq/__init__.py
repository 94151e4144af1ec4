"""AWQ: activation-aware weight quantization, folded into the model, composable with GPTQ.

* `jquant.awq.core`: array math (statistics, scale and clipping searches, folding).
* `scale_model`: the model pass; returns float parameters with the scales folded in
  and the clipping applied, ready for round-to-nearest or GPTQ.
* `quantize_model`: `scale_model` then `jquant.quantize_params` (AWQ with RTN).

Example:
    >>> import jax, jquant
    >>> m = jquant.models.llama_init(jquant.models.LlamaConfig(), jax.random.key(0))
    >>> calib = jax.random.randint(jax.random.key(1), (4, 32), 0, m.config.vocab_size)
    >>> rules = [jquant.Rule(r"(attn|mlp)/\\w+/kernel$",
    ...                      jquant.QuantSpec(bits=4, granularity="group", group_size=32))]
    >>> qparams = jquant.awq.quantize_model(m, m.params, calib, rules, progress=False)
"""

from jquant.awq import core
from jquant.awq.core import ClipRange, ScaleSearch, search_clip, search_scales
from jquant.awq.model import AWQConfig, GroupReport, ScaledModel, quantize_model, scale_model

__all__ = ["core", "AWQConfig", "ClipRange", "GroupReport", "ScaleSearch", "ScaledModel", "quantize_model",
           "scale_model", "search_clip", "search_scales"]
