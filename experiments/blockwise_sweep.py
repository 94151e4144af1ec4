"""Block-wise reconstruction against RTN, GPTQ and AWQ on SmolLM2-135M (W4 / W3, g128).

Every ``layers_*/(attn|mlp)`` Dense kernel is quantized (embedding/head and
norms stay float32), asymmetric g128 with ``pad_groups`` (576-wide inputs:
each column's last group holds 64 weights), the setting of
``experiments/gptq_sweep.py``. Calibration: news windows
(`jquant.data.calibration_windows`); evaluation: Wikipedia and Shakespeare
windows, the same as ``gptq_sweep.py``, whose cached RTN and GPTQ rows are
reused when its settings match (``experiments/results/gptq_sweep.json``);
the AWQ rows come from ``experiments/results/awq_sweep.json`` (16 Wikipedia
windows: another evaluation set, marked so).

Runs (``--runs``, comma-separated; each cached in
``experiments/results/blockwise_sweep.json``, a rerun skips those there):

* ``bw-rtn W4`` / ``bw-rtn W3``: block-wise reconstruction from RTN
  (learned scales, zero points, AutoRound rounding offsets);
* ``bw-gptq W4`` / ``bw-gptq W3``: from GPTQ's result (learned scales, zero
  points and weights, EfficientQAT Block-AP style);
* ``rtn W4`` / ``rtn W3``, ``gptq W4`` / ``gptq W3``: the baselines, if not
  cached by ``gptq_sweep.py``.

Writes ``blockwise_sweep.md`` (the table) and ``blockwise_sweep.png``
(perplexity against bits per weight, one line per method).

Usage:
    python experiments/blockwise_sweep.py [--runs "bw-rtn W4,bw-rtn W3"] [--steps 10] [--batch-size 2]
        [--check-batches 1] [--calib-windows 16] [--eval-windows 8] [--length 512] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from results_cache import open_cache

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"
CORPORA = ("wikipedia", "shakespeare")
LEARN = {"bw-rtn": ("scale", "zero", "round"), "bw-gptq": ("scale", "zero", "weight")}


def spec_for(bits):
  import jquant
  return jquant.QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=128, pad_groups=True)


def _baselines(settings):
  """Cached RTN / GPTQ rows of gptq_sweep.py (same windows) and AWQ rows of awq_sweep.py."""
  out = {}
  path = os.path.join(RESULTS, "gptq_sweep.json")
  if os.path.exists(path):
    c = json.load(open(path))
    if c.get("settings") == {k: settings[k] for k in ("calib_windows", "eval_windows", "length")}:
      for bits in (4, 3):
        for m in ("RTN", "GPTQ"):
          r = c["runs"].get(f"{m} W{bits} g128 asym")
          if r:
            out[f"{m.lower()} W{bits}"] = dict(r, source="gptq_sweep.json")
      if "float32" in c["runs"]:
        out["float32"] = dict(c["runs"]["float32"], source="gptq_sweep.json")
  path = os.path.join(RESULTS, "awq_sweep.json")
  if os.path.exists(path):
    c = json.load(open(path))
    for bits in (4, 3):
      r = c.get(f"w{bits}-awq")
      if r:
        out[f"awq W{bits}"] = {"wikipedia16": r.get("ppl"), "quant_s": r.get("quant_s"),
                               "bits": r.get("bits"), "source": "awq_sweep.json (16 Wikipedia windows)"}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default="bw-rtn W4,bw-rtn W3,bw-gptq W3,bw-gptq W4",
                  help="run names: '<method> W<bits> [variant]'; the variant word only names the cache entry")
  ap.add_argument("--calib-windows", type=int, default=16)
  ap.add_argument("--eval-windows", type=int, default=8, help="windows per evaluation corpus")
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--batch-size", type=int, default=2, help="calibration windows per step")
  ap.add_argument("--check-batches", type=int, default=1)
  ap.add_argument("--skip-positions", type=int, default=0)
  ap.add_argument("--lr", type=float, default=5e-3, help="offset / zero-point learning rate (steps)")
  ap.add_argument("--scale-lr", type=float, default=5e-3, help="log-scale learning rate")
  ap.add_argument("--fresh", action="store_true")
  ap.add_argument("--out", default=os.path.join(RESULTS, "blockwise_sweep"))
  args = ap.parse_args(argv)

  import jax
  import jquant
  from jquant import blockwise, data, eval as jeval, gptq, models

  settings = {k: getattr(args, k) for k in ("calib_windows", "eval_windows", "length")}
  cache, runs, save = open_cache(args.out + ".json", settings, args.fresh)
  for k, v in _baselines(settings).items():
    runs.setdefault(k, v)
  save()

  model = models.from_gguf()
  calib = data.calibration_windows(model.tokenizer, args.calib_windows, length=args.length)
  windows = {"wikipedia": data.eval_windows(model.tokenizer, args.eval_windows, length=args.length),
             "shakespeare": data.shakespeare_windows(model.tokenizer, args.eval_windows, length=args.length)}

  def evaluate(params):
    return {c: jeval.perplexity(model, params, w, batch_size=8, progress=False)[0] for c, w in windows.items()}

  if "float32" not in runs:
    runs["float32"] = {"quant_s": 0.0, "bits": 32.0, **evaluate(model.params)}
    save()
  for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
    if name in runs:
      print(name, runs[name], flush=True)
      continue
    method, b = name.split()[:2]   # a third word names a variant (other lr or options), recorded with the run
    rules = [jquant.Rule(KERNELS, spec_for(int(b[1:])))]
    t, cpu = time.perf_counter(), time.process_time()
    extra = {}
    if method == "rtn":
      q = jquant.quantize_params(model.params, rules)
    elif method == "gptq":
      q = gptq.quantize_model(model, model.params, calib, rules, batch_size=8, progress=False, verbose=False)
    else:
      init = None
      if method == "bw-gptq":
        init = gptq.quantize_model(model, model.params, calib, rules, batch_size=8, progress=False, verbose=False)
        extra["init_s"] = time.perf_counter() - t
      res = blockwise.quantize_model(model, model.params, calib, rules, init=init, steps=args.steps,
                                     batch_size=args.batch_size, check_batches=args.check_batches,
                                     skip_positions=args.skip_positions, learn=LEARN[method], lr=args.lr,
                                     scale_lr=args.scale_lr,
                                     progress=False, return_report=True)
      q = res.params
      rep = res.report
      extra.update(bw_s=rep.seconds, steps=args.steps, lr=args.lr, scale_lr=args.scale_lr,
                   skip_positions=args.skip_positions, batch_size=args.batch_size, learn=list(LEARN[method]),
                   loss_ratio=sum(x.loss for x in rep.blocks) / sum(x.start_loss for x in rep.blocks),
                   kept_start=sum(not x.learned for x in rep.blocks))
      print(rep, flush=True)
    q = jax.block_until_ready(q)
    quant_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    runs[name] = {"quant_s": quant_s, "cpu_s": cpu_s, "bits": jquant.footprint(q).quantized_bits_per_weight, **extra, **evaluate(q)}
    save()
    print(name, runs[name], flush=True)
  write_report(cache, args.out, os.cpu_count())


def write_report(cache, out, cpus):
  runs, st = cache["runs"], cache["settings"]
  fl = runs.get("float32", {})
  lines = [f"# Block-wise reconstruction on SmolLM2-135M: calibration {st['calib_windows']}x{st['length']} news "
           f"tokens, evaluation {st['eval_windows']}x{st['length']} Wikipedia and Shakespeare tokens", "",
           f"Machine: {cpus}-core CPU container, shared. All kernels of the 30 blocks, asymmetric g128 (pad_groups). "
           "Time: wall seconds of the whole quantization pass (bw-gptq: GPTQ's pass included) on the shared machine (other jobs ran alongside: wall times are inflated, several-fold for the blockwise rows; CPU seconds in the JSON where recorded). Loss ratio: the sum over blocks of "
           "the block output error after / before learning. Rows marked * come from another script's cache "
           "(its source column).", ""]
  if fl:
    lines += [f"float32 perplexity: Wikipedia {fl.get('wikipedia', float('nan')):.3f}, "
              f"Shakespeare {fl.get('shakespeare', float('nan')):.3f}", ""]
  lines += ["| run | bits/w | wiki | vs float | shakespeare | loss ratio | steps x batch | s | source |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for name, r in runs.items():
    if name == "float32":
      continue
    wiki = r.get("wikipedia")
    rel = f"{100 * (wiki / fl['wikipedia'] - 1):+.0f}%" if wiki and fl.get("wikipedia") else "-"
    lines.append(f"| {name} | {r.get('bits') or 0:.3f} | "
                 f"{f'{wiki:.2f}' if wiki else f'({r.get('wikipedia16', float('nan')):.2f} on 16)'} | {rel} | "
                 f"{r['shakespeare']:.2f} | " if "shakespeare" in r else
                 f"| {name} | {r.get('bits') or 0:.3f} | "
                 f"{f'{wiki:.2f}' if wiki else f'({r.get('wikipedia16', float('nan')):.2f} on 16)'} | {rel} | - | ")
    lines[-1] += (f"{r['loss_ratio']:.3f} | " if "loss_ratio" in r else "- | ")
    lines[-1] += (f"{r['steps']}x{r['batch_size']} | " if "steps" in r else "- | ")
    lines[-1] += f"{r.get('quant_s') or 0:.0f} | {('*' + r['source']) if 'source' in r else 'this script'} |"
  with open(out + ".md", "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4.5))
  methods = sorted({n.split()[0] for n in runs if n != "float32"})
  for m in methods:
    pts = sorted((r["bits"], r["wikipedia"]) for n, r in runs.items()
                 if n.split()[0] == m and r.get("bits") and r.get("wikipedia"))
    if pts:
      ax.plot(*zip(*pts), marker="o", label=m)
  if fl.get("wikipedia"):
    ax.axhline(fl["wikipedia"], color="k", lw=1, ls="--", label="float32")
  ax.set_yscale("log")
  ax.set_xlabel("bits per quantized weight")
  ax.set_ylabel("Wikipedia perplexity (log)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out + ".png", dpi=110)


if __name__ == "__main__":
  main()
