"""Rotations (QuaRot-style randomised Hadamard) on SmolLM2-135M: weight-only W4, W4A8, W4A4 and static W8A8.

The tied output embedding is untied first (`jquant.rotation.untie_embeddings`:
the final norm's scale must fold into the head, not into the embedding), then
`jquant.rotation.rotate` folds a randomised Hadamard ``Q`` (576 = 72 * 8) into
the residual stream, a Hadamard per value head (64) and an online Hadamard
(1536 = 12 * 128) before every down projection; the rotated float model is
checked against the original on a calibration batch. Every
``layers_*/(attn|mlp)`` kernel is quantized (embedding/head and norms stay
float32), as in ``gptq_sweep.py``, whose unrotated rows (same windows, same
calls) this table quotes rather than recomputes. Every run is evaluated on the
Wikipedia and the Shakespeare windows of ``gptq_sweep.py`` (8 x 512 tokens
each, `jquant.data.eval_windows` / `jquant.data.shakespeare_windows`) in the
process that quantized it.

Runs (each timed, quantization only, on this machine):

* RTN / GPTQ W4 g128 sym with rotation (``jquant.gptq.quantize_model``'s defaults);
* W4A8: the rotated GPTQ weights as `jquant.ops.IntMatmulWeight` (int8
  per-token activations, integer products per group);
* W4A4: 4-bit per-token activations, RTN weights with and without rotation,
  and the rotated GPTQ weights;
* static per-tensor W8A8 (min-max calibration, `jquant.calibrate`) with rotation.

Results are cached in ``experiments/results/rotation_sweep.json`` (a rerun skips runs already there) and
written as ``rotation_sweep.md``. Quantized params are not cached: a cached run that lacks a corpus (rows
from before the Shakespeare column) is quantized again and evaluated on the missing corpus only; its first
time stays, the new one is kept as ``quant_s_rerun``, and ``--recheck REGEX`` also re-evaluates Wikipedia
for the matching rows (``wikipedia_rerun``: the recomputed weights against the cached number). ``--rows
REGEX`` restricts a process to the matching runs (the others are neither computed nor evaluated).

Usage:
    python experiments/rotation_sweep.py [--calib-windows 16] [--eval-windows 8] [--length 512] [--smoke]
    python experiments/rotation_sweep.py --report   # the .md from the cached results only
    python experiments/rotation_sweep.py --only-partial --out experiments/results/rotation_sweep_partial
    python experiments/rotation_sweep.py --only-partial --keep 507 --gptq --out experiments/results/rotation_sweep_keep
        [--rows "GPTQ|^RTN W4"] [--recheck "^GPTQ W4"]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

from results_cache import open_cache

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"
CORPORA = ("wikipedia", "shakespeare")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calib-windows", type=int, default=16)
  ap.add_argument("--eval-windows", type=int, default=8)
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--partial", action="store_true", help="also: the rotation without the residual part (RTN)")
  ap.add_argument("--only-partial", action="store_true", help="only the runs of --partial")
  ap.add_argument("--keep", type=lambda v: tuple(int(c) for c in v.split(",") if c), default=(),
                  help="with --only-partial: rotate all but these residual channels (SmolLM2's massive one: 507)")
  ap.add_argument("--gptq", action="store_true", help="with --only-partial: also GPTQ (and its W4A8/W4A4) on that "
                  "rotation")
  ap.add_argument("--rows", default="", help="regex: only the runs whose names match (default: all)")
  ap.add_argument("--recheck", default="", help="regex: recomputed cached runs matching it re-evaluate Wikipedia "
                  "too (stored as wikipedia_rerun)")
  ap.add_argument("--report", action="store_true", help="only rewrite the .md from the cached results")
  ap.add_argument("--smoke", action="store_true", help="a toy model, to check the script (not cached)")
  ap.add_argument("--out", default=os.path.join(RESULTS, "rotation_sweep"))
  args = ap.parse_args(argv)

  settings = {k: getattr(args, k) for k in ("calib_windows", "eval_windows", "length")}
  if args.report:
    return write_report(open_cache(args.out + ".json", settings)[0], args.out, os.cpu_count())

  import jax
  import numpy as np

  import jquant
  from jquant import data, gptq, models
  from jquant.calibrate import W8A8Spec, calibrate, convert
  from jquant.rotation import rotate, untie_embeddings

  if args.smoke:
    model = models.llama_init(models.LlamaConfig(dim=48, n_heads=4, n_kv_heads=2, ffn_dim=96), jax.random.key(0))
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (4, 32)).astype(np.int32)
    windows = {c: rng.integers(0, 256, (2, 32)).astype(np.int32) for c in CORPORA}
    cache, runs, save = {"runs": {}}, {}, lambda: None
    cache["runs"] = runs
  else:
    cache, runs, save = open_cache(args.out + ".json", settings)
    model = models.from_gguf()
    calib = data.calibration_windows(model.tokenizer, args.calib_windows, length=args.length)
    windows = {"wikipedia": data.eval_windows(model.tokenizer, args.eval_windows, length=args.length),
               "shakespeare": data.shakespeare_windows(model.tokenizer, args.eval_windows, length=args.length)}

  ppl = {c: ppl_fn(w, args.batch_size) for c, w in windows.items()}
  run = run_fn(runs, save, ppl, args.rows, args.recheck)
  model = untie_embeddings(model)
  if args.only_partial:  # (a second process may run this part alongside the main one, into another cache)
    partial_runs(runs, run, model, calib, args.keep, args.gptq, args.batch_size)
    if not args.smoke:
      write_report(*open_cache(os.path.join(RESULTS, "rotation_sweep.json"), settings)[:1],
                   os.path.join(RESULTS, "rotation_sweep"), os.cpu_count())
    return
  t = time.perf_counter()
  rot = jax.block_until_ready(rotate(model, model.params, calib[:2]))
  rot_s = time.perf_counter() - t
  if "rotation" in runs:  # keep the first measurement; a rerun's rotation is recorded alongside
    runs["rotation"].update(quant_s_rerun=rot_s, change_rerun=rot.change)
  else:
    runs["rotation"] = {"quant_s": rot_s, "change": rot.change, "plan": rot.plan.summary()}
  print("rotation", runs["rotation"], flush=True)
  rules = RULES()
  rtn = lambda p: jquant.quantize_params(p, rules)

  run("float32 rotated", rot.model, lambda: rot.params, rot_s)
  run("RTN W4 g128 sym + rotation", rot.model, lambda: rtn(rot.params), rot_s)
  run("W4A8 RTN + rotation", rot.model, lambda: act(rtn(rot.params), 8), rot_s)
  run("W4A8 RTN (no rotation)", model, lambda: act(rtn(model.params), 8))
  run("W4A4 RTN + rotation", rot.model, lambda: act(rtn(rot.params), 4), rot_s)
  run("W4A4 RTN (no rotation)", model, lambda: act(rtn(model.params), 4))
  gptq_rows(run, rot.model, rot.params, calib, rot_s, "rotation", args.batch_size)  # the long pass last
  static = [jquant.Rule(KERNELS, W8A8Spec(activations="static"))]

  def w8a8_static():
    stats = calibrate(rot.model, rot.params, calib, static, batch_size=args.batch_size, progress=False)
    return convert(rot.params, stats, static)

  run("W8A8 static per-tensor + rotation", rot.model, w8a8_static, rot_s)
  if args.partial:
    partial_runs(runs, run, model, calib)
  if not args.smoke:
    write_report(cache, args.out, os.cpu_count())


def ppl_fn(windows, batch_size):
  from jquant import eval as jeval
  return lambda m, params: jeval.perplexity(m, params, windows, batch_size=batch_size, progress=False)[0]


def run_fn(runs, save, ppl, rows="", recheck=""):
  """``run(name, model, quantize, base_s)``: times ``quantize()``, evaluates on every corpus of ``ppl`` (a
  dict corpus -> ``ppl(model, params)``) the cached run lacks, caches; returns the params (None when nothing
  was computed). ``run.needs(name)``: whether ``run`` would compute ``name``.

  ``rows`` (regex, '' = all): runs not matching are skipped. A cached run missing a corpus is recomputed and
  evaluated on that corpus only (``quant_s_rerun``: the new time); with ``recheck`` matching its name,
  Wikipedia is evaluated again too, as ``wikipedia_rerun``.
  """
  import jax
  import jquant

  def needs(name):
    return bool((not rows or re.search(rows, name)) and any(c not in runs.get(name, {}) for c in ppl))

  def run(name, m, quantize, base_s=0.0):
    if not needs(name):
      if name in runs:
        print(name, {k: round(v, 3) for k, v in runs[name].items() if isinstance(v, float)}, flush=True)
      return None
    t = time.perf_counter()
    q = jax.block_until_ready(quantize())
    s = time.perf_counter() - t + base_s
    r = runs.get(name)
    todo = [c for c in ppl if r is None or c not in r]
    if r is None:
      r = runs[name] = {"quant_s": s}
    else:
      r["quant_s_rerun"] = s
      if recheck and re.search(recheck, name):
        r["wikipedia_rerun"] = ppl["wikipedia"](m, q)
    bits = jquant.footprint(q).quantized_bits_per_weight
    if bits:
      r["bits"] = bits
    for c in todo:
      r[c] = ppl[c](m, q)
      save()
    print(name, {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}, flush=True)
    return q

  run.needs = needs
  return run


def gptq_rows(run, model, params, calib, base_s, what, batch_size):
  """GPTQ W4 g128 sym on a rotated model, and W4A8 / W4A4 on its weights: one GPTQ pass, only if one of the
  three runs needs it."""
  from jquant import gptq
  names = [f"{m} + {what}" for m in ("GPTQ W4 g128 sym", "W4A8 GPTQ", "W4A4 GPTQ")]
  if not any(run.needs(n) for n in names):
    for n in names:
      run(n, model, None)
    return
  t = time.perf_counter()
  q = gptq.quantize_model(model, params, calib, RULES(), batch_size=batch_size, progress=False, verbose=False)
  s = time.perf_counter() - t + base_s
  run(names[0], model, lambda: q, s)
  run(names[1], model, lambda: act(q, 8), s)
  run(names[2], model, lambda: act(q, 4), s)


def RULES():
  import jquant
  w4 = jquant.QuantSpec(bits=4, symmetric=True, granularity="group", group_size=128, pad_groups=True)
  return [jquant.Rule(KERNELS, w4)]


def act(tree, bits):
  """Every QArray of ``tree`` as an `IntMatmulWeight` with ``bits``-bit per-token activations."""
  import jax
  import jquant
  return jax.tree_util.tree_map(lambda a: jquant.ops.IntMatmulWeight(a, bits) if isinstance(a, jquant.QArray) else a,
                                tree, is_leaf=lambda a: isinstance(a, jquant.QArray))


def partial_runs(runs, run, model, calib, keep=(), with_gptq=False, batch_size=8):
  """RTN W4 and W4A4 with the per-head and online rotations only (no residual rotation); with ``keep``, the
  full rotation leaving those residual channels (and their norm gains) fixed instead; ``with_gptq``: GPTQ W4
  (and W4A8/W4A4 on its weights) on that rotation too, first."""
  import jquant
  from jquant.rotation import RotationConfig, rotate
  rtn = lambda p: jquant.quantize_params(p, RULES())
  t = time.perf_counter()
  cfg = RotationConfig(keep_channels=keep) if keep else RotationConfig(residual=False)
  what = f"rotation keeping channel(s) {','.join(map(str, keep))}" if keep else "heads/online rotation only"
  part = rotate(model, model.params, calib[:2], config=cfg)
  part_s = time.perf_counter() - t
  if with_gptq:
    gptq_rows(run, part.model, part.params, calib, part_s, what, batch_size)
  run(f"RTN W4 g128 sym + {what}", part.model, lambda: rtn(part.params), part_s)
  run(f"W4A4 RTN + {what}", part.model, lambda: act(rtn(part.params), 4), part_s)
  run(f"W4A8 RTN + {what}", part.model, lambda: act(rtn(part.params), 8), part_s)


QUOTED = {  # from experiments/results/gptq_sweep.json (same windows and calls), W4 g128 sym, no rotation
    "float32": "float32", "RTN W4 g128 sym": "RTN W4 g128 sym", "GPTQ W4 g128 sym": "GPTQ W4 g128 sym"}


def write_report(cache, out, cpus):
  runs, st = cache["runs"], cache["settings"]
  quoted = {}
  path = os.path.join(RESULTS, "gptq_sweep.json")
  if os.path.exists(path):
    with open(path) as fh:
      g = json.load(fh)
    if {k: g["settings"].get(k) for k in st} == st:
      quoted = {k: g["runs"][v] for k, v in QUOTED.items() if v in g["runs"]}
  for part in (out + "_partial.json", out + "_keep.json"):  # --only-partial processes run alongside
    if os.path.exists(part):
      with open(part) as fh:
        p = json.load(fh)
      if p.get("settings") == st:
        runs = {**runs, **{k: v for k, v in p["runs"].items() if k not in runs}}
  fl = quoted.get("float32", {}).get("wikipedia") or runs["float32 rotated"]["wikipedia"]
  fs = quoted.get("float32", {}).get("shakespeare") or runs["float32 rotated"].get("shakespeare")
  rows = [(k + " (gptq_sweep)", v) for k, v in quoted.items()] + [(k, v) for k, v in runs.items() if "wikipedia" in v]
  lines = [f"# Rotations on SmolLM2-135M: calibration {st['calib_windows']}x{st['length']} news tokens, evaluation "
           f"{st['eval_windows']}x{st['length']} Wikipedia and Shakespeare tokens", "",
           f"Machine: {cpus}-core CPU container, shared (times are wall-clock quantization, rotation included where "
           f"used). Rotation: {runs['rotation']['plan']}; rotated float model's relative logit change on a "
           f"calibration batch {runs['rotation']['change']:.2g}; rotating took {runs['rotation']['quant_s']:.0f} s. "
           "W4 = symmetric 4-bit, g128 (pad_groups), every block kernel; A8/A4 = per-token symmetric int "
           "activations through jquant.ops.IntMatmulWeight; W8A8 static = per-tensor min-max activation scale, "
           "per-channel int8 weights. Shakespeare '-': not measured (rows from before the Shakespeare column "
           "that were not rerun). Rerun rows: wiki (rerun) is the recomputed weights' Wikipedia perplexity, to "
           "compare with the cached one; quant s is the first run's time.", "",
           "| run | wiki ppl | vs float | shakespeare ppl | vs float | wiki (rerun) | quant s |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for name, v in rows:
    sh = v.get("shakespeare")
    shs = f"{sh:.2f} | {100 * (sh / fs - 1):+.1f}%" if sh and fs else "- | -"
    rr = f"{v['wikipedia_rerun']:.2f}" if "wikipedia_rerun" in v else "-"
    lines.append(f"| {name} | {v['wikipedia']:.2f} | {100 * (v['wikipedia'] / fl - 1):+.1f}% | {shs} | {rr} | "
                 f"{v['quant_s']:.0f} |")
  with open(out + ".md", "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
