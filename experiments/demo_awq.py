"""AWQ rows of `make demo`: AWQ W4 g128 and AWQ W3 g128 (asymmetric), plus AWQ+GPTQ with ``--full``.

AWQ runs the generic model pass (`jquant.awq` on SmolLM2's traced program, folds derived and
verified), the path any Flax model takes. One AWQ search per bit width serves both its rows: the scaled float
parameters are quantized by round-to-nearest (the AWQ row) and, with
``--full``, by GPTQ (the AWQ+GPTQ row). The scale search is scored on the
first ``SCORE_WINDOWS`` calibration windows; the statistics use all of them.
``experiments/awq_sweep.py`` runs the larger settings.

Usage (alone): python experiments/demo.py --only rtn,awq [--full]
"""

from __future__ import annotations

import time

SCORE_WINDOWS = 2
KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"


def _rules(bits):
  import jquant
  # 576 = 4 x 128 + 64: SmolLM2's last group per column is shorter.
  spec = jquant.QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=128, pad_groups=True)
  return [jquant.Rule(KERNELS, spec)]


def demo_rows(model, params, calib, evalw, args=None):
  """Rows {"method", "params", "quant_seconds"} for experiments/demo.py."""
  del evalw
  import jax
  import jquant
  from jquant import awq, gptq
  full = bool(getattr(args, "full", False))
  rows = []
  for bits in (4, 3):
    rules = _rules(bits)
    t = time.perf_counter()
    scaled = awq.scale_model(model, params, calib, rules, score_windows=SCORE_WINDOWS, progress=False)
    search_s = time.perf_counter() - t
    t = time.perf_counter()
    q = jax.block_until_ready(jquant.quantize_params(scaled.params, rules, axes=scaled.axes))
    rows.append({"method": f"AWQ W{bits} g128 asym", "params": q,
                 "quant_seconds": search_s + time.perf_counter() - t})
    if full:
      t = time.perf_counter()
      q = gptq.quantize_model(model, scaled.params, calib, rules, act_order=True, progress=False, verbose=False)
      rows.append({"method": f"AWQ+GPTQ W{bits} g128 asym", "params": jax.block_until_ready(q),
                   "quant_seconds": search_s + time.perf_counter() - t})
  return rows
