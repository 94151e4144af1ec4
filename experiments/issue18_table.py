"""Issue 18's combined table and plot: SmolLM2-135M perplexity against bits per weight, every method.

Reads only the results JSONs of the sweeps (nothing is recomputed, nothing is
filled in): ``gptq_sweep.json`` (RTN, GPTQ), ``awq_sweep.json`` (AWQ),
``rotation_sweep.json`` / ``rotation_sweep_keep.json`` /
``rotation_sweep_partial.json`` (rotations, W4A8, W4A4, static W8A8),
``blockwise_sweep.json`` (block-wise reconstruction) and
``qat_smollm2_rows.json`` (QAT), each where present, all in
``experiments/results/``.

Evaluation sets: ``gptq_sweep``, ``rotation_sweep`` and ``blockwise_sweep``
measure the same 8 Wikipedia and 8 Shakespeare windows of 512 tokens
(`jquant.data.eval_windows` / `jquant.data.shakespeare_windows`, first 8 of
each); ``awq_sweep`` and ``qat_smollm2`` measured 16 Wikipedia windows and no
Shakespeare, so their numbers sit in a column of their own; a cell a script
did not measure is left blank.

Bits per weight: the bits of the quantized leaves over their weights
(`jquant.footprint(...).quantized_bits_per_weight`) as each script recorded
it. Rotation rows from before ``rotation_sweep.py`` recorded bits use the
``RTN W4 g128 sym`` row of ``gptq_sweep`` (the same spec on the same 210
kernels: the untied head and the online Hadamards stay float), marked so.

Writes ``experiments/results/issue18_table.md`` and
``experiments/results/issue18_ppl_vs_bits.png`` (log perplexity against bits
per weight; one series per method; Wikipedia solid, Shakespeare dashed; the
16-window Wikipedia series dotted with open markers).

Usage:
    python experiments/issue18_table.py [--results experiments/results]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


class Row(NamedTuple):
  """One table row: perplexities are None where the source did not measure them."""
  method: str            # plot series: RTN, GPTQ, AWQ, GPTQ + rotation, ...
  run: str               # the run's name in its source
  bits: Optional[float]  # quantized bits per weight
  wiki: Optional[float]  # 8 x 512 Wikipedia windows
  shakespeare: Optional[float]  # 8 x 512 Shakespeare windows
  wiki16: Optional[float]  # 16 x 512 Wikipedia windows (awq_sweep, qat_smollm2)
  seconds: Optional[float]  # wall seconds of the quantization (training for QAT) as recorded
  source: str
  note: str = ""


def _load(results, name):
  path = os.path.join(results, name)
  if not os.path.exists(path):
    return None
  with open(path) as fh:
    return json.load(fh)


def collect(results: str = RESULTS) -> tuple[list[Row], dict]:
  """``(rows, float32)``: every row of the sources present, and the float32 references
  (``{"wikipedia", "shakespeare", "wikipedia16"}``, those measured)."""
  rows, ref = [], {}
  g = _load(results, "gptq_sweep.json")
  settings = g["settings"] if g else None
  if g:
    f = g["runs"].get("float32", {})
    ref.update({k: f[k] for k in ("wikipedia", "shakespeare") if k in f})
    for name, r in g["runs"].items():
      method = name.split()[0]
      if method in ("RTN", "GPTQ") and len(name.split()) == 4:  # the grid, not the variant study
        rows.append(Row(method, name, r.get("bits"), r.get("wikipedia"), r.get("shakespeare"), None,
                        r.get("quant_s"), "gptq_sweep"))
  a = _load(results, "awq_sweep.json")
  if a:
    if "float" in a:
      ref["wikipedia16"] = a["float"]["ppl"]
    for key, label in (("w4-awq", "AWQ W4 g128 asym"), ("w3-awq", "AWQ W3 g128 asym"),
                       ("w4-awq+gptq", "AWQ + GPTQ W4 g128 asym"), ("w3-awq+gptq", "AWQ + GPTQ W3 g128 asym")):
      if key in a:
        r = a[key]
        rows.append(Row("AWQ" if "+" not in key else "AWQ + GPTQ", label, r.get("bits"), None, None, r.get("ppl"),
                        r.get("quant_s"), "awq_sweep"))
  rot = {}
  for part in ("rotation_sweep.json", "rotation_sweep_partial.json", "rotation_sweep_keep.json"):
    c = _load(results, part)
    if c and (settings is None or c.get("settings") == settings):
      for name, r in c["runs"].items():
        if "wikipedia" in r and name not in rot:
          rot[name] = (r, part[:-5])
  w4_bits = g["runs"].get("RTN W4 g128 sym", {}).get("bits") if g else None
  for name, (r, src) in rot.items():
    if name == "float32 rotated":
      continue
    bits, note = r.get("bits"), ""
    if bits is None and "W4" in name and w4_bits:
      bits, note = w4_bits, "bits of gptq_sweep's RTN W4 g128 sym (same spec)"
    if "W4A4" in name:
      method = "W4A4 + rotation" if "rotation" in name and "no rotation" not in name else "W4A4"
    elif "W4A8" in name:
      method = "W4A8 + rotation" if "rotation" in name and "no rotation" not in name else "W4A8"
    elif name.startswith("W8A8"):
      method = "W8A8 static + rotation"
    else:
      method = f"{name.split()[0]} + rotation"
    rows.append(Row(method, name, bits, r["wikipedia"], r.get("shakespeare"), None, r.get("quant_s"), src, note))
  b = _load(results, "blockwise_sweep.json")
  if b and (settings is None or b.get("settings") == settings):
    for name, r in b["runs"].items():
      if name.startswith("bw-"):
        m = "block-wise from RTN" if name.startswith("bw-rtn") else "block-wise from GPTQ"
        rows.append(Row(m, name, r.get("bits"), r.get("wikipedia"), r.get("shakespeare"), None, r.get("quant_s"),
                        "blockwise_sweep", f"{r.get('steps')} steps x {r.get('batch_size')}"))
  q = _load(results, "qat_smollm2_rows.json")
  if q:
    for name, r in q["rows"].items():
      if name.startswith("QAT") or "W8A8" in name:
        rows.append(Row("QAT" if name.startswith("QAT") else "RTN W8A8 dynamic", name, r.get("bpw"), None, None,
                        r.get("ppl"), r.get("train_s"), "qat_smollm2", f"{r['steps']} steps" if r.get("steps") else
                        ""))
    ref.setdefault("wikipedia16", q["rows"].get("float32", {}).get("ppl"))
  return rows, {k: v for k, v in ref.items() if v is not None}


def _f(v, fmt="{:.2f}"):
  return "" if v is None else fmt.format(v)


def write_table(rows, ref, out_md, cpus=None):
  """The markdown table of ``rows`` (blank cells: not measured) to ``out_md``; returns its text."""
  lines = ["# Issue 18: SmolLM2-135M, perplexity against bits per weight, every method", "",
           "Sources: the results JSONs of `experiments/` (see `issue18_table.py`); nothing recomputed here. "
           "Wikipedia and Shakespeare: the same 8 windows x 512 tokens each in gptq_sweep, rotation_sweep and "
           "blockwise_sweep; Wiki 16: 16 Wikipedia windows x 512 (awq_sweep, qat_smollm2; another evaluation "
           "set, not comparable digit for digit). Blank: not measured by that script. Times: wall seconds of the "
           "quantization (QAT: training) as recorded, on a shared 2-core CPU container under varying load: "
           "indicative only. Calibration: 16 news windows x 512 (QAT: news training windows).", "",
           f"float32: Wikipedia {_f(ref.get('wikipedia'))}, Shakespeare {_f(ref.get('shakespeare'))}, "
           f"Wiki 16 {_f(ref.get('wikipedia16'))}", "",
           "| method | run | bits/w | Wikipedia | vs float | Shakespeare | vs float | Wiki 16 | s | source | note |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]

  def rel(v, k):
    return f"{100 * (v / ref[k] - 1):+.1f}%" if v is not None and ref.get(k) else ""

  for r in rows:
    lines.append(f"| {r.method} | {r.run} | {_f(r.bits, '{:.3f}')} | {_f(r.wiki)} | {rel(r.wiki, 'wikipedia')} | "
                 f"{_f(r.shakespeare)} | {rel(r.shakespeare, 'shakespeare')} | {_f(r.wiki16)} | "
                 f"{_f(r.seconds, '{:.0f}')} | {r.source} | {r.note} |")
  text = "\n".join(lines) + "\n"
  with open(out_md, "w") as fh:
    fh.write(text)
  return text


# Plot series: method -> which runs (predicate on the run name); unlisted rows stay table-only.
SERIES = {
    "RTN": lambda r: r.method == "RTN",
    "GPTQ": lambda r: r.method == "GPTQ",
    "AWQ": lambda r: r.method == "AWQ",
    "GPTQ + rotation (keep 507)": lambda r: r.run == "GPTQ W4 g128 sym + rotation keeping channel(s) 507",
    "W4A8 GPTQ + rotation (keep 507)": lambda r: r.run == "W4A8 GPTQ + rotation keeping channel(s) 507",
    "W4A4 GPTQ + rotation": lambda r: r.run == "W4A4 GPTQ + rotation",
    "W8A8 static + rotation": lambda r: r.method == "W8A8 static + rotation",
    "block-wise from GPTQ": lambda r: r.method == "block-wise from GPTQ",
    "block-wise from RTN": lambda r: r.method == "block-wise from RTN" and len(r.run.split()) == 2,
    "QAT": lambda r: r.method == "QAT",
}


def plot(rows, ref, out_png):
  """Log perplexity against bits per weight: per series, Wikipedia (solid), Shakespeare (dashed), 16-window
  Wikipedia (dotted, open markers); float32 references as grey horizontal lines. Left: every row; right: the
  4-bit g128 rows (4.2-4.4 bits/w), where the methods crowd."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})
  markers = "osD^v<>pPX*h"
  for ax, (lo, hi) in zip(axes, ((0, 99), (4.2, 4.4))):
    for i, (name, pick) in enumerate(SERIES.items()):
      sel = [r for r in rows if pick(r) and r.bits is not None and lo <= r.bits <= hi]
      color = f"C{i % 10}"
      for attr, ls, fill, suffix in (("wiki", "-", True, "Wikipedia"), ("shakespeare", "--", True, "Shakespeare"),
                                     ("wiki16", ":", False, "Wikipedia, 16 windows")):
        pts = sorted((r.bits, getattr(r, attr)) for r in sel if getattr(r, attr) is not None)
        if pts:
          ax.plot(*zip(*pts), ls=ls, marker=markers[i % len(markers)], color=color, ms=6,
                  mfc=color if fill else "none", label=f"{name}: {suffix}")
          if lo > 0:  # the zoom: values next to the points
            for x, y in pts:
              ax.annotate(f"{y:.1f}", (x, y), xytext=(5, -3), textcoords="offset points", fontsize=6.5, color=color)
    for k, ls in (("wikipedia", "-"), ("shakespeare", "--"), ("wikipedia16", ":")):
      if ref.get(k):
        ax.axhline(ref[k], color="grey", lw=0.8, ls=ls, label=f"float32: {k.replace('16', ', 16 windows')}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per quantized weight")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
  axes[0].set_ylabel("perplexity (log scale)")
  axes[0].set_title("SmolLM2-135M: perplexity against bits per weight (solid Wikipedia, dashed Shakespeare, "
                    "dotted 16-window Wikipedia)", fontsize=9)
  axes[1].set_title("zoom: W4 g128 (4.271 sym, 4.339 asym)", fontsize=9)
  axes[1].set_xlim(4.255, 4.36)
  axes[0].legend(fontsize=6.5, ncol=2, loc="upper right")
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--results", default=RESULTS, help="folder of the results JSONs; the outputs go there too")
  args = ap.parse_args(argv)
  if not os.path.isdir(args.results):
    raise SystemExit(f"--results {args.results!r} is not a folder; pass the folder holding the sweeps' JSONs")
  rows, ref = collect(args.results)
  if not rows:
    raise SystemExit(f"no results JSONs in --results {args.results!r}: run the sweeps first")
  print(write_table(rows, ref, os.path.join(args.results, "issue18_table.md")))
  plot(rows, ref, os.path.join(args.results, "issue18_ppl_vs_bits.png"))


if __name__ == "__main__":
  main()
