"""GPTQ against round-to-nearest on SmolLM2-135M, in and out of the calibration domain.

Every ``layers_*/(attn|mlp)`` Dense kernel is quantized (embedding/head and
norms stay float32). Calibration windows come from news text (Lee corpus);
perplexity is measured on Wikipedia windows and on Shakespeare windows (a
genre the calibration never saw). 576 is not a multiple of 128, so g128 uses
``pad_groups=True`` (each column's last group on a 576-wide input holds 64
weights), for RTN and GPTQ alike.

Two parts:

* the grid: W4/W3 x g128/per-channel x sym/asym, RTN against GPTQ with
  jquant's default configuration (``gptq.quantize_model``'s defaults);
* the study (``--study``): GPTQ variants at chosen settings: the one-capture
  pass (``true_sequential=False``), act-order off, the attention-sink remedies
  (``token_norm_cap``, ``skip_positions``) and dampening.

Results are cached in ``experiments/results/gptq_sweep.json`` (a rerun skips
runs already there; ``--fresh`` starts over) and written as ``gptq_sweep.md``
and ``gptq_sweep.png``.

Usage:
    python experiments/gptq_sweep.py [--calib-windows 16] [--eval-windows 8] [--length 512]
        [--bits 4,3] [--study "W3 g128 asym,W4 g128 asym"] [--variants one-capture,no-act-order,...] [--fresh]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

from results_cache import corpus_evaluator, open_cache

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"
CORPORA = ("wikipedia", "shakespeare")

# GPTQ variants of the study: quantize_model keyword arguments on top of the defaults.
VARIANTS = {
    "default": {},
    "one-capture": {"true_sequential": False},
    "no-act-order": {"act_order": False},
    "no-sink-cap": {"token_norm_cap": None},
    "sink-cap 4": {"token_norm_cap": 4.0},
    "skip sink": {"skip_positions": 1, "token_norm_cap": None},
    "damp 0.1": {"damp": 0.1},
    "damp 0.01": {"damp": 0.01},
    "damp 0.03": {"damp": 0.03},
    "damp 0.3": {"damp": 0.3},
    "damp 0.01, no-sink-cap": {"damp": 0.01, "token_norm_cap": None},
}


def spec_for(bits, gran, sym):
  import jquant
  if gran == "g128":
    return jquant.QuantSpec(bits=bits, symmetric=sym, granularity="group", group_size=128, pad_groups=True)
  return jquant.QuantSpec(bits=bits, symmetric=sym, granularity="channel")


def setting_name(bits, gran, sym):
  return f"W{bits} {gran} {'sym' if sym else 'asym'}"


def parse_setting(name):
  b, gran, sym = name.split()
  return int(b[1:]), gran, sym == "sym"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calib-windows", type=int, default=16)
  ap.add_argument("--eval-windows", type=int, default=8, help="windows per evaluation corpus")
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--bits", default="4,3")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--study", default="W3 g128 asym,W4 g128 asym", help="settings of the variant study ('' for none)")
  ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "default"))
  ap.add_argument("--fresh", action="store_true")
  ap.add_argument("--out", default=os.path.join(RESULTS, "gptq_sweep"))
  args = ap.parse_args(argv)

  import jax
  import jquant
  from jquant import data, gptq, models

  cache_path = args.out + ".json"
  settings = {k: getattr(args, k) for k in ("calib_windows", "eval_windows", "length")}
  cache, runs, save = open_cache(cache_path, settings, args.fresh)

  model = models.from_gguf()
  calib = data.calibration_windows(model.tokenizer, args.calib_windows, length=args.length)
  windows, evaluate = corpus_evaluator(model, args.eval_windows, args.length, args.batch_size)

  def run(name, quantize):
    if name not in runs:
      t = time.perf_counter()
      out = quantize()
      q, rep = out if isinstance(out, tuple) else (out, None)
      q = jax.block_until_ready(q)
      r = {"quant_s": time.perf_counter() - t, "bits": jquant.footprint(q).quantized_bits_per_weight, **evaluate(q)}
      if rep is not None:
        r["loss_ratio"] = rep.total_loss / rep.total_rtn_loss
      runs[name] = r
      save()
    print(name, {k: round(v, 3) for k, v in runs[name].items()}, flush=True)

  def gptq_pass(rules, **kw):
    return lambda: gptq.quantize_model(model, model.params, calib, rules, batch_size=args.batch_size,
                                       progress=False, verbose=False, return_report=True, **kw)

  if "float32" not in runs:
    runs["float32"] = {"quant_s": 0.0, "bits": 32.0, **evaluate(model.params)}
    save()
  for bits, gran, sym in itertools.product([int(b) for b in args.bits.split(",")], ("g128", "channel"),
                                           (True, False)):
    rules = [jquant.Rule(KERNELS, spec_for(bits, gran, sym))]
    s = setting_name(bits, gran, sym)
    run(f"RTN {s}", lambda: jquant.quantize_params(model.params, rules))
    run(f"GPTQ {s}", gptq_pass(rules))
  for s in [v.strip() for v in args.study.split(",") if v.strip()]:
    rules = [jquant.Rule(KERNELS, spec_for(*parse_setting(s)))]
    for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
      run(f"GPTQ {s} {v}", gptq_pass(rules, **VARIANTS[v]))
  write_report(cache, args.out, os.cpu_count())


def _ratio(run):
  return f"{run['loss_ratio']:.3f}" if "loss_ratio" in run else "-"


def write_report(cache, out, cpus):
  import inspect

  from jquant import gptq
  runs, st = cache["runs"], cache["settings"]
  sig = inspect.signature(gptq.quantize_model).parameters
  defaults = ", ".join([f"{k}={sig[k].default!r}" for k in ("true_sequential", "token_norm_cap")] +
                       [f"{k}={v!r}" for k, v in gptq.model.MODEL_DEFAULTS.items()])
  fl = runs["float32"]
  lines = [f"# GPTQ against RTN: SmolLM2-135M, calibration {st['calib_windows']}x{st['length']} news tokens, "
           f"evaluation {st['eval_windows']}x{st['length']} Wikipedia and Shakespeare tokens", "",
           f"Machine: {cpus}-core CPU container. GPTQ defaults: {defaults}. g128 on 576-wide inputs: pad_groups "
           "(last group of 64). Loss ratio = GPTQ / RTN layer loss sum_j (w-q)^T H (w-q)/2 over the 210 kernels. "
           "Bold: GPTQ worse than RTN." + (" " + cache["notes"] if cache.get("notes") else ""), "",
           f"float32 perplexity: Wikipedia {fl['wikipedia']:.3f}, Shakespeare {fl['shakespeare']:.3f}", "",
           "| setting | RTN wiki | GPTQ wiki | RTN shakespeare | GPTQ shakespeare | bits/w | loss ratio | GPTQ s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  grid = []
  for bits, gran, sym in itertools.product((4, 3), ("g128", "channel"), (True, False)):
    s = setting_name(bits, gran, sym)
    r, g = runs.get(f"RTN {s}"), runs.get(f"GPTQ {s}")
    if r is None or g is None:
      continue
    grid.append((s, r, g))
    cell = lambda c: f"**{g[c]:.2f}**" if g[c] > r[c] else f"{g[c]:.2f}"
    lines.append(f"| {s} | {r['wikipedia']:.2f} | {cell('wikipedia')} | {r['shakespeare']:.2f} | "
                 f"{cell('shakespeare')} | {r['bits']:.3f} | {_ratio(g)} | {g['quant_s']:.0f} |")
  study = [(n, v) for n, v in runs.items() if n.startswith("GPTQ ") and len(n.split()) > 4]
  if study:
    lines += ["", "Variants (keyword arguments on top of the defaults, see `VARIANTS` in the script):", "",
              "| run | wiki | shakespeare | loss ratio | s |", "|---|---:|---:|---:|---:|"]
    for n, v in study:
      lines.append(f"| {n} | {v['wikipedia']:.2f} | {v['shakespeare']:.2f} | {_ratio(v)} | {v['quant_s']:.0f} |")
  with open(out + ".md", "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  if not grid:
    return
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  x = np.arange(len(grid))
  for ax, corpus in zip(axes, CORPORA):
    ax.bar(x - 0.2, [r[corpus] for _, r, _ in grid], 0.4, label="RTN")
    ax.bar(x + 0.2, [g[corpus] for _, _, g in grid], 0.4, label="GPTQ (defaults)")
    ax.axhline(fl[corpus], color="k", lw=1, ls="--", label="float32")
    ax.set_yscale("log")
    ax.set_xticks(x, [s.replace(" ", "\n", 1) for s, _, _ in grid], fontsize=8)
    ax.set_title(f"{corpus.capitalize()} perplexity (log scale)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out + ".png", dpi=110)


if __name__ == "__main__":
  main()
