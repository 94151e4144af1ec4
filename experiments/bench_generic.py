"""The generic (any-model) passes against the model-specific ones they replace, on SmolLM2-135M.

Runs each method twice in a fresh process per implementation: the OLD one from
a git worktree of commit 3603afc (the duck-typed ``embed``/``block``/
``block_names`` protocol; ``git worktree add /tmp/jq_base 3603afc``) and the
NEW one from this checkout (`jquant.graph`: the model's program traced and cut
into blocks). Same model (`jquant.models.from_gguf`), same calibration windows
(news text, `jquant.data.calibration_windows`), same settings. Per
implementation: the first pass (what a user waits for: tracing and
compilation included) and a second pass on the same model (compiled steps
reused), seconds each, the ratio new/old, and whether the packed results are
byte-identical.

One function per method (``run_gptq``, ...), registered in ``METHODS``; each
takes ``(model, calib)`` and returns ``{"seconds", "fingerprint", ...}``.

Usage:
    python experiments/bench_generic.py [--windows 8] [--length 512] [--methods gptq]
                                        [--base /tmp/jq_base]
Writes experiments/results/bench_generic.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"


def _spec():
  import jquant
  # The demo's setting: W4 g128 asymmetric; 576-wide inputs end with a group of 64.
  return jquant.QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128, pad_groups=True)


def fingerprint(params) -> str:
  """sha256 over the packed payloads, scales and zero points of every QArray (tree order)."""
  import jax
  import numpy as np
  import jquant
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, jquant.QArray)):
    if isinstance(leaf, jquant.QArray):
      for a in (leaf.qvalue, leaf.scale, leaf.zero_point):
        if a is not None:
          h.update(np.asarray(a).tobytes())
  return h.hexdigest()[:16]


def run_gptq(model, calib) -> dict:
  """One GPTQ pass (W4 g128 asym, act-order, as the demo), timed to the last packed byte."""
  import jax
  import jquant
  from jquant import gptq
  t = time.perf_counter()
  q, rep = gptq.quantize_model(model, model.params, calib, [jquant.Rule(KERNELS, _spec())], act_order=True,
                               progress=False, verbose=False, return_report=True)
  q = jax.block_until_ready(q)
  return {"seconds": time.perf_counter() - t, "fingerprint": fingerprint(q),
          "loss_ratio": rep.total_loss / rep.total_rtn_loss, "kernels": len(rep.layers)}


AWQ_SCORE_WINDOWS = 2  # as `make demo`: statistics on every window, the scale search scored on the first 2


def run_awq(model, calib) -> dict:
  """One AWQ pass (W4 g128 asym, scored on 2 windows, as the demo) then RTN, timed to the last packed byte."""
  import jax
  import jquant
  from jquant import awq
  rules = [jquant.Rule(KERNELS, _spec())]
  t, c = time.perf_counter(), time.process_time()
  scaled = awq.scale_model(model, model.params, calib, rules, score_windows=AWQ_SCORE_WINDOWS, progress=False)
  q = jax.block_until_ready(jquant.quantize_params(scaled.params, rules))
  err = sum(r.error for r in scaled.reports)
  rtn = sum(r.rtn_error for r in scaled.reports)
  return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c, "fingerprint": fingerprint(q),
          "loss_ratio": err / rtn, "groups": len(scaled.reports)}


METHODS = {"gptq": run_gptq, "awq": run_awq}


def _compiled_steps() -> int | None:
  """Compiled per-segment steps held by the NEW implementation's program cache (None for the old one)."""
  try:
    from jquant.gptq import model as gm
  except ImportError:
    return None
  progs = getattr(gm, "_PROGRAMS", None)
  if progs is None:
    return None
  return sum(len(entry.prog._jit_cache) for _, entry in progs.values())


def worker(method: str, windows: int, length: int, passes: int = 2) -> dict:
  """Runs in a subprocess whose PYTHONPATH selects the implementation."""
  import jquant
  from jquant import data, models
  t = time.perf_counter()
  model = models.from_gguf()
  calib = data.calibration_windows(model.tokenizer, windows, length=length)
  load = time.perf_counter() - t
  first = METHODS[method](model, calib)
  second = METHODS[method](model, calib) if passes > 1 else None
  out = {"jquant": os.path.dirname(jquant.__file__), "load_s": load, "first": first, "second": second,
         "compiled_steps": _compiled_steps()}
  if out["compiled_steps"] is not None:  # the new path's one-off cost: tracing and cutting the program
    from jquant import graph
    t = time.perf_counter()
    prog = graph.trace(model.apply, model.params, calib[:8])
    out["trace_s"] = time.perf_counter() - t
    out["blocks"] = len(prog.blocks)
    out["distinct_block_structures"] = len({s.key for s in prog.block_segments})
  return out


def _spawn(path: str, method: str, args) -> dict:
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--windows", str(args.windows),
         "--length", str(args.length), "--passes", str(args.passes)]
  res = subprocess.run(cmd, env=env, cwd=path, capture_output=True, text=True)
  if res.returncode != 0:
    raise RuntimeError(f"bench_generic: the worker for {method} from {path} failed:\n{res.stderr[-4000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--windows", type=int, default=8)
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--passes", type=int, default=2, choices=(1, 2),
                  help="passes per implementation (1: the first pass only, for long methods such as AWQ)")
  ap.add_argument("--base", default="/tmp/jq_base", help="worktree of commit 3603afc (the old implementation)")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--out", default=os.path.join(RESULTS, "bench_generic.md"))
  args = ap.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker, args.windows, args.length, args.passes)))
    return
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise SystemExit(f"bench_generic: --methods {unknown}; allowed: {sorted(METHODS)}.")
  if not os.path.isdir(os.path.join(args.base, "jquant")):
    raise SystemExit(f"bench_generic: --base {args.base} holds no jquant; create it with "
                     "`git worktree add /tmp/jq_base 3603afc`.")
  rows = []
  for m in methods:
    old = _spawn(args.base, m, args)
    new = _spawn(ROOT, m, args)
    rows.append((m, old, new))
    print(m, json.dumps({"old": old, "new": new}), flush=True)
  write_report(rows, args)


def write_report(rows, args):
  lines = [f"# Generic passes vs the model-specific ones: SmolLM2-135M, {args.windows} x {args.length} news windows",
           "", f"Machine: {os.cpu_count()}-core CPU container (shared with other jobs; wall times). OLD = commit "
           "3603afc (block protocol: `embed`/`block`/`block_names`), NEW = this checkout (`jquant.graph`: the "
           "model's program traced and cut into blocks, one compiled step per block structure). Each "
           "implementation runs in its own fresh process: the first pass includes tracing and compilation, the "
           "second reuses them. GPTQ: W4 g128 asym (pad_groups), act-order, on every `layers_*/(attn|mlp)` kernel. "
           "AWQ: the same spec, scales searched on the first 2 windows (statistics on all), clipping, then RTN; its "
           "loss ratio is the searched groups' error over RTN's (alpha 0).",
           "",
           "| method | OLD 1st pass s | NEW 1st pass s | ratio | OLD 2nd pass s | NEW 2nd pass s | ratio | "
           "same packed bytes | loss ratio vs RTN (new) |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
  for m, old, new in rows:
    o1, n1 = old["first"]["seconds"], new["first"]["seconds"]
    same = old["first"]["fingerprint"] == new["first"]["fingerprint"]
    if old.get("second") and new.get("second"):
      o2, n2 = old["second"]["seconds"], new["second"]["seconds"]
      second = f"{o2:.1f} | {n2:.1f} | {n2 / o2:.2f}x"
    else:
      second = "- | - | -"
    lines.append(f"| {m} | {o1:.1f} | {n1:.1f} | {n1 / o1:.2f}x | {second} | "
                 f"{'yes' if same else 'no'} | {new['first'].get('loss_ratio', float('nan')):.3f} |")
  lines.append("")
  for m, old, new in rows:
    if "trace_s" in new:
      steps = (f"; {new['compiled_steps']} compiled segment steps in all (prefix, Hessian and forward steps)"
               if m == "gptq" else "")
      lines.append(f"{m} NEW: tracing and cutting the program takes {new['trace_s']:.1f} s "
                   f"({new['blocks']} blocks, {new['distinct_block_structures']} distinct block structure(s)){steps}.")
  for m, old, new in rows:
    if "cpu_seconds" in new["first"] and "cpu_seconds" in old["first"]:
      oc, nc = old["first"]["cpu_seconds"], new["first"]["cpu_seconds"]
      lines.append(f"{m}: process CPU seconds of the first pass (all threads; less sensitive to other jobs than "
                   f"wall time) OLD {oc:.1f}, NEW {nc:.1f}: {nc / oc:.2f}x; searched groups OLD "
                   f"{old['first']['groups']}, NEW {new['first']['groups']}; loss ratio vs RTN OLD "
                   f"{old['first']['loss_ratio']:.3f}, NEW {new['first']['loss_ratio']:.3f}.")
  lines.append(f"Load average at the end of the run (1/5/15 min): "
               f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}.")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
