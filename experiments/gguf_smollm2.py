"""SmolLM2-135M exported to every GGUF type with jquant's RTN on the type's grid: file size, bits per
weight, and jquant's perplexity of the written weights (no llama.cpp here; see the README).

Run: .venv/bin/python experiments/gguf_smollm2.py [n_windows [TYPE ...]]   (about 10 minutes on 2 cores)
"""

import os
import sys
import tempfile
import time

import jax
import numpy as np

import jquant


ALL = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")


def main(n_windows: int = 4, names=ALL):
  m = jquant.models.from_gguf()
  windows = jquant.data.eval_windows(m.tokenizer, n_windows)
  ppl = lambda params: jquant.eval.perplexity(m, params, windows, batch_size=2, progress=False)[0]  # noqa: E731
  t0 = time.time()
  packed = jquant.gguf.load()
  base = ppl(m.params)
  print(f"source file (Q4_1 + Q8_0 embedding): float {base:.4f}, packed import {ppl(packed.params):.4f}, "
        f"{jquant.footprint(packed.params).total_bytes / 1e6:.1f} MB  ({time.time() - t0:.0f} s)")
  print("| type | bits/weight | file MB | tensors on the type / fallback | jquant ppl (RTN) |")
  print("|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      t = time.time()
      qparams = jquant.quantize_params(m.params, jquant.gguf.rules(m.params, name))
      rep = jquant.gguf.export(os.path.join(tmp, f"{name}.gguf"), qparams, types=name)
      counts = rep.type_counts()
      fb = sorted({x.type for x in rep.fallbacks})
      print(f"| {name} | {jquant.gguf.bits_per_weight(name):.4g} | {rep.nbytes / 1e6:.1f} | "
            f"{counts.get(name, 0)} / {len(rep.fallbacks)} {'(' + ', '.join(fb) + ')' if fb else ''} | "
            f"{ppl(qparams):.3f} |  ({time.time() - t:.0f} s)", flush=True)
      jax.clear_caches()


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 4, tuple(sys.argv[2:]) or ALL)
