"""GPTQ rows of `make demo`: GPTQ W4 g128 and GPTQ W3 g128 (asymmetric, like the RTN/AWQ asym rows).

Every ``layers_*/(attn|mlp)`` Dense kernel is solved by `jquant.gptq.quantize_model`
on the demo's calibration windows (news text), block by block; the embedding
(tied to the output head) and the norms stay float32. 576-wide inputs use
``pad_groups=True`` (last group of 64), exactly as the RTN rows.

Usage (alone): python experiments/demo.py --only rtn,gptq
"""

from __future__ import annotations

import time

KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"
SOLVER = {}  # quantize_model's defaults: true-sequential, act-order (contiguous groups), damp 0.1, token-norm cap 10


def demo_rows(model, params, calib, evalw, args=None):
  """Rows {"method", "params", "quant_seconds"} for experiments/demo.py."""
  del evalw, args
  import jax
  import jquant
  from jquant import gptq
  rows = []
  for bits in (4, 3):
    spec = jquant.QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=128, pad_groups=True)
    t = time.perf_counter()
    q = gptq.quantize_model(model, params, calib, [jquant.Rule(KERNELS, spec)], progress=False, verbose=False,
                            **SOLVER)
    q = jax.block_until_ready(q)
    rows.append({"method": f"GPTQ W{bits} g128 asym", "params": q, "quant_seconds": time.perf_counter() - t})
  return rows
