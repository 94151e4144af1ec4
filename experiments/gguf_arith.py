"""jquant's prediction of llama.cpp's perplexity (`jquant.gguf.llamacpp_params`) against llama.cpp on the same files.

SmolLM2-135M quantized by RTN on each type's grid (`jquant.gguf.rules`), exported (`jquant.gguf.export`), loaded
back packed (`jquant.gguf.load`) and evaluated by jquant on the README's 2 Wikipedia windows of 512 tokens:
with float activations (``Model.apply`` as is) and with llama.cpp's CPU arithmetic (`llamacpp_params`, the x86
build's Q8_0 rounding, and ggml's reference rounding). When ``.cache/llamacpp-venv`` exists, llama.cpp itself
evaluates the same files (`experiments/gguf_llamacpp.py`'s helper). Not part of `make test`.

    .venv/bin/python experiments/gguf_arith.py [--types Q8_0 Q6_K Q4_K] [--windows 2]

Writes experiments/results/gguf_arith.json and .md.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import jquant  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--types", nargs="+", default=["Q8_0", "Q6_K", "Q4_K"])
  ap.add_argument("--windows", type=int, default=2)
  ap.add_argument("--ref-types", nargs="*", default=["Q4_K"], help="types also evaluated with impl='ref'")
  args = ap.parse_args()
  import gguf_llamacpp as gl
  have_llama = os.path.isfile(gl.LLAMA_PY)
  m = jquant.models.from_gguf()
  w = jquant.data.eval_windows(m.tokenizer, args.windows)
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    wpath = os.path.join(tmp, "windows.npy")
    np.save(wpath, w)
    for t in args.types:
      t0 = time.time()
      qparams = jquant.quantize_params(m.params, jquant.gguf.rules(m.params, t))
      path = os.path.join(tmp, f"{t}.gguf")
      jquant.gguf.export(path, qparams, types=t)
      packed = jquant.gguf.load(path)
      del qparams
      row = {"jquant_float_act": jquant.eval.perplexity(packed, packed.params, w, progress=False)[0]}
      row["jquant_llamacpp_x86"] = jquant.eval.perplexity(
          packed, jquant.gguf.llamacpp_params(packed.params, impl="x86"), w, progress=False)[0]
      if t in args.ref_types:
        row["jquant_llamacpp_ref"] = jquant.eval.perplexity(
            packed, jquant.gguf.llamacpp_params(packed.params, impl="ref"), w, progress=False)[0]
      if have_llama:
        row["llama_cpp"] = gl._llama("ppl", path, wpath)["ppl"]
      row["seconds"] = round(time.time() - t0, 1)
      rows[t] = row
      print(t, json.dumps(row), flush=True)
  out = os.path.join(ROOT, "experiments", "results", "gguf_arith")
  with open(out + ".json", "w") as f:
    json.dump({"windows": args.windows, "rows": rows}, f, indent=1)
  lines = ["| type | llama.cpp | jquant float activations | jquant llamacpp_params (x86) | gap before | gap after |",
           "|---|---|---|---|---|---|"]
  for t, r in rows.items():
    ll = r.get("llama_cpp")
    gap = (lambda v: f"{100 * (v / ll - 1):+.2f}%") if ll else (lambda v: "-")
    lines.append(f"| {t} | {ll if ll is None else f'{ll:.3f}'} | {r['jquant_float_act']:.3f} | "
                 f"{r['jquant_llamacpp_x86']:.3f} | {gap(r['jquant_float_act'])} | {gap(r['jquant_llamacpp_x86'])} |")
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
