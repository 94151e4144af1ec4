"""RTN rows of `make demo`: round-to-nearest W8 per-channel, W4 g128 and W3 g128.

Every ``layers_*/attn|mlp`` Dense kernel is quantized; the embedding (tied to
the output head) and the norms stay float32. SmolLM2's input widths are 576
and 1536: 1536 = 12 x 128, but 576 = 4 x 128 + 64, so g128 needs
``pad_groups=True`` (the last group of each column holds 64 weights).

Usage (alone): python experiments/demo.py --only rtn
"""

from __future__ import annotations

import time

KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"


def rtn_specs():
  """(row name, QuantSpec) pairs, in table order."""
  import jquant
  g128 = dict(granularity="group", group_size=128, pad_groups=True)
  return [
      ("RTN W8 per-channel sym", jquant.QuantSpec(bits=8, symmetric=True, granularity="channel")),
      ("RTN W4 g128 sym", jquant.QuantSpec(bits=4, symmetric=True, **g128)),
      ("RTN W4 g128 asym", jquant.QuantSpec(bits=4, symmetric=False, **g128)),
      ("RTN W3 g128 sym", jquant.QuantSpec(bits=3, symmetric=True, **g128)),
      ("RTN W3 g128 asym", jquant.QuantSpec(bits=3, symmetric=False, **g128)),
  ]


def demo_rows(model, params, calib, evalw, args=None):
  """Rows {"method", "params", "quant_seconds"} for experiments/demo.py (RTN needs no data)."""
  del model, calib, evalw, args
  import jax
  import jquant
  rows = []
  for name, spec in rtn_specs():
    t = time.perf_counter()
    q = jax.block_until_ready(jquant.quantize_params(params, [jquant.Rule(KERNELS, spec)]))
    rows.append({"method": name, "params": q, "quant_seconds": time.perf_counter() - t})
  return rows
