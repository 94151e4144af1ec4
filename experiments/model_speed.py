"""Forward-pass throughput of SmolLM2-135M: float32 params against packed W4 g128 params.

Times the jitted ``model.apply`` (logits for every position) after one warm-up
call; reports tokens per second and wall time per call, and writes
``experiments/results/model_speed.md``.

Usage:
    python experiments/model_speed.py [--shapes 1x512,4x512] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
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

  m = models.from_gguf()
  spec = jquant.QuantSpec(bits=4, symmetric=True, granularity="group", group_size=128, pad_groups=True)
  variants = {
      "float32": m.params,
      "W4 g128 sym (packed)": jquant.quantize_params(m.params, [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel$",
                                                                            spec)]),
  }
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
      rows.append((name, b, t, best, b * t / best, jquant.footprint(params).total_bytes / 2**20))
      print(f"{name:<22} batch {b} x {t}: {best:6.2f} s/call, {b * t / best:7.1f} tokens/s", flush=True)
  header = "| params | batch x length | s / forward (best of %d) | tokens / s | model MB |" % args.reps
  lines = [f"# SmolLM2-135M forward throughput ({jax.default_backend()}, {os.cpu_count()} CPUs)", "", header,
           "|---|---|---|---|---|"]
  lines += [f"| {n} | {b} x {t} | {s:.2f} | {tps:.1f} | {mb:.1f} |" for n, b, t, s, tps, mb in rows]
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "model_speed.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
