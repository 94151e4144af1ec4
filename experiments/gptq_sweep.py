"""GPTQ sweep on SmolLM2-135M: W4/W3 x g128/per-channel x act-order off/on x sym/asym, against RTN.

Every ``layers_*/(attn|mlp)`` Dense kernel is quantized (embedding/head and
norms stay float32). Calibration windows come from news text (Lee corpus),
evaluation windows from Wikipedia (disjoint). 576 is not a multiple of 128, so
g128 uses ``pad_groups=True`` (each column's last group on a 576-wide input
holds 64 weights), for RTN and GPTQ alike.

Results are cached in ``experiments/results/gptq_sweep.json`` (a rerun skips
the runs already there; ``--fresh`` starts over) and written as
``gptq_sweep.md`` (table) and ``gptq_sweep.png`` (plot).

Usage:
    python experiments/gptq_sweep.py [--calib-windows 32] [--eval-windows 16] [--length 512]
                                     [--skip-positions 0] [--bits 4,3] [--skip-study 1]
                                     [--sink-study 32,512] [--fresh]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"
POSITION_WINDOWS = 4  # evaluation windows the per-position logit errors use (g128 runs)


def spec_for(bits, gran, sym):
  import jquant
  if gran == "g128":
    return jquant.QuantSpec(bits=bits, symmetric=sym, granularity="group", group_size=128, pad_groups=True)
  return jquant.QuantSpec(bits=bits, symmetric=sym, granularity="channel")


def run_name(method, bits, gran, sym, act_order=False):
  name = f"{method} W{bits} {gran} {'sym' if sym else 'asym'}"
  return name + (" act-order" if act_order else "") if method == "GPTQ" else name


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calib-windows", type=int, default=32)
  ap.add_argument("--eval-windows", type=int, default=16)
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--skip-positions", type=int, default=0)
  ap.add_argument("--bits", default="4,3")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--skip-study", default="1",
                  help="comma list of skip_positions values also run for GPTQ W3 g128 asym ('' for none)")
  ap.add_argument("--sink-study", default="32,512",
                  help="comma list of Hessian weights of position 0 also run for GPTQ W3/W4 g128 asym act-order "
                       "('' for none)")
  ap.add_argument("--fresh", action="store_true")
  ap.add_argument("--out", default=os.path.join(RESULTS, "gptq_sweep"))
  args = ap.parse_args(argv)

  import jax
  import jquant
  from jquant import data, eval as jeval, gptq, models

  cache_path = args.out + ".json"
  settings = {k: getattr(args, k) for k in ("calib_windows", "eval_windows", "length", "skip_positions")}
  cache = {}
  if os.path.exists(cache_path) and not args.fresh:
    with open(cache_path) as f:
      cache = json.load(f)
    if cache.get("settings") != settings:
      cache = {}
  cache.setdefault("settings", settings)
  runs = cache.setdefault("runs", {})

  def save():
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    with open(cache_path, "w") as f:
      json.dump(cache, f, indent=1)

  model = models.from_gguf()
  calib = data.calibration_windows(model.tokenizer, args.calib_windows, length=args.length)
  evalw = data.eval_windows(model.tokenizer, args.eval_windows, length=args.length)

  def evaluate(params):
    return jeval.perplexity(model, params, evalw, batch_size=args.batch_size, progress=False)[0]

  def positions(params):
    """Relative logit error at the attention sink (position 0) and averaged over positions 1+."""
    err = jeval.per_position_error(model, model.params, params, evalw[:POSITION_WINDOWS],
                                   batch_size=POSITION_WINDOWS)
    return {"err_pos0": float(err[0]), "err_pos1+": float(err[1:].mean())}

  if "float32" not in runs:
    runs["float32"] = {"ppl": evaluate(model.params), "bits": 32.0, "quant_s": 0.0}
    save()
  bits_list = [int(b) for b in args.bits.split(",")]
  for bits, gran, sym in itertools.product(bits_list, ("g128", "channel"), (True, False)):
    rules = [jquant.Rule(KERNELS, spec_for(bits, gran, sym))]
    name = run_name("RTN", bits, gran, sym)
    if name not in runs:
      t = time.perf_counter()
      q = jax.block_until_ready(jquant.quantize_params(model.params, rules))
      qs = time.perf_counter() - t
      runs[name] = {"ppl": evaluate(q), "bits": jquant.footprint(q).quantized_bits_per_weight, "quant_s": qs}
      if gran == "g128":
        runs[name].update(positions(q))
      save()
    print(name, runs[name], flush=True)
    for act_order in (False, True):
      name = run_name("GPTQ", bits, gran, sym, act_order)
      if name in runs:
        print(name, runs[name], flush=True)
        continue
      t = time.perf_counter()
      q, rep = gptq.quantize_model(model, model.params, calib, rules, batch_size=args.batch_size,
                                   skip_positions=args.skip_positions, act_order=act_order,
                                   progress=False, verbose=False, return_report=True)
      qs = time.perf_counter() - t
      runs[name] = {"ppl": evaluate(q), "bits": jquant.footprint(q).quantized_bits_per_weight, "quant_s": qs,
                    "loss_ratio": rep.total_loss / rep.total_rtn_loss}
      if gran == "g128":
        runs[name].update(positions(q))
      save()
      print(name, runs[name], flush=True)
  # Attention sink: leave the first positions of each window out of the Hessians.
  rules = [jquant.Rule(KERNELS, spec_for(3, "g128", False))]
  for skip in [int(v) for v in args.skip_study.split(",") if v.strip()]:
    name = run_name("GPTQ", 3, "g128", False) + f" skip{skip}"
    if name not in runs:
      t = time.perf_counter()
      q, rep = gptq.quantize_model(model, model.params, calib, rules, batch_size=args.batch_size,
                                   skip_positions=skip, progress=False, verbose=False, return_report=True)
      qs = time.perf_counter() - t
      runs[name] = {"ppl": evaluate(q), "bits": jquant.footprint(q).quantized_bits_per_weight, "quant_s": qs,
                    "loss_ratio": rep.total_loss / rep.total_rtn_loss, **positions(q)}
      save()
    print(name, runs[name], flush=True)
  # ... or weight position 0 up in them (protecting the sink).
  for bits in bits_list:
    rules = [jquant.Rule(KERNELS, spec_for(bits, "g128", False))]
    for w0 in [float(v) for v in args.sink_study.split(",") if v.strip()]:
      name = run_name("GPTQ", bits, "g128", False, True) + f" pos0x{w0:g}"
      if name not in runs:
        pw = np.ones(args.length, np.float32)
        pw[0] = w0
        t = time.perf_counter()
        q, rep = gptq.quantize_model(model, model.params, calib, rules, batch_size=args.batch_size,
                                     position_weights=pw, act_order=True, progress=False, verbose=False,
                                     return_report=True)
        qs = time.perf_counter() - t
        runs[name] = {"ppl": evaluate(q), "bits": jquant.footprint(q).quantized_bits_per_weight, "quant_s": qs,
                      "loss_ratio": rep.total_loss / rep.total_rtn_loss, **positions(q)}
        save()
      print(name, runs[name], flush=True)
  write_report(cache, args.out, os.cpu_count())


def write_report(cache, out, cpus):
  runs, st = cache["runs"], cache["settings"]
  fl = runs["float32"]["ppl"]
  lines = [f"# GPTQ sweep: SmolLM2-135M, calib {st['calib_windows']}x{st['length']} (news), "
           f"eval {st['eval_windows']}x{st['length']} (Wikipedia)", "",
           f"Machine: {cpus}-core CPU container. Solver: block 128, damp 0.01, group parameters when a group's "
           f"first row is reached (act-order: contiguous groups, see jquant.gptq.solve); "
           f"Hessians skip the first {st['skip_positions']} positions of each window. "
           "Loss ratio = GPTQ / RTN layer loss sum_j (w-q)^T H (w-q)/2, summed over the 210 kernels. "
           "g128 on 576-wide inputs: pad_groups (last group of 64).", "",
           f"float32 perplexity: {fl:.3f}", "",
           "| bits | groups | sym | RTN ppl | GPTQ ppl | GPTQ act-order ppl | bits/w | loss ratio (act-order) | "
           "GPTQ quant s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  keys = []
  for bits in (4, 3):
    for gran in ("g128", "channel"):
      for sym in (True, False):
        rtn = runs.get(run_name("RTN", bits, gran, sym))
        g0 = runs.get(run_name("GPTQ", bits, gran, sym, False))
        g1 = runs.get(run_name("GPTQ", bits, gran, sym, True))
        if rtn is None:
          continue
        keys.append((bits, gran, sym, rtn, g0, g1))
        f = lambda r, k="ppl": "" if r is None else f"{r[k]:.3f}"
        lr = "" if g0 is None else f"{g0['loss_ratio']:.3f}" + ("" if g1 is None else f" ({g1['loss_ratio']:.3f})")
        qs = "" if g0 is None else f"{g0['quant_s']:.0f}"
        lines.append(f"| W{bits} | {gran} | {'sym' if sym else 'asym'} | {rtn['ppl']:.3f} | {f(g0)} | {f(g1)} | "
                     f"{rtn['bits']:.3f} | {lr} | {qs} |")
  lines += ["", f"Logit error ||logits_q - logits_f|| / ||logits_f|| on {POSITION_WINDOWS} evaluation windows: at "
            "position 0 (the attention sink: windows start without BOS) and averaged over positions 1+ (g128 runs; "
            "'skipN' = Hessians without the first N positions of each window; 'pos0xW' = position 0 weighted W "
            "times in the Hessians, `position_weights`).", "",
            "| run | wiki ppl | logit err pos 0 | logit err pos 1+ |", "|---|---:|---:|---:|"]
  for name, r in runs.items():
    if "err_pos0" in r:
      lines.append(f"| {name} | {r['ppl']:.3f} | {r['err_pos0']:.4f} | {r['err_pos1+']:.4f} |")
  with open(out + ".md", "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, bits in zip(axes, (4, 3)):
    ks = [k for k in keys if k[0] == bits]
    if not ks:
      continue
    x = np.arange(len(ks))
    for off, idx, label in ((-0.27, 3, "RTN"), (0.0, 4, "GPTQ"), (0.27, 5, "GPTQ act-order")):
      vals = [k[idx]["ppl"] if k[idx] is not None else np.nan for k in ks]
      ax.bar(x + off, vals, 0.27, label=label)
    ax.axhline(fl, color="k", lw=1, ls="--", label="float32")
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{k[1]}\n{'sym' if k[2] else 'asym'}" for k in ks])
    ax.set_title(f"W{bits}: Wikipedia perplexity (log scale)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out + ".png", dpi=110)


if __name__ == "__main__":
  main()
