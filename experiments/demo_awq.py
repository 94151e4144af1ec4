"""AWQ rows of `make demo`: AWQ W4 g128, AWQ W3 g128, and AWQ+GPTQ when jquant.gptq has a model pass.

One AWQ search per bit width serves both its rows: the scaled float
parameters are quantized by round-to-nearest (the AWQ row) and, when
available, by GPTQ (the AWQ+GPTQ row).
"""

from __future__ import annotations

import time

SCORE_WINDOWS = 4  # windows the scale search is scored on (the statistics use every calibration window)


def _rules(bits):
  import jquant
  # 576 = 4 x 128 + 64: SmolLM2's last group per column is shorter.
  spec = jquant.QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=128, pad_groups=True)
  return [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel$", spec)]


def demo_rows(model, params, calib, evalw):
  """Rows {"method", "params", "quant_seconds"} for experiments/demo.py."""
  del evalw
  import jquant
  from jquant import awq
  try:
    from jquant import gptq
    gptq_pass = getattr(gptq, "quantize_model", None)
  except ImportError:
    gptq_pass = None
  rows = []
  for bits in (4, 3):
    rules = _rules(bits)
    t = time.perf_counter()
    scaled = awq.scale_model(model, params, calib, rules, score_windows=SCORE_WINDOWS)
    search_s = time.perf_counter() - t
    t = time.perf_counter()
    q = jquant.quantize_params(scaled.params, rules)
    rows.append({"method": f"AWQ W{bits} g128 asym", "params": q,
                 "quant_seconds": search_s + time.perf_counter() - t})
    if gptq_pass is not None:
      t = time.perf_counter()
      q = gptq_pass(model, scaled.params, calib, rules, verbose=False)
      q = q[0] if isinstance(q, tuple) else q
      rows.append({"method": f"AWQ+GPTQ W{bits} g128 asym", "params": q,
                   "quant_seconds": search_s + time.perf_counter() - t})
  return rows
