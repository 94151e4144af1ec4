"""AWQ on SmolLM2-135M: RTN vs AWQ (and its options) vs GPTQ vs AWQ+GPTQ, W4/W3 g128.

Every run quantizes the attention and MLP kernels of SmolLM2-135M (embedding
left in float32) and measures Wikipedia perplexity and the relative logit
error against the float model at position 0 (the attention sink) and at the
other positions. Results are cached in ``experiments/results/awq_sweep.json``
(re-running skips finished runs) and written as a markdown table and a plot.

Usage:
    python experiments/awq_sweep.py                        # the default run list
    python experiments/awq_sweep.py --runs w3-rtn,w3-awq --calib-windows 16 --eval-windows 16

Run names: ``{w4,w3}-{rtn,awq,awq-skip1,awq-noclip,awq-both,awq-qprop,awq-score8,awq-tied,gptq,awq+gptq,
awq-noclip+gptq}``. AWQ runs through the generic model pass (`jquant.awq` on the traced program, folds
derived and verified), the same path any Flax model takes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DEFAULT_RUNS = ("w4-rtn,w4-awq,w3-rtn,w3-awq,w3-awq-skip1,w3-awq-noclip,w3-awq-qprop,w3-awq-both,"
                "w4-gptq,w4-awq+gptq,w3-gptq,w3-awq+gptq")

AWQ_OPTIONS = {
    "awq": {},
    "awq-skip1": {"skip_positions": 1},
    "awq-noclip": {"clip": False},
    "awq-both": {"variant": "both"},
    "awq-qprop": {"propagate": "quantized"},
    "awq-score8": {"score_windows": 8},
    "awq-tied": {"tied_folds": True},  # also scale v -> o with scales tied over each kv head's query heads
}
# Group names: the fold's source inside the block (older caches used attn_in / mlp_in / mlp_out / attn_out).
GROUPS = (("attn_norm", "attn_in"), ("attn/v", "attn_out"), ("mlp_norm", "mlp_in"), ("mlp/up", "mlp_out"))


def spec_for(bits: int):
  import jquant
  # SmolLM2's width 576 is not a multiple of 128: the last group of each column holds 64 rows.
  return jquant.QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=128, pad_groups=True)


def rules_for(bits: int):
  import jquant
  return [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel$", spec_for(bits))]


def quantize(run: str, model, calib, score_windows: int):
  """Returns (quantized params, seconds, extra info) for a run name."""
  import jquant
  from jquant import awq
  bits_s, method = run.split("-", 1)
  bits = int(bits_s[1:])
  rules = rules_for(bits)
  t = time.perf_counter()
  info = {}
  if method == "rtn":
    q = jquant.quantize_params(model.params, rules)
  elif method.endswith("+gptq"):
    from jquant import gptq
    base = method[: -len("+gptq")]
    scaled = awq.scale_model(model, model.params, calib, rules, score_windows=score_windows,
                             **AWQ_OPTIONS[base])
    q = gptq.quantize_model(model, scaled.params, calib, rules, verbose=False)
    info["alphas"] = _alpha_summary(scaled)
  elif method == "gptq":
    from jquant import gptq
    q = gptq.quantize_model(model, model.params, calib, rules, verbose=False)
  else:
    q, scaled = awq.quantize_model(model, model.params, calib, rules, score_windows=score_windows,
                                   return_scaled_float=True, **AWQ_OPTIONS[method])
    info["alphas"] = _alpha_summary(scaled)
  if isinstance(q, tuple):
    q = q[0]
  return q, time.perf_counter() - t, info


def _alpha_summary(scaled):
  out = {}
  for r in scaled.reports:
    out.setdefault(r.group, []).append(round(r.alpha, 3))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default=DEFAULT_RUNS)
  ap.add_argument("--calib-windows", type=int, default=16)
  ap.add_argument("--score-windows", type=int, default=4)
  ap.add_argument("--eval-windows", type=int, default=16)
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--cache", default=os.path.join(RESULTS, "awq_sweep.json"))
  ap.add_argument("--merge", default="", help="comma-separated extra cache files to merge into --cache, then report")
  args = ap.parse_args(argv)
  if args.merge:
    cache = json.load(open(args.cache))
    for path in args.merge.split(","):
      cache.update({k: v for k, v in json.load(open(path)).items() if k != "float"})
    _save(cache, args.cache)
    write_report(cache, cache["float"]["setting"])
    return 0

  import jax
  import numpy as np
  import jquant
  from jquant import data, eval as jeval, models

  model = models.from_gguf()
  calib = data.calibration_windows(model.tokenizer, args.calib_windows, length=args.length)
  evalw = data.eval_windows(model.tokenizer, args.eval_windows, length=args.length)
  setting = f"calib {args.calib_windows}x{args.length} (score {args.score_windows}), eval {args.eval_windows}x{args.length}"
  cache = json.load(open(args.cache)) if os.path.exists(args.cache) else {}
  cache = {k: v for k, v in cache.items() if v.get("setting") == setting}
  if "float" not in cache:
    ppl, _ = jeval.perplexity(model, model.params, evalw, batch_size=4, progress=False)
    cache["float"] = {"setting": setting, "ppl": ppl, "bits": 32.0, "quant_s": 0.0, "err0": 0.0, "err_rest": 0.0}
    _save(cache, args.cache)
  print(f"float32 ppl {cache['float']['ppl']:.3f} ({setting}; {os.cpu_count()} CPUs, {jax.default_backend()})",
        flush=True)
  for run in args.runs.split(","):
    if run in cache:
      print(f"{run}: cached ppl {cache[run]['ppl']:.3f}")
      continue
    try:
      q, secs, info = quantize(run, model, calib, args.score_windows)
    except (ImportError, AttributeError) as e:  # a method not available in this checkout
      print(f"{run}: skipped ({e})")
      continue
    # Dequantized weights give the same logits as packed ones (qdot dequantizes) and run on any checkout.
    qf = jquant.dequantize_params(q)
    ppl, _ = jeval.perplexity(model, qf, evalw, batch_size=4, progress=False)
    err = jeval.per_position_error(model, model.params, qf, evalw[: min(8, len(evalw))], batch_size=4)
    cache[run] = {"setting": setting, "ppl": ppl, "bits": jquant.footprint(q).quantized_bits_per_weight,
                  "quant_s": secs, "err0": float(err[0]), "err_rest": float(np.mean(err[1:])), **info}
    _save(cache, args.cache)
    print(f"{run}: ppl {ppl:.3f}  quant {secs:.0f}s  logit err pos0 {err[0]:.4f} pos1+ {np.mean(err[1:]):.4f}",
          flush=True)
  write_report(cache, setting)


def _save(cache, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(cache, f, indent=1)


def write_report(cache, setting):
  rows = [("float", cache["float"])] + [(k, v) for k, v in cache.items() if k != "float"]
  lines = [f"# AWQ sweep: SmolLM2-135M, asymmetric g128, {setting}", "",
           "Machine: 2-core CPU container. Perplexity on Wikipedia; logit error = ||logits_q - logits_f|| / "
           "||logits_f|| at position 0 (attention sink) and averaged over positions 1+.", "",
           "| run | bits/w | wiki ppl | quant s | logit err pos0 | logit err pos1+ |",
           "|---|---:|---:|---:|---:|---:|"]
  for k, v in rows:
    lines.append(f"| {k} | {v['bits']:.3f} | {v['ppl']:.3f} | {v['quant_s']:.0f} | {v['err0']:.4f} | "
                 f"{v['err_rest']:.4f} |")
  alpha_rows = [(k, v["alphas"]) for k, v in rows if "alphas" in v]
  if alpha_rows:
    lines += ["", "Chosen alpha per group (fold source), averaged over the 30 blocks:", "",
              "| run | " + " | ".join(new for new, _ in GROUPS) + " |", "|---|" + "---:|" * len(GROUPS)]
    for k, a in alpha_rows:
      def mean(names):
        vals = [v for n in names for v in a.get(n, [])]
        return f"{sum(vals) / len(vals):.2f}" if vals else "-"
      lines.append(f"| {k} | " + " | ".join(mean(g) for g in GROUPS) + " |")
  with open(os.path.join(RESULTS, "awq_sweep.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4.5))
  names = [k for k, _ in rows if k != "float"]
  ax.barh(names, [cache[k]["ppl"] for k in names], color=["C0" if k.startswith("w4") else "C1" for k in names])
  ax.axvline(cache["float"]["ppl"], color="gray", ls="--", label=f"float32 {cache['float']['ppl']:.2f}")
  ax.set_xlabel("Wikipedia perplexity (lower is better)")
  ax.set_xscale("log")
  ax.set_title("SmolLM2-135M: AWQ vs RTN vs GPTQ (asym g128)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(RESULTS, "awq_sweep.png"), dpi=120)
  print("\n".join(lines))


if __name__ == "__main__":
  sys.exit(main())
