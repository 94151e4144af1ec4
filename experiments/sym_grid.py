"""Symmetric grid conventions: RTN perplexity of SmolLM2-135M for each way of picking a symmetric scale.

Variants, W4 and W3, at group size 128 and per channel (SmolLM2's GGUF
weights already sit on an asymmetric 4-bit g32 grid, so g32 would flatter
asymmetric grids):

* ``max``: ``scale = amax / (2^(b-1) - 1)`` (jquant's rule before; the code
  ``-2^(b-1)`` is never used);
* ``half``: ``scale = amax / (2^(b-1) - 1/2)`` (Qwix's rule; every code used);
* ``signed``: the largest-magnitude value maps to ``-2^(b-1)``, the scale
  carries its sign (llama.cpp's Q4_0);
* ``max clip 14/15``: ``max`` with ``clip_ratio=14/15`` (the same scale as
  ``half`` up to rounding: when the quantized weights are identical to
  ``half``'s its perplexity is not evaluated again);
* ``asym``: asymmetric min-max with an integer zero point, the baseline.

RTN with `jquant.quantize_params` on ``layers_\\d+/(attn|mlp)/\\w+/kernel$``
(g128 with ``pad_groups``: 576 is not a multiple of 128); perplexity with
`jquant.eval.perplexity` on Wikipedia (`jquant.data.eval_windows`) and
Shakespeare (`jquant.data.shakespeare_windows`) windows. Results are cached in
``experiments/results/sym_grid.json`` (a rerun with the same settings skips
what is done) and tabulated in ``sym_grid.md``.

Usage:
    python experiments/sym_grid.py [--windows 16] [--length 512] [--bits 4,3] [--fresh]
"""

from __future__ import annotations

import argparse
import os
import time

from results_cache import corpus_evaluator, open_cache

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"
VARIANTS = ("max", "half", "signed", "max clip 14/15", "asym")  # half before its clipped twin
GRANS = ("g128", "channel")
DATASETS = ("wiki", "shakespeare")


def spec_for(bits: int, gran: str, variant: str):
  """The `jquant.QuantSpec` of one run."""
  import jquant
  layout = (dict(granularity="group", group_size=128, pad_groups=True) if gran == "g128"
            else dict(granularity="channel"))
  if variant == "asym":
    return jquant.QuantSpec(bits=bits, symmetric=False, **layout)
  if variant == "max clip 14/15":
    return jquant.QuantSpec(bits=bits, symmetric_scale="max", clip_ratio=14 / 15, **layout)
  return jquant.QuantSpec(bits=bits, symmetric_scale=variant, **layout)


def changed_fraction(qa, qb) -> float:
  """Fraction of quantized weights whose dequantized values differ between two quantized trees."""
  import jax
  import numpy as np
  import jquant
  leaves = lambda t: [x for x in jax.tree_util.tree_leaves(t, is_leaf=lambda x: isinstance(x, jquant.QArray))
                      if isinstance(x, jquant.QArray)]
  diff = total = 0
  for a, b in zip(leaves(qa), leaves(qb)):
    da, db = np.asarray(jquant.dequantize(a)), np.asarray(jquant.dequantize(b))
    diff += int((da != db).sum())
    total += da.size
  return diff / total


def run_name(bits: int, gran: str, variant: str) -> str:
  return f"W{bits} {gran} {variant}"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--windows", type=int, default=8, help="evaluation windows per corpus (the brief's 16 take "
                  "~50 min on the shared 2-core container)")
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--bits", default="4,3")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--fresh", action="store_true", help="ignore the cache")
  ap.add_argument("--out", default=os.path.join(RESULTS, "sym_grid"))
  args = ap.parse_args(argv)

  import jquant
  from jquant import models

  cache_path = args.out + ".json"
  settings = {"windows": args.windows, "length": args.length}
  cache, runs, save = open_cache(cache_path, settings, args.fresh)

  model = models.from_gguf()
  windows, evaluate = corpus_evaluator(model, args.windows, args.length, args.batch_size,
                                       keys=("wiki", "shakespeare"))

  if "float32" not in runs:
    runs["float32"] = evaluate(model.params)
    save()
  print("float32", runs["float32"], flush=True)
  for bits in (int(b) for b in args.bits.split(",")):
    for gran in GRANS:
      for variant in VARIANTS:
        name = run_name(bits, gran, variant)
        if name not in runs:
          t = time.perf_counter()
          q = jquant.quantize_params(model.params, [jquant.Rule(KERNELS, spec_for(bits, gran, variant))])
          quant_s = time.perf_counter() - t
          same = None
          if variant == "max clip 14/15":  # amax * 14/15 / (2^(b-1)-1) is half's scale up to rounding
            same = changed_fraction(q, jquant.quantize_params(
                model.params, [jquant.Rule(KERNELS, spec_for(bits, gran, "half"))]))
          if same == 0.0 and run_name(bits, gran, "half") in runs:  # identical weights: same perplexity
            half = runs[run_name(bits, gran, "half")]
            runs[name] = {**{k: half[k] for k in DATASETS}, "same_as": "half"}
          else:
            runs[name] = {**evaluate(q), "changed_vs_half": same}
          runs[name].update(quant_s=quant_s, bits=jquant.footprint(q).quantized_bits_per_weight)
          save()
        print(name, runs[name], flush=True)
  write_report(cache, args.out, os.cpu_count())


def write_report(cache, out, cpus):
  """``out``.md: one row per (bits, groups), perplexity per variant and the distance to asymmetric."""
  runs, st = cache["runs"], cache["settings"]
  fl = runs["float32"]
  lines = [f"# Symmetric grid conventions: SmolLM2-135M RTN, {st['windows']} x {st['length']} windows per corpus",
           "", f"Machine: {cpus}-core CPU container (shared). Weights: `layers_*/(attn|mlp)/*/kernel`, RTN "
           "min-max; embeddings and norms stay float. g128 uses pad_groups (576 = 4 x 128 + 64). "
           "`max` = amax / (2^(b-1)-1), `half` = amax / (2^(b-1)-1/2), `signed` = largest magnitude -> "
           "-2^(b-1) (llama.cpp Q4_0), `max clip 14/15` = max with clip_ratio 14/15, `asym` = min-max with an "
           "integer zero point (identical weights to `half` are marked `=half` and not re-evaluated). "
           "Last column: best symmetric (of max/half/signed) vs asym. At 4 bits `max clip 14/15` has `half`'s "
           "scale up to float rounding (scales differ in the last bit, hence not `=half`); at 3 bits `half` is "
           "`max` clipped to 6/7, so `max clip 14/15` is another point.", "",
           f"float32 perplexity: Wikipedia {fl['wiki']:.3f}, Shakespeare {fl['shakespeare']:.3f}", ""]
  for ds, title in (("wiki", "Wikipedia"), ("shakespeare", "Shakespeare")):
    lines += [f"## {title} perplexity", "", "| bits | groups | " + " | ".join(VARIANTS) + " | best sym vs asym |",
              "|---|---|" + "---:|" * (len(VARIANTS) + 1)]
    for bits in (4, 3):
      for gran in GRANS:
        row = [runs.get(run_name(bits, gran, v)) for v in VARIANTS]
        if any(r is None for r in row):
          continue
        vals = [r[ds] for r in row]
        cheap = {v: x for v, x in zip(VARIANTS, vals) if v in ("max", "half", "signed")}
        best = min(cheap, key=cheap.get)
        gap = cheap[best] / vals[VARIANTS.index("asym")] - 1
        cells = [f"{x:.3f}" + (" (=half)" if r.get("same_as") else "") for x, r in zip(vals, row)]
        lines.append(f"| W{bits} | {gran} | " + " | ".join(cells) +
                     f" | {best}: {gap * 100:+.1f}% |")
    lines.append("")
  with open(out + ".md", "w") as fh:
    fh.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
