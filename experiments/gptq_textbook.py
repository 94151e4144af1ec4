"""Textbook GPTQ against jquant's GPTQ on SmolLM2-135M, on the windows of experiments/gptq_sweep.py.

An independent GPTQ written from the reference implementation
(IST-DASLab/gptq, ``gptq.py`` + ``quant.py`` + ``llama.py``; Frantar et al.,
2022, arXiv:2210.17323), in NumPy float64, sharing nothing with
`jquant.gptq` but the model's forward:

* true-sequential inside each block: q/k/v, then o, then gate/up, then down,
  each group calibrated on the block's inputs with the groups before it
  already quantized; the next block's inputs come from the quantized block;
* ``H = 2/n X^T X`` over the n calibration tokens (float64), dead inputs
  (``H_ii = 0``) set to 1 on the diagonal with their weights zeroed;
* dampening ``0.01 * mean(diag H)``; ``U`` = upper Cholesky factor of
  ``(H + damp I)^-1``; act-order off;
* lazy-batch updates in blocks of 128 columns (the reference's
  ``W1[:, i:] -= err outer U[i, i:]`` inside a block, ``W[:, i2:] -= Err1 @
  U[i1:i2, i2:]`` after it);
* groups of 128 inputs, asymmetric min-max grid (range widened to hold 0,
  ``zero = round(-min / scale)``) computed from the group's error-updated
  weights when its first column is reached; a 576-wide input's last group
  holds 64 columns, as jquant's ``pad_groups=True``. (The reference reads
  the group from the outer W, which lacks the updates made inside the
  current lazy block; with groups and blocks both 128 wide every group starts
  a block, so the outer W is up to date there. With groups smaller than the
  block the reference's grids come from stale weights, jquant's do not.)

The layer inputs are recorded with jquant's forward (`jquant.capture` on the
model's own ``Block``), and the quantized model is evaluated as float weights
(the dequantized values) with `jquant.eval.perplexity`. On the same windows
(calibration 16 news windows x 512, evaluation 8 Wikipedia and 8 Shakespeare
windows x 512, as ``gptq_sweep.py``) the script also runs
`jquant.gptq.quantize_model` with its defaults and with the textbook's options
(``act_order=False, damp=0.01, token_norm_cap=None``), and, on every textbook
layer's own ``(W, H)``, `jquant.gptq.solve` with the textbook's options: a
per-matrix check on identical inputs.

Results are cached in ``experiments/results/gptq_textbook.json`` (a rerun
skips runs already there; ``--fresh`` starts over) and written as
``gptq_textbook.md``. Runs can be split over processes (each with its own
``--out``) and joined with ``--merge``; ``--sweep-rows`` takes missing
jquant-defaults rows from ``gptq_sweep.json`` (refused unless its windows and
float32 perplexities are these).

Usage:
    python experiments/gptq_textbook.py [--settings "W4 g128 asym,W3 g128 asym"] [--calib-windows 16]
        [--eval-windows 8] [--length 512] [--runs textbook,jquant,jquant-textbook-options] [--fresh]
        [--out PREFIX] [--merge a.json,b.json] [--sweep-rows] [--report-only]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from results_cache import corpus_evaluator, open_cache

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"
SEQUENTIAL = (("attn/q", "attn/k", "attn/v"), ("attn/o",), ("mlp/gate", "mlp/up"), ("mlp/down",))
TEXTBOOK_OPTIONS = {"act_order": False, "damp": 0.01, "token_norm_cap": None}
RUNS = ("textbook", "textbook-f32-hessian", "jquant", "jquant-textbook-options")
SHOW_LAYERS = ("layers_0/attn/q/kernel", "layers_0/mlp/down/kernel", "layers_15/attn/o/kernel",
               "layers_15/mlp/up/kernel", "layers_29/mlp/down/kernel")


# ----------------------------------------------------------------------------------------------
# The textbook solver (reference: quant.py Quantizer.find_params / quantize, gptq.py fasterquant)
# ----------------------------------------------------------------------------------------------


def find_params(x, bits: int, sym: bool):
  """Per-row min-max grid of ``x`` (rows, cols) float64: ``(scale, zero)`` each (rows, 1).

  The range always holds 0 (``min(x.min, 0)``, ``max(x.max, 0)``); an all-zero
  row gets the range [-1, 1]. Asymmetric: ``scale = (max - min) / (2^b - 1)``,
  ``zero = round(-min / scale)``; symmetric: ``max = max(|min|, max)``, range
  ``[-max, max]``, ``zero = 2^(b-1)``.
  """
  maxq = 2**bits - 1
  xmin = np.minimum(x.min(axis=1), 0.0)
  xmax = np.maximum(x.max(axis=1), 0.0)
  if sym:
    xmax = np.maximum(np.abs(xmin), xmax)
    xmin = np.where(xmin < 0, -xmax, xmin)
  both_zero = (xmin == 0) & (xmax == 0)
  xmin = np.where(both_zero, -1.0, xmin)
  xmax = np.where(both_zero, 1.0, xmax)
  scale = (xmax - xmin) / maxq
  zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
  return scale[:, None], zero[:, None]


def fake_quantize(x, scale, zero, bits: int):
  """``scale * (clip(round(x / scale) + zero, 0, 2^b - 1) - zero)`` (round half to even, as torch.round)."""
  q = np.clip(np.round(x / scale) + zero, 0, 2**bits - 1)
  return scale * (q - zero)


def fasterquant(w, h, *, bits: int, group_size: int, sym: bool = False, block_size: int = 128,
                percdamp: float = 0.01):
  """GPTQ of one layer: ``w`` (out, in) float64 (PyTorch layout), ``h`` (in, in) float64.

  Returns:
    ``(q, loss)``: the dequantized weights (out, in) float64 and the
    reference's error estimate ``sum (w - q)^2 / d^2 / 2`` (d the diagonal of
    the inverse Hessian's Cholesky factor).

  Raises:
    numpy.linalg.LinAlgError: ``h + damp I`` is not positive definite.
  """
  w = np.array(w, np.float64)
  h = np.array(h, np.float64)
  columns = w.shape[1]
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  h[np.diag_indices(columns)] += percdamp * np.mean(np.diag(h))
  # cholesky -> cholesky_inverse -> cholesky(upper): U with U^T U = (H + damp I)^-1
  lower = np.linalg.cholesky(h)
  inv_lower = np.linalg.solve(lower, np.eye(columns))
  u = np.linalg.cholesky(inv_lower.T @ inv_lower).T
  q = np.zeros_like(w)
  losses = np.zeros_like(w)
  scale = zero = None
  for i1 in range(0, columns, block_size):
    i2 = min(i1 + block_size, columns)
    w1 = w[:, i1:i2].copy()
    err1 = np.zeros_like(w1)
    u1 = u[i1:i2, i1:i2]
    for i in range(i2 - i1):
      if (i1 + i) % group_size == 0:  # the group's grid, from the outer W (as the reference: with blocks
        scale, zero = find_params(w[:, i1 + i:i1 + i + group_size], bits, sym)  # of 128, updated so far)
      col = w1[:, i]
      d = u1[i, i]
      qc = fake_quantize(col[:, None], scale, zero, bits)[:, 0]
      q[:, i1 + i] = qc
      losses[:, i1 + i] = (col - qc) ** 2 / d**2 / 2
      e = (col - qc) / d
      w1[:, i:] -= np.outer(e, u1[i, i:])
      err1[:, i] = e
    w[:, i2:] -= err1 @ u[i1:i2, i2:]
  return q, float(losses.sum())


def h_loss(w, q, h):
  """``sum_j (w - q)_j^T H (w - q)_j / 2`` for (out, in) weights: the layer's mean squared output error."""
  e = np.asarray(w, np.float64) - np.asarray(q, np.float64)
  return float(0.5 * np.sum((e @ h) * e))


# ----------------------------------------------------------------------------------------------
# The model walk (reference: llama.py llama_sequential)
# ----------------------------------------------------------------------------------------------


def textbook_gptq(model, calib, *, bits: int, group_size: int, sym: bool, batch_size: int = 8,
                  solver_check: bool = True, hessian_dtype=np.float64, progress: bool = True):
  """Textbook GPTQ of every ``layers_*/(attn|mlp)`` kernel of a jquant Llama model.

  ``hessian_dtype``: the dtype ``X^T X`` is accumulated in (float32: as the
  reference does on its GPU; the solve is float64 either way).

  Returns:
    ``(params, layers)``: the parameter tree with dequantized float32 kernels,
    and per kernel path ``{"loss", "ref_loss", "rtn_loss", "jquant_solve_loss"}``
    (``loss``: ``(w-q)^T H (w-q)/2`` with the undamped H; ``ref_loss``: the
    reference's estimate; ``jquant_solve_loss``: `jquant.gptq.solve` with the
    textbook options on the same W and H).
  """
  import jax
  import jax.numpy as jnp
  from tqdm.auto import tqdm

  import jquant
  from jquant.models.llama import Block, Transformer

  cfg = model.config
  block = Block(cfg)
  params = jax.tree_util.tree_map(np.asarray, model.params)
  capture = jax.jit(lambda p, h: jquant.capture.capture(block.apply, {"params": p}, h))
  forward = jax.jit(lambda p, h: block.apply({"params": p}, h))
  embed = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, method=Transformer.embed_tokens))
  batches = [np.asarray(calib[i:i + batch_size]) for i in range(0, len(calib), batch_size)]
  state = [np.asarray(embed(params, b)) for b in batches]
  spec = jquant.QuantSpec(bits=bits, symmetric=sym, granularity="group", group_size=group_size, pad_groups=True)
  solve = jax.jit(lambda w, h: jquant.gptq.solve(w, h, spec, damp=0.01, act_order=False, damp_tries=1)[0])
  layers = {}
  for i in tqdm(range(cfg.n_layers), desc="textbook GPTQ", disable=not progress):
    name = f"layers_{i}"
    p = params[name] = jax.tree_util.tree_map(np.array, params[name])
    for group in SEQUENTIAL:
      xtx, n = None, 0
      for h in state:
        x = np.asarray(capture(p, h).inputs[f"{group[0]}/kernel"], hessian_dtype)
        x = x.reshape(-1, x.shape[-1])
        xtx = x.T @ x if xtx is None else xtx + x.T @ x
        n += x.shape[0]
      hess = 2.0 / n * xtx.astype(np.float64)
      for layer in group:
        mod, sub = layer.split("/")
        kernel = p[mod][sub]["kernel"]  # (in, out)
        w = kernel.astype(np.float64).T
        q, ref_loss = fasterquant(w, hess, bits=bits, group_size=group_size, sym=sym)
        path = f"{name}/{layer}/kernel"
        rtn = jquant.dequantize(jquant.quantize(jnp.asarray(kernel), spec), jnp.float32)
        row = {"loss": h_loss(w, q, hess), "ref_loss": ref_loss,
               "rtn_loss": h_loss(w, np.asarray(rtn, np.float64).T, hess)}
        if solver_check:
          jq = jquant.dequantize(solve(jnp.asarray(kernel), jnp.asarray(hess, jnp.float32)), jnp.float32)
          row["jquant_solve_loss"] = h_loss(w, np.asarray(jq, np.float64).T, hess)
        layers[path] = row
        p[mod][sub]["kernel"] = q.T.astype(np.float32)
    state = [np.asarray(forward(p, h)) for h in state]
  return params, layers


# ----------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--settings", default="W4 g128 asym,W3 g128 asym")
  ap.add_argument("--calib-windows", type=int, default=16)
  ap.add_argument("--eval-windows", type=int, default=8, help="windows per evaluation corpus")
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--runs", default="textbook,jquant,jquant-textbook-options", help="subset of " + ",".join(RUNS))
  ap.add_argument("--fresh", action="store_true")
  ap.add_argument("--out", default=os.path.join(RESULTS, "gptq_textbook"))
  ap.add_argument("--merge", default="", help="comma-separated caches of other processes of this script (same "
                  "settings) whose runs are added to this one's")
  ap.add_argument("--sweep-rows", action="store_true", help="take the jquant-defaults rows that are missing from "
                  "experiments/results/gptq_sweep.json (same windows; checked on its float32 row)")
  ap.add_argument("--report-only", action="store_true", help="run nothing: merge, then write the report")
  args = ap.parse_args(argv)
  wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
  for r in wanted:
    if r not in RUNS:
      raise SystemExit(f"--runs: unknown run {r!r}; allowed: {', '.join(RUNS)}.")

  settings = {k: getattr(args, k) for k in ("calib_windows", "eval_windows", "length", "batch_size")}
  cache, runs, save = open_cache(args.out + ".json", settings, args.fresh)
  for path in [m.strip() for m in args.merge.split(",") if m.strip()]:
    other, _, _ = open_cache(path, settings)
    runs.update({k: v for k, v in other["runs"].items() if k not in runs or "source" in runs[k]})
  if args.sweep_rows:
    _sweep_rows(runs, settings, [s.strip() for s in args.settings.split(",") if s.strip()])
  cache.setdefault("notes", _NOTES.format(cpus=os.cpu_count(), day=time.strftime("%Y-%m-%d", time.gmtime())))
  save()
  if args.report_only:
    write_report(cache, args.out)
    return

  import jax
  import jquant
  from jquant import data, gptq, models

  model = models.from_gguf()
  calib = data.calibration_windows(model.tokenizer, args.calib_windows, length=args.length)
  windows, evaluate = corpus_evaluator(model, args.eval_windows, args.length, args.batch_size)

  if "float32" not in runs:
    runs["float32"] = evaluate(model.params)
    save()
  print("float32", runs["float32"], flush=True)
  for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
    b, gran, sym = setting.split()
    if gran != "g128" or sym not in ("sym", "asym"):
      raise SystemExit(f"--settings: {setting!r}; allowed: 'W<bits> g128 sym|asym'.")
    bits, sym = int(b[1:]), sym == "sym"
    spec = jquant.QuantSpec(bits=bits, symmetric=sym, granularity="group", group_size=128, pad_groups=True)
    for run in wanted:
      key = f"{run} {setting}"
      if key in runs and "source" not in runs[key]:
        print(key, "(cached)", {k: v for k, v in runs[key].items() if k != "layers"}, flush=True)
        continue
      t = time.perf_counter()
      if run.startswith("textbook"):
        f32 = run == "textbook-f32-hessian"
        q, layers = textbook_gptq(model, calib, bits=bits, group_size=128, sym=sym, batch_size=args.batch_size,
                                  solver_check=not f32, hessian_dtype=np.float32 if f32 else np.float64)
      else:
        opts = TEXTBOOK_OPTIONS if run == "jquant-textbook-options" else {}
        q, rep = gptq.quantize_model(model, model.params, calib, [jquant.Rule(KERNELS, spec)],
                                     batch_size=args.batch_size, progress=False, verbose=False,
                                     return_report=True, **opts)
        q = jax.block_until_ready(q)
        layers = {l.path: {"loss": l.loss, "rtn_loss": l.rtn_loss} for l in rep.layers}
      secs = time.perf_counter() - t
      runs[key] = {"quant_s": secs, **evaluate(q), "layers": layers}
      save()
      print(key, {k: v for k, v in runs[key].items() if k != "layers"}, flush=True)
  save()
  write_report(cache, args.out)


_NOTES = ("{cpus}-core CPU container shared with other jobs (load average 8-20 during these runs, {day}): times "
          "are indicative only; the textbook's include its float64 Hessians and the per-matrix solve and RTN "
          "checks.")


def _sweep_rows(runs, settings, wanted):
  """Adds ``jquant <setting>`` rows from gptq_sweep.json's ``GPTQ <setting>`` (defaults) where missing."""
  import json
  with open(os.path.join(RESULTS, "gptq_sweep.json")) as fh:
    sweep = json.load(fh)
  same = all(sweep["settings"].get(k) == settings[k] for k in ("calib_windows", "eval_windows", "length"))
  fl = runs.get("float32")
  if not same or fl is None or any(abs(sweep["runs"]["float32"][c] - fl[c]) > 1e-9 for c in fl):
    raise SystemExit("--sweep-rows: gptq_sweep.json was measured on other windows (settings or float32 "
                     "perplexity differ); run the jquant rows here instead.")
  for s in wanted:
    row = sweep["runs"].get(f"GPTQ {s}")
    if f"jquant {s}" not in runs and row is not None:
      runs[f"jquant {s}"] = {"quant_s": row["quant_s"], "wikipedia": row["wikipedia"],
                             "shakespeare": row["shakespeare"], "layers": {}, "source": "gptq_sweep.json"}


def _total(layers, key="loss"):
  return sum(v[key] for v in layers.values() if key in v)


def write_report(cache, out):
  runs, st = cache["runs"], cache["settings"]
  fl = runs["float32"]
  settings = []
  for k in runs:
    if k.startswith("textbook "):
      settings.append(k[len("textbook "):])
  lines = [f"# Textbook GPTQ against jquant's GPTQ: SmolLM2-135M, calibration {st['calib_windows']}x{st['length']} "
           f"news tokens, evaluation {st['eval_windows']}x{st['length']} Wikipedia and Shakespeare tokens", "",
           "Same windows as `experiments/gptq_sweep.py`. Textbook: `experiments/gptq_textbook.py`, an independent "
           "NumPy float64 GPTQ following IST-DASLab/gptq (true-sequential, damp 0.01, no act-order, lazy blocks "
           "of 128, asymmetric min-max grid per group of 128 computed when the group starts), evaluated with the "
           "dequantized weights; textbook-f32-hessian: the same code with X^T X accumulated in float32 (as the "
           "reference does on its GPU; the solve stays float64). jquant: `gptq.quantize_model` with its defaults "
           "(act_order=True, damp=0.1, token_norm_cap=10), and with the textbook's options (act_order=False, "
           "damp=0.01, token_norm_cap=None). "
           "diff = run / textbook - 1. Loss = sum over the 210 kernels of (w-q)^T H (w-q)/2, each on the "
           "Hessian of its own run's inputs (with the defaults, the token-norm-capped Hessian: not comparable). "
           "RTN rows: round-to-nearest, from gptq_sweep.json (same windows). " + cache.get("notes", ""), "",
           f"float32 perplexity: Wikipedia {fl['wikipedia']:.3f}, Shakespeare {fl['shakespeare']:.3f}", "",
           "| setting | run | wiki ppl | diff | shakespeare ppl | diff | loss | s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  sweep = {}
  if os.path.exists(os.path.join(RESULTS, "gptq_sweep.json")):
    import json
    with open(os.path.join(RESULTS, "gptq_sweep.json")) as fh:
      sweep = json.load(fh)["runs"]
  for s in settings:
    tb = runs[f"textbook {s}"]
    rtn = sweep.get(f"RTN {s}")
    if rtn is not None and abs(sweep["float32"]["wikipedia"] - fl["wikipedia"]) < 1e-9:
      lines.append(f"| {s} | RTN | {rtn['wikipedia']:.2f} | {rtn['wikipedia'] / tb['wikipedia'] - 1:+.2%} | "
                   f"{rtn['shakespeare']:.2f} | {rtn['shakespeare'] / tb['shakespeare'] - 1:+.2%} | - | - |")
    for run in RUNS:
      r = runs.get(f"{run} {s}")
      if r is None:
        continue
      d = lambda c: "" if run == "textbook" else f"{r[c] / tb[c] - 1:+.2%}"
      name = run + (f" (from {r['source']})" if "source" in r else "")
      loss = f"{_total(r['layers']):.4g}" if r["layers"] else "-"
      lines.append(f"| {s} | {name} | {r['wikipedia']:.2f} | {d('wikipedia')} | {r['shakespeare']:.2f} | "
                   f"{d('shakespeare')} | {loss} | {r['quant_s']:.0f} |")
  lines += ["", "Per-matrix check on identical inputs: on each textbook layer's own W and H, `jquant.gptq.solve` "
            "(damp 0.01, no act-order) against the textbook solver (loss with the undamped H):", "",
            "| setting | textbook loss | jquant.gptq.solve loss | ratio | largest layer ratio | reference's estimate |",
            "|---|---:|---:|---:|---:|---:|"]
  for s in settings:
    lay = runs[f"textbook {s}"]["layers"]
    if not all("jquant_solve_loss" in v for v in lay.values()):
      continue
    ratios = {p: v["jquant_solve_loss"] / v["loss"] for p, v in lay.items() if v["loss"] > 0}
    worst = max(ratios, key=lambda p: abs(ratios[p] - 1))
    lines.append(f"| {s} | {_total(lay):.5g} | {_total(lay, 'jquant_solve_loss'):.5g} | "
                 f"{_total(lay, 'jquant_solve_loss') / _total(lay):.4f} | {ratios[worst]:.4f} ({worst}) | "
                 f"{_total(lay, 'ref_loss'):.5g} |")
  lines += ["", "Model passes side by side: per-layer loss of jquant with the textbook options / textbook (each on "
            "its own inputs: both pass quantized activations on, so a difference in one block changes every later "
            "block's inputs and Hessians). RTN column: the same ratio for round-to-nearest losses, i.e. how much the "
            "two passes' Hessians differ:", "",
            "| setting | median | min | max | layers > 1% off | first layer > 1% off | RTN-loss ratio range |",
            "|---|---:|---:|---:|---:|---|---:|"]
  for s in settings:
    tb = runs[f"textbook {s}"]["layers"]
    jt = runs.get(f"jquant-textbook-options {s}", {}).get("layers", {})
    common = [p for p in tb if p in jt and tb[p]["loss"] > 0]
    if not common:
      continue
    r = np.array([jt[p]["loss"] / tb[p]["loss"] for p in common])
    rr = np.array([jt[p]["rtn_loss"] / tb[p]["rtn_loss"] for p in common])
    off = [p for p, x in zip(common, r) if abs(x - 1) > 0.01]
    lines.append(f"| {s} | {np.median(r):.4f} | {r.min():.3f} | {r.max():.3f} | {len(off)} of {len(common)} | "
                 f"{off[0] if off else '-'} | {rr.min():.4f}-{rr.max():.4f} |")
  lines += ["", "Per-layer losses, model pass (each run on its own, already-quantized, inputs):", "",
            "| setting | layer | textbook | jquant defaults | jquant textbook options | RTN (textbook's H) |",
            "|---|---|---:|---:|---:|---:|"]
  for s in settings:
    tb = runs[f"textbook {s}"]["layers"]
    jd = runs.get(f"jquant {s}", {}).get("layers", {})
    jt = runs.get(f"jquant-textbook-options {s}", {}).get("layers", {})
    for p in SHOW_LAYERS:
      cell = lambda d: f"{d[p]['loss']:.4g}" if p in d else "-"
      lines.append(f"| {s} | {p} | {cell(tb)} | {cell(jd)} | {cell(jt)} | {tb[p]['rtn_loss']:.4g} |")
  with open(out + ".md", "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
