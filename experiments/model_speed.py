"""Forward-pass throughput of SmolLM2-135M: float32 against packed W4/W3/W8 and int8 W8A8 params.

Times the jitted ``model.apply`` (logits for every position) after one warm-up
call; reports tokens per second, wall time per call and the ratio to float32
measured in the same run, and writes ``experiments/results/model_speed.md``.
The W8A8 rows run int8 x int8 -> int32 matmuls (`jquant.ops.qdot`); their
static activation scales come from 2 calibration windows (speed only: the
perplexity of each variant is in ``w8a8_compare.md``).

Usage:
    python experiments/model_speed.py [--shapes 1x512,4x512] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="1x512,4x512", help="comma-separated BATCHxLENGTH")
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args(argv)

  import jax
  import numpy as np
  import jquant
  from jquant import data, models

  from jquant import observers
  from jquant.calibrate import W8A8Spec

  m = models.from_gguf()
  kernels = r"layers_\d+/(attn|mlp)/\w+/kernel$"
  g128 = dict(granularity="group", group_size=128, pad_groups=True)

  def weight_only(**kw):
    return jquant.quantize_params(m.params, [jquant.Rule(kernels, jquant.QuantSpec(**kw))])

  def w8a8(activations):
    rules = [jquant.Rule(kernels, W8A8Spec(activations=activations))]
    stats = None
    if activations == "static":
      calib = data.calibration_windows(m.tokenizer, 2, length=512)
      stats = jquant.calibrate(m, m.params, calib, rules, observer=observers.MinMaxObserver(), progress=False)
    return jquant.convert(m.params, stats, rules)

  variants = {
      "float32": lambda: m.params,
      "W8 per-channel (packed)": lambda: weight_only(bits=8, granularity="channel"),
      "W4 g128 sym (packed)": lambda: weight_only(bits=4, symmetric=True, **g128),
      "W4 g128 asym (packed)": lambda: weight_only(bits=4, symmetric=False, **g128),
      "W3 g128 asym (packed)": lambda: weight_only(bits=3, symmetric=False, **g128),
      "W8A8 dynamic per-token (int8)": lambda: w8a8("dynamic"),
      "W8A8 static per-tensor (int8)": lambda: w8a8("static"),
  }
  variants = {k: build() for k, build in variants.items()}
  stream = data.eval_windows(m.tokenizer, 8, length=512).reshape(-1)
  apply = jax.jit(m.apply)
  rows = []
  for shape in args.shapes.split(","):
    b, t = (int(v) for v in shape.split("x"))
    tokens = np.asarray(stream[:b * t].reshape(b, t))
    for name, params in variants.items():
      apply(params, tokens).block_until_ready()  # compile + warm-up
      times = []
      for _ in range(args.reps):
        t0 = time.perf_counter()
        apply(params, tokens).block_until_ready()
        times.append(time.perf_counter() - t0)
      best = min(times)
      base = best if name == "float32" else base
      rows.append((name, b, t, best, b * t / best, base / best, jquant.footprint(params).total_bytes / 2**20))
      print(f"{name:<30} batch {b} x {t}: {best:6.2f} s/call, {b * t / best:7.1f} tokens/s", flush=True)
  header = "| params | batch x length | s / forward (best of %d) | tokens / s | vs float32 | model MB |" % args.reps
  lines = [f"# SmolLM2-135M forward throughput ({jax.default_backend()}, {os.cpu_count()} CPUs, "
           f"{platform.machine()}, jax {jax.__version__})", "", header, "|---|---|---:|---:|---:|---:|"]
  lines += [f"| {n} | {b} x {t} | {s:.3f} | {tps:.1f} | {r:.2f}x | {mb:.1f} |" for n, b, t, s, tps, r, mb in rows]
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "model_speed.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
