"""`make demo`: quantize SmolLM2-135M every way jquant knows and print one table.

Loads the packaged SmolLM2-135M (GGUF, dequantized to float32: the reference
model), takes calibration windows from news text and evaluation windows from
Wikipedia, runs every method's rows (``experiments/demo_<method>.py``), and
prints method, measured bits per weight, model bytes, Wikipedia perplexity and
wall time. Writes the table (markdown) and a perplexity-vs-bits plot to
``experiments/results/``.

Usage:
    python experiments/demo.py [--eval-windows 8] [--calib-windows 8] [--length 512] [--only rtn,gptq] [--full]

The defaults keep the run near 10 minutes on 2 CPU cores: 8 calibration
windows for every data-driven method, AWQ's scale search scored on 2 of them,
and no AWQ+GPTQ rows (``--full`` adds them; ``experiments/awq_sweep.py`` and
``experiments/gptq_sweep.py`` run the larger settings).

With ``--only``, the rows run (and the float32 reference) replace the rows of
the same name in the existing ``demo.md``; the other rows are kept, and a note
under the header says which rows were rerun and when.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
RESULTS = os.path.join(HERE, "results")
METHODS = ["rtn", "w8a8", "gptq", "awq"]


def _fmt_row(r):
  return (f"| {r['method']:<28} | {r['bits']:>6.3f} | {r['model_mb']:>9.2f} | {r['ppl']:>9.3f} | "
          f"{r['delta']:>+7.2%} | {r['quant_s']:>8.1f} | {r['eval_s']:>7.1f} |")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--eval-windows", type=int, default=8)
  ap.add_argument("--calib-windows", type=int, default=8)
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(METHODS))
  ap.add_argument("--full", action="store_true", help="also the slower combined rows (AWQ+GPTQ)")
  args = ap.parse_args(argv)

  import jax
  import jquant
  from jquant import data, eval as jeval, models

  t0 = start = time.perf_counter()
  model = models.from_gguf()
  calib = data.calibration_windows(model.tokenizer, args.calib_windows, length=args.length)
  evalw = data.eval_windows(model.tokenizer, args.eval_windows, length=args.length)
  print(f"SmolLM2-135M loaded in {time.perf_counter() - t0:.1f}s; {len(calib)} calibration windows (news), "
        f"{len(evalw)} evaluation windows (Wikipedia) of {args.length} tokens; "
        f"backend {jax.default_backend()}, {os.cpu_count()} CPUs.")

  rows_in = [{"method": "float32 (reference)", "params": model.params, "quant_seconds": 0.0}]
  wanted = [m for m in METHODS if not args.only or m in args.only.split(",")]
  for name in wanted:
    try:
      mod = importlib.import_module(f"demo_{name}")
    except ModuleNotFoundError as e:
      if e.name == f"demo_{name}":
        continue
      raise
    rows_in.extend(mod.demo_rows(model, model.params, calib, evalw, args=args))

  table = []
  float_ppl = None
  header = (f"| {'method':<28} | {'bits/w':>6} | {'model MB':>9} | {'wiki ppl':>9} | {'vs fp32':>7} | "
            f"{'quant s':>8} | {'eval s':>7} |")
  print("\n" + header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
  for row in rows_in:
    params = row["params"]
    fp = jquant.footprint(params)
    t = time.perf_counter()
    ppl, ntok = jeval.perplexity(model, params, evalw, batch_size=args.batch_size, progress=False)
    eval_s = time.perf_counter() - t
    float_ppl = float_ppl or ppl
    r = {"method": row["method"], "bits": fp.quantized_bits_per_weight if "float32" not in row["method"]
         else 32.0, "model_mb": fp.total_bytes / 2**20, "ppl": ppl, "delta": ppl / float_ppl - 1,
         "quant_s": row.get("quant_seconds", 0.0), "eval_s": eval_s, "tokens": ntok}
    table.append(r)
    print(_fmt_row(r), flush=True)
  print(f"\nPerplexity over {len(evalw)} Wikipedia windows x {args.length} tokens ({table[0]['tokens']} "
        "predicted tokens). bits/w: measured over the quantized Dense kernels (payload + scales + zero points); "
        "model MB: the whole parameter tree, embedding (float32) included.")
  total = time.perf_counter() - start
  print(f"Total wall time {total / 60:.1f} min ({len(calib)} calibration windows x {args.length} tokens).")
  _write(table, args, header, total, len(calib))


def _parse_row(line):
  """A table line of `_fmt_row` back to its dict (None for a line that is not a row)."""
  cells = [c.strip() for c in line.strip().strip("|").split("|")]
  if len(cells) != 7 or cells[0] == "method" or set(cells[0]) <= set("-"):
    return None
  try:
    bits, mb, ppl, delta, quant_s, eval_s = (float(c.rstrip("%")) for c in cells[1:])
  except ValueError:
    return None
  return {"method": cells[0], "bits": bits, "model_mb": mb, "ppl": ppl, "delta": delta / 100,
          "quant_s": quant_s, "eval_s": eval_s}


def _merge(path, table, args):
  """``--only``: the existing demo.md's rows with those of ``table`` replaced (by method name) or appended.

  Returns ``(head_lines, rows)``, or None when there is no demo.md to merge into.
  """
  if not os.path.exists(path):
    return None
  with open(path) as f:
    lines = f.read().splitlines()
  head = [l for l in lines if not l.startswith("|")]
  while head and not head[-1].strip():
    head.pop()
  old = [r for r in map(_parse_row, lines) if r is not None]
  new = {r["method"]: r for r in table}
  rows = [new.pop(r["method"], r) for r in old] + list(new.values())
  when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  head.append(f"\nRerun {when} with `--only {args.only}` ({len(table)} rows: {', '.join(r['method'] for r in table)}); "
              "the other rows are from the run above. The machine was shared with other jobs during the rerun, "
              "so its times are not comparable with the other rows'.")
  return head, rows


def _write(table, args, header, total, n_calib):
  import platform
  os.makedirs(RESULTS, exist_ok=True)
  path = os.path.join(RESULTS, "demo.md")
  merged = _merge(path, table, args) if args.only else None
  if merged is None:
    head = [f"# make demo: SmolLM2-135M, {args.eval_windows} Wikipedia windows x {args.length} tokens\n",
            f"{n_calib} calibration windows x {args.length} tokens (news); {os.cpu_count()} CPUs "
            f"({platform.machine()}); total wall time {total / 60:.1f} min."]
  else:
    head, table = merged
  with open(path, "w") as f:
    f.write("\n".join(head) + "\n\n")
    f.write(header + "\n|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|\n")
    f.writelines(_fmt_row(r) + "\n" for r in table)
  _plot(table, os.path.join(RESULTS, "demo_ppl_vs_bits.png"))
  print(f"wrote {os.path.join(RESULTS, 'demo.md')} and demo_ppl_vs_bits.png")


def _plot(table, path):
  """Perplexity against bits per weight; one colour per method family, hollow markers for symmetric specs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 5))
  base = table[0]["ppl"]
  families = {}
  markers = "osD^v<>p*"
  for r in table[1:]:
    family = r["method"].split()[0]
    color = f"C{list(families).index(family) if family in families else len(families)}"
    families.setdefault(family, 0)
    marker = markers[families[family] % len(markers)]
    families[family] += 1
    hollow = " sym" in r["method"] and "asym" not in r["method"]
    ax.scatter(r["bits"], r["ppl"], s=45, marker=marker, label=f"{r['method']} ({r['ppl']:.1f})",
               facecolors="none" if hollow else color, edgecolors=color)
  ax.axhline(base, color="gray", ls="--", label=f"float32 ({base:.2f})")
  ax.set_xlabel("bits per weight (measured, quantized kernels)")
  ax.set_ylabel("Wikipedia perplexity (log scale)")
  ax.set_yscale("log")
  ax.set_title("SmolLM2-135M: perplexity vs bits per weight")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
