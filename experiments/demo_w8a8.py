"""W8A8 rows of `make demo`: dynamic per-token (plain and smoothed) and the best static variant.

The static variant is the best of ``experiments/w8a8_compare.py``: SmoothQuant
with per-site searched alpha (folded exactly into the norms, ``up`` and ``v``),
then per-tensor min-max activation scales calibrated on the smoothed model.
The smoothing is shared by the smoothed dynamic row.
"""

from __future__ import annotations

import time

import jquant
import jquant.capture  # noqa: F401
from jquant import observers as O
from jquant import smoothquant as sq
from jquant.calibrate import W8A8Spec, calibrate, convert

DENSE = r"(attn|mlp)/\w+/kernel$"
STATIC = [jquant.Rule(DENSE, W8A8Spec(activations="static"))]
DYNAMIC = [jquant.Rule(DENSE, W8A8Spec(activations="dynamic"))]
SITES = ("attn_norm", "mlp_norm", "mlp/up", "attn/v")


def smoothquant(model, params, calib, *, search_windows: int = 4, progress: bool = False):
  """SmoothQuant with per-site searched alpha; returns the smoothed float tree (same function)."""
  chan = calibrate(model, params, calib, STATIC, observer=O.MinMaxObserver("channel"), progress=progress)
  alphas = sq.search_alpha(model, params, calib[:search_windows], chan.amax(), sites=SITES, progress=progress)
  smoothed, _ = sq.smooth(model, params, calib, chan.amax(), alphas, sites=SITES)
  return smoothed


def demo_rows(model, params, calib, evalw, args=None):
  del evalw, args  # rows are evaluated by the demo driver
  t = time.perf_counter()
  dyn = convert(params, None, DYNAMIC)
  t_dyn = time.perf_counter() - t
  t = time.perf_counter()
  smoothed = smoothquant(model, params, calib)
  t_smooth = time.perf_counter() - t
  t = time.perf_counter()
  stats = calibrate(model, smoothed, calib, STATIC, observer=O.MinMaxObserver(), progress=False)
  static = convert(smoothed, stats, STATIC)
  t_static = time.perf_counter() - t
  t = time.perf_counter()
  dyn_sq = convert(smoothed, None, DYNAMIC)
  t_dyn_sq = time.perf_counter() - t
  return [
      {"method": "W8A8 dynamic per-token", "params": dyn, "quant_seconds": t_dyn},
      {"method": "W8A8 dynamic + SmoothQuant", "params": dyn_sq, "quant_seconds": t_smooth + t_dyn_sq},
      {"method": "W8A8 static + SmoothQuant", "params": static, "quant_seconds": t_smooth + t_static},
  ]
