"""Mixed precision per weight under a size budget on SmolLM2-135M, against uniform specs and llama.cpp's presets.

Not part of `make test`. Sensitivity: the layer loss under each weight's calibration Hessian of RTN onto every
candidate (`jquant.mixed.measure`; 16 Lee news windows of 512 tokens), allocation: `jquant.mixed.allocate`.

(a) The curve: jquant perplexity on Wikipedia windows of uniform RTN specs (int2..8, groups of 64, asymmetric,
    bfloat16 scales, every matmul weight including the tied embedding) against mixed precision chosen among the
    same specs at budgets of 2.5..8 bits per weight; the rank correlation of estimated damage with perplexity.
(b) llama.cpp: the float model exported as F32 and quantized by llama.cpp's ``llama_model_quantize`` to its
    ``Q3_K_M``, ``Q4_K_M``, ``Q5_K_M`` presets, without and with an importance matrix (per input column the mean
    square of the calibration activations, what ``llama-imatrix`` computes, here from the same Hessians' diagonals:
    ``llama-imatrix`` itself is not in the Python package), against jquant's mixed precision among the GGML types
    whose blocks fit each weight's rows, allocated to the same or smaller FILE size, solved by RTN (and GPTQ with
    ``--gptq``, on the candidates without Q4_1), exported with `jquant.gguf.export`; llama.cpp's perplexity on the
    same windows for every file. ``--gptq-damage``: the allocation made with each candidate's Fisher damage times
    GPTQ's layer loss over RTN's (`gptq_ratios`, cached), solved by GPTQ.

Needs llama.cpp in ``.cache/llamacpp-venv`` (see ``experiments/gguf_llamacpp.py``). Sensitivities and results are
cached (``.cache/mixed_precision/``, ``experiments/results/mixed_precision.json``); ``--fresh`` starts over.

Usage:
    python experiments/mixed_precision.py [--calib 16] [--eval 16] [--curve-eval 4] [--gptq] [--gptq-damage]
        [--presets Q5_K_M] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

from gguf_llamacpp import LLAMA_PY, _llama  # the llama.cpp driver (its own virtual environment)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
CACHE = os.path.join(ROOT, ".cache", "mixed_precision")
PRESETS = ("Q3_K_M", "Q4_K_M", "Q5_K_M")
BUDGETS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)



def generic_candidates():
  import jquant
  return {f"int{b} g64": jquant.QuantSpec(bits=b, symmetric=False, granularity="group", group_size=64,
                                          scale_dtype="bfloat16") for b in (2, 3, 4, 5, 6, 8)}


def nll(m, params, tokens):
  import jax
  import jax.numpy as jnp
  logits = m.apply(params, tokens)[:, :-1].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def spearman(a, b) -> float:
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def gptq_ratios(m, calib, sens, *, include=r"^layers_\d+/", progress=True):
  """``(T, C)`` float64: GPTQ's layer loss over RTN's, per weight and candidate (1 where GPTQ is not run).

  Each weight is solved alone against the float model's Hessian of its inputs (`jquant.mixed.hessians`), with
  the settings `jquant.gptq.quantize_model` uses (``MODEL_DEFAULTS``: act-order, damp 0.1; static groups).
  Weights sharing an input (q/k/v, gate/up) are solved together, their columns side by side (with static
  groups the columns are independent given H). Weights that ``include`` does not match (the tied embedding,
  which the model pass rounds to nearest) keep ratio 1.
  """
  import jax
  import jax.numpy as jnp
  import jquant
  from jquant import mixed
  from jquant.gptq.model import MODEL_DEFAULTS
  from jquant.qarray import dequantize, quantize, to_matrix

  hs = mixed.hessians(m, calib, batch_size=2, progress=progress)
  leaves = {jquant.utils.path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(m.params)[0]}
  rows = {p: t for t, p in enumerate(sens.paths)}
  groups = {}
  for p in sens.paths:
    if re.search(include, p):
      groups.setdefault(id(hs[p]), []).append(p)
  ratio = np.ones(sens.damage.shape)
  it = list(groups.values())
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(it, desc="GPTQ damage", unit="group")
  for g in it:
    h = jnp.asarray(hs[g[0]], jnp.float32)
    for c in range(len(sens.names)):
      specs = [sens.specs[rows[p]][c] for p in g]
      if any(sp is None for sp in specs):
        continue
      k_axes = [sp.axis if isinstance(sp.axis, tuple) else (sp.axis,) for sp in specs]
      mats = [to_matrix(leaves[p], ka).astype(jnp.float32) for p, ka in zip(g, k_axes)]
      w2 = jnp.concatenate(mats, axis=1)
      spec0 = specs[0].replace(axis=0)
      sol = jquant.gptq.solve_codes(w2, h, spec0, static_groups=True, **MODEL_DEFAULTS)
      eg = w2 - dequantize(jquant.gptq.pack(sol, spec0), jnp.float32)
      er = w2 - dequantize(quantize(w2, spec0), jnp.float32)
      lg = 0.5 * jnp.sum(eg * (h @ eg), axis=0)
      lr = 0.5 * jnp.sum(er * (h @ er), axis=0)
      c0 = 0
      for p, mat in zip(g, mats):
        n = mat.shape[1]
        a, b = float(jnp.sum(lg[c0:c0 + n])), float(jnp.sum(lr[c0:c0 + n]))
        ratio[rows[p], c] = a / b if b > 0 else 1.0
        c0 += n
  return ratio


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calib", type=int, default=16)
  ap.add_argument("--eval", type=int, default=16, help="Wikipedia windows for llama.cpp's perplexity")
  ap.add_argument("--curve-eval", type=int, default=2, help="Wikipedia windows for jquant's perplexity (curve)")
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--fisher-windows", type=int, default=8, help="calibration windows for the Fisher (first ones)")
  ap.add_argument("--gptq", action="store_true", help="also solve the mixed GGUF files with GPTQ")
  ap.add_argument("--gptq-damage", action="store_true",
                  help="also allocate with the Fisher damage scaled by GPTQ's layer-loss ratio over RTN per weight and "
                       "candidate, and solve that allocation with GPTQ")
  ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS, help="file sizes to compare at")
  ap.add_argument("--tiny", action="store_true", help="shake-out run: 2 windows of 64 tokens, few points")
  ap.add_argument("--fresh", action="store_true")
  ap.add_argument("--skip-llama", action="store_true")
  args = ap.parse_args(argv)
  if args.tiny:
    args.calib, args.eval, args.curve_eval, args.length, args.fisher_windows = 2, 1, 1, 64, 1

  import jax
  import jquant
  from jquant import mixed
  from jquant.gguf import names as gnames

  tag = "_tiny" if args.tiny else ""
  cache_dir = CACHE + tag
  os.makedirs(cache_dir, exist_ok=True)
  out_base = os.path.join(RESULTS, "mixed_precision" + tag)
  settings = {k: getattr(args, k) for k in ("calib", "eval", "curve_eval", "length", "fisher_windows")}
  res = {}
  if os.path.exists(out_base + ".json") and not args.fresh:
    with open(out_base + ".json") as f:
      res = json.load(f)
    if res.get("settings") != settings:
      res = {}
  res["settings"] = settings
  res.setdefault("curve", {})
  res.setdefault("llama", {})

  def save():
    os.makedirs(RESULTS, exist_ok=True)
    with open(out_base + ".json", "w") as f:
      json.dump(res, f, indent=1)

  t_start = time.time()
  m = jquant.models.from_gguf()
  calib = jquant.data.calibration_windows(m.tokenizer, args.calib, args.length)
  ev = jquant.data.eval_windows(m.tokenizer, args.eval, args.length)
  ev_curve = ev[:args.curve_eval]

  # --- sensitivities (cached) ---
  names = ("generic_h", "generic_f", "gguf_f")
  paths_json = {k: os.path.join(cache_dir, f"sens_{k}.json") for k in names}
  imat_path = os.path.join(cache_dir, "imatrix.npz")
  if args.fresh or not all(os.path.exists(p) for p in list(paths_json.values()) + [imat_path]):
    t0 = time.time()
    hs = mixed.hessians(m, calib, batch_size=2)
    axes = jquant.capture.contraction_axes(m.apply, m.params, calib[:1])
    res["hessian_s"] = round(time.time() - t0, 1)
    imat = {gnames.gguf_name(p)[0]: np.asarray(jax.numpy.diagonal(h), np.float32) / 2 for p, h in hs.items()}
    np.savez(imat_path, **imat)
    t0 = time.time()
    fs = mixed.fisher(lambda p, x: nll(m, p, x), m.params, calib[:args.fisher_windows], batch_size=1)
    fs = {p: fs[p] for p in hs}
    res["fisher_s"] = round(time.time() - t0, 1)
    for k, cands in (("gguf_f", mixed.gguf_candidates()), ("generic_f", generic_candidates()),
                     ("generic_h", generic_candidates())):
      t0 = time.time()
      sens = (mixed.measure(m.params, None, cands, fisher=fs, axes=axes) if k.endswith("_f")
              else mixed.measure(m.params, hs, cands, axes=axes))
      res[f"sensitivity_{k}_s"] = round(time.time() - t0, 1)
      with open(paths_json[k], "w") as f:
        f.write(sens.to_json())
    del hs, fs
    save()
  S = {k: mixed.Sensitivity.from_json(open(paths_json[k]).read()) for k in names}
  sens_gen, sens_gguf = S["generic_h"], S["gguf_f"]
  T = len(sens_gen.paths)
  jq = jax.jit(jquant.quantize, static_argnums=1)
  leaves_ref = {jquant.utils.path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(m.params)[0]}

  def fast_quantize(alloc, sens):
    """quantize_params(params, alloc.rules) with a jitted quantize per leaf (same specs, same result)."""
    spec = {p: sens.specs[t][sens.names.index(n)] for t, (p, n) in enumerate(alloc.choices)}
    qp = jax.tree_util.tree_map_with_path(
        lambda k, v: jq(v, spec[jquant.utils.path_str(k)]) if jquant.utils.path_str(k) in spec else v, m.params)
    fp = jquant.footprint(qp)
    got = sum(l.nbytes for l in fp.leaves if l.path in spec)
    assert got == alloc.nbytes, (got, alloc.nbytes)  # the allocator's bytes are footprint's
    return qp, fp.quantized_bits_per_weight

  # --- (a) the curve ---
  points = []
  for j, name in enumerate(sens_gen.names):
    if args.tiny and j not in (2, 5):
      continue
    points.append(("uniform", name, None, j, "generic_h"))
  for b in (BUDGETS if not args.tiny else (3.0, 5.0)):
    for k in ("generic_f", "generic_h"):
      points.append(("mixed " + k[-1].upper(), f"mixed {k[-1].upper()} {b:g}", b, None, k))
  for kind, label, b, j, k in points:
    if label in res["curve"]:
      continue
    t0 = time.time()
    sens = S[k]
    if kind == "uniform":
      alloc = mixed.allocate(sens, bytes=int(sens.nbytes[:, j].sum()))
      alloc = alloc._replace(choices=tuple((p, label) for p, _ in alloc.choices),
                             nbytes=int(sens.nbytes[:, j].sum()))
      est = {kk: float(S[kk].damage[:, j].sum()) for kk in ("generic_h", "generic_f")}
    else:
      try:
        alloc = mixed.allocate(sens, bits_per_weight=b)
      except ValueError as e:
        print(f"skip {label}: {e}")
        continue
      est = {k: alloc.damage}
    qp, bpw = fast_quantize(alloc, sens)
    ppl = jquant.eval.perplexity(m, qp, ev_curve, batch_size=2, progress=False)[0]
    row = {"kind": kind, "bpw": bpw, "damage": est, "ppl": ppl, "seconds": round(time.time() - t0),
           "counts": alloc.counts()}
    res["curve"][label] = row
    print(json.dumps({label: row}), flush=True)
    save()
  rows = list(res["curve"].values())
  for kk, tag_ in (("generic_h", "H"), ("generic_f", "F")):
    rr = [r for r in rows if kk in r["damage"] and (r["kind"] == "uniform" or r["kind"].endswith(tag_))]
    if len(rr) > 2:
      res[f"spearman_{tag_}"] = [spearman([r["damage"][kk] for r in rr], [r["ppl"] for r in rr]), len(rr)]
  save()

  # --- (b) llama.cpp ---
  if not args.skip_llama:
    if not os.path.isfile(LLAMA_PY):
      sys.exit(f"no llama.cpp environment at {LLAMA_PY}; see experiments/gguf_llamacpp.py.")
    wpath = os.path.join(cache_dir, "windows.npy")
    np.save(wpath, ev)
    f32 = os.path.join(cache_dir, "f32.gguf")
    if not os.path.exists(f32):
      jquant.gguf.export(f32, m.params)
    L = res["llama"]
    if "F32" not in L:
      L["F32"] = {"mb": os.path.getsize(f32) / 1e6, "ppl": _llama("ppl", f32, wpath)["ppl"]}
      save()
    # Q4_1 reproduces the source file's own weights (the float model is the dequantized Q4_1 file): a variant
    # without it shows what the allocation does when no candidate is lossless.
    keep = [j for j, n in enumerate(sens_gguf.names) if n != "Q4_1"]
    no_q41 = sens_gguf._replace(names=tuple(sens_gguf.names[j] for j in keep), damage=sens_gguf.damage[:, keep],
                                nbytes=sens_gguf.nbytes[:, keep],
                                specs=tuple(tuple(r[j] for j in keep) for r in sens_gguf.specs))
    # bytes of the file besides the quantized weights: metadata, norms, alignment
    overhead = os.path.getsize(f32) - 4 * int(sens_gguf.numel.sum())
    no_q41_g = None
    if args.gptq_damage:
      rpath = os.path.join(cache_dir, "gptq_ratio_no_q41.npy")
      if os.path.exists(rpath):
        ratio = np.load(rpath)
      else:
        t0 = time.time()
        ratio = gptq_ratios(m, calib, no_q41)
        res["gptq_ratio_s"] = round(time.time() - t0, 1)
        np.save(rpath, ratio)
        save()
      ok = no_q41.nbytes >= 0
      solved = ok & np.array([p != "embed/embedding" for p in no_q41.paths])[:, None]  # the embedding: RTN
      res["gptq_ratio"] = {n: [float(np.min(ratio[solved[:, j], j])), float(np.median(ratio[solved[:, j], j])),
                               float(np.max(ratio[solved[:, j], j]))] for j, n in enumerate(no_q41.names)
                           if solved[:, j].any()}
      no_q41_g = no_q41._replace(damage=np.where(ok, no_q41.damage * ratio, no_q41.damage))
    for preset in (args.presets if not args.tiny else ("Q4_K_M",)):
      for imat in ("", " imatrix"):
        key = preset + imat
        if key in L:
          continue
        t0 = time.time()
        qpath = os.path.join(cache_dir, f"{preset}{'-imat' if imat else ''}.gguf")
        rc = _llama("quantize", f32, qpath, preset, imat_path if imat else "-", "mix")["rc"]
        if rc:
          L[key] = {"error": f"llama_model_quantize rc={rc}"}
          continue
        L[key] = {"bytes": os.path.getsize(qpath), "mb": os.path.getsize(qpath) / 1e6,
                  "ppl": _llama("ppl", qpath, wpath)["ppl"], "seconds": round(time.time() - t0)}
        print(json.dumps({key: L[key]}), flush=True)
        save()
      target = min(L[preset + i]["bytes"] for i in ("", " imatrix") if "bytes" in L.get(preset + i, {}))
      # GPTQ on the fair candidates only: with Q4_1 the allocation is Q4_1 almost everywhere, which static-group
      # GPTQ reproduces exactly (the weights sit on that grid), so it would only repeat the RTN column.
      variants = [("rtn", sens_gguf, ""), ("rtn", no_q41, " no Q4_1")] + (
          [("gptq", no_q41, " no Q4_1")] if args.gptq else []) + (
          [("gptq", no_q41_g, " no Q4_1 GPTQ damage")] if args.gptq_damage else [])
      for solver, sv, vtag in variants:
        key = f"jquant mixed {solver}{vtag} @ {preset}"
        if key in L:
          continue
        t0 = time.time()
        extra = {}
        budget = target - overhead - 32 * (len(jax.tree_util.tree_leaves(m.params)) + 1)
        for _ in range(3):
          alloc = mixed.allocate(sv, bytes=int(budget))
          if solver == "rtn":
            qp, _ = fast_quantize(alloc, sv)
          else:
            t1 = time.time()
            qp, rep_g = jquant.gptq.quantize_model(m, m.params, calib, list(alloc.rules), static_groups=True,
                                                   batch_size=2, progress=False, verbose=False, return_report=True)
            extra = {"solve_s": round(time.time() - t1), "gptq_loss": rep_g.total_loss,
                     "rtn_loss": rep_g.total_rtn_loss, "rtn_leaves": list(rep_g.rtn_leaves)}
          path = os.path.join(cache_dir, f"mixed-{solver}{vtag.replace(' ', '-')}-{preset}.gguf")
          rep = jquant.gguf.export(path, qp, overwrite=True)
          excess = rep.nbytes - target
          if excess <= 0:
            break
          budget -= excess + 64
        L[key] = {"bytes": rep.nbytes, "mb": rep.nbytes / 1e6, "bpw": alloc.bits_per_weight,
                  "ppl": _llama("ppl", path, wpath)["ppl"], "counts": alloc.counts(), "damage": alloc.damage,
                  "exact": alloc.exact, "method": alloc.method, "seconds": round(time.time() - t0),
                  "types": {p: n for p, n in alloc.choices}, **extra}
        print(json.dumps({key: {k: v for k, v in L[key].items() if k != "types"}}), flush=True)
        save()
  res["total_s"] = round(time.time() - t_start)
  save()
  write_outputs(res, out_base, args)


def write_outputs(res, out_base, args):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  st = res["settings"]
  curve = res["curve"]
  lines = ["# Mixed precision under a size budget (SmolLM2-135M)", "",
           f"Calibration: {st['calib']} Lee news windows of {st['length']} tokens (Hessians; Fisher on the first "
           f"{st['fisher_windows']}); jquant perplexity (curve) on {st['curve_eval']} Wikipedia windows, llama.cpp "
           f"perplexity on {st['eval']}. 2-core CPU container, one run. H: damage = layer loss under the Hessian; "
           "F: damage = sum F (W-Q)^2 / 2 with the empirical diagonal Fisher of the model's loss.", "",
           "## (a) Uniform vs mixed (RTN, int2..8 g64 asym bf16 scales, every matmul weight incl. the tied embedding)",
           "", "| point | bits/weight | est. damage H | est. damage F | jquant ppl | mix |", "|---|---|---|---|---|---|"]
  for label, r in sorted(curve.items(), key=lambda kv: (kv[1]["kind"], kv[1]["bpw"])):
    mix = ", ".join(f"{k}: {v}" for k, v in sorted(r["counts"].items())) if r["kind"] != "uniform" else ""
    dh, df = r["damage"].get("generic_h"), r["damage"].get("generic_f")
    lines.append(f"| {label} | {r['bpw']:.3f} | {'-' if dh is None else f'{dh:.4g}'} | "
                 f"{'-' if df is None else f'{df:.4g}'} | {r['ppl']:.3f} | {mix} |")
  for t in ("H", "F"):
    if f"spearman_{t}" in res:
      rho, n = res[f"spearman_{t}"]
      lines.append(f"\nSpearman rank correlation of estimated damage ({t}) with measured perplexity over {n} points "
                   f"(uniform + mixed {t}): {rho:.3f}.")
  L = res.get("llama", {})
  sol = [(a, b) for a, b in (("rtn", ""), ("rtn", " no Q4_1"), ("gptq", " no Q4_1"), ("gptq", " no Q4_1 GPTQ damage"))
         if any(f"jquant mixed {a}{b} @ {p}" in L for p in PRESETS)]
  if L:
    cols = " / ".join(f"jquant {a}{b}" for a, b in sol)
    lines += ["", "## (b) llama.cpp presets vs jquant mixed (GGML types, Fisher damage, same or smaller file)", "",
              f"| size of | file MB: preset / +imatrix / {cols} | bits/weight: {cols} (quantized weights) "
              f"| llama.cpp ppl: preset / preset+imatrix / {cols} |", "|---|---|---|---|"]
    if "F32" in L:
      lines.append(f"| F32 export | {L['F32']['mb']:.1f} | 32 | {L['F32']['ppl']:.3f} |")
    for p in PRESETS:
      if p not in L:
        continue
      g = lambda k, f: f"{L[k][f]:.3f}" if k in L and f in L[k] else "-"  # noqa: E731
      gm = lambda k: f"{L[k]['mb']:.2f}" if k in L and "mb" in L[k] else "-"  # noqa: E731
      keys = [f"jquant mixed {a}{b} @ {p}" for a, b in sol]
      mbs = " / ".join([gm(p), gm(p + " imatrix")] + [gm(k) for k in keys])
      ppls = " / ".join([g(p, "ppl"), g(p + " imatrix", "ppl")] + [g(k, "ppl") for k in keys])
      bpw = " / ".join(g(k, "bpw") for k in keys)
      lines.append(f"| {p} | {mbs} | {bpw} | {ppls} |")
    for p in PRESETS:
      for a, b in sol:
        k = f"jquant mixed {a}{b} @ {p}"
        if k in L:
          extra = (f"; GPTQ solve {L[k]['solve_s']} s, layer loss GPTQ/RTN {L[k]['gptq_loss'] / L[k]['rtn_loss']:.3f}"
                   if "solve_s" in L[k] else "")
          lines.append(f"\n{k}: {dict(sorted(L[k]['counts'].items()))} ({L[k]['method']}, "
                       f"{'optimal' if L[k]['exact'] else 'not proven optimal'} for the per-weight model; "
                       f"{L[k]['seconds']} s in all{extra})")
  if "gptq_ratio" in res:
    lines.append("\nGPTQ damage: per weight and candidate, GPTQ's layer loss over RTN's (each weight alone against "
                 "the float model's Hessian; min / median / max over the weights): " + ", ".join(
                     f"{n} {a:.2f} / {b:.2f} / {c:.2f}" for n, (a, b, c) in res["gptq_ratio"].items())
                 + (f" ({res['gptq_ratio_s']} s)." if "gptq_ratio_s" in res else "."))
  with open(out_base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for kind, style in (("uniform", "o--"), ("mixed F", "s-"), ("mixed H", "d:")):
    pts = sorted((r["bpw"], r["ppl"]) for r in curve.values() if r["kind"] == kind)
    if pts:
      ax.plot(*zip(*pts), style, label=f"{kind} (RTN, int2..8 g64; jquant ppl)")
  n_w = 134515008  # SmolLM2-135M matmul weights (the embedding once)
  for p in PRESETS:
    for key, mk, col, lab in ((p, "^", "C3", "llama.cpp preset (llama.cpp ppl)"),
                              (p + " imatrix", "v", "C4", "llama.cpp preset + imatrix"),
                              (f"jquant mixed rtn no Q4_1 @ {p}", "*", "C5", "jquant mixed GGML, no Q4_1"),
                              (f"jquant mixed gptq no Q4_1 @ {p}", "P", "C6", "jquant mixed GGML, no Q4_1, GPTQ")):
      if key in L and "ppl" in L[key] and "F32" in L:
        over = L["F32"]["mb"] * 1e6 - 4 * n_w
        ax.plot(8 * (L[key]["bytes"] - over) / n_w, L[key]["ppl"], mk, color=col, ms=9,
                label=lab if p == PRESETS[0] else None)
  ax.set_xlabel("bits per weight (quantized weights, scales included)")
  ax.set_ylabel("perplexity (Wikipedia)")
  ax.set_yscale("log")
  ax.set_title("SmolLM2-135M: uniform vs mixed precision")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_base + ".png", dpi=120)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
