"""llama.cpp runs jquant's GGUF exports: its perplexity against jquant's on the same token windows.

Not part of `make test`. Needs llama.cpp, built from the ``llama-cpp-python`` sdist into a separate
virtual environment (about 10 minutes on 2 cores):

    python3 -m venv .cache/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF" \\
      .cache/llamacpp-venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python numpy

then ``.venv/bin/python experiments/gguf_llamacpp.py [--windows 4] [--types Q8_0 Q4_K ...]
[--gptq-types Q4_K]`` (about 15 minutes for the defaults on 2 busy cores).

For each type: SmolLM2-135M quantized by jquant (RTN, and GPTQ with static groups) on the type's grid
and exported; the float model exported as F32 and quantized by llama.cpp's own ``llama_model_quantize``
(``pure``: every tensor the type, llama.cpp's fallbacks where rows do not fit; no importance matrix: the
``llama-imatrix`` tool is not part of the Python package). llama.cpp evaluates every file on the same
windows (no BOS, each window from an empty cache, NLL of tokens 1.. as jquant does); jquant evaluates its
own exports loaded back packed (`jquant.gguf.load`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import jquant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_PY = os.path.join(ROOT, ".cache", "llamacpp-venv", "bin", "python")

# Runs inside the llama.cpp virtual environment: ``quantize SRC DST FTYPE IMATRIX|- pure|mix`` (an importance
# matrix as an .npz of per-column mean squares by tensor name, passed through llama.cpp's C API), or
# ``ppl GGUF WINDOWS.npy`` (perplexity of each window from an empty cache, no BOS).
_LLAMA_SCRIPT = r"""
import ctypes, json, sys
import numpy as np
import llama_cpp

cmd = sys.argv[1]
if cmd == "quantize":
    src, dst, ftype, imat, mode = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
    p.nthread = 2
    p.pure = mode == "pure"
    keep = []
    if imat != "-":
        z = np.load(imat)
        arr = (llama_cpp.llama_model_imatrix_data * (len(z.files) + 1))()
        for i, k in enumerate(sorted(z.files)):
            v = np.ascontiguousarray(z[k], np.float32)
            name = k.encode()
            keep += [v, name]
            arr[i].name = name
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(z.files)].name = None  # terminator
        p.imatrix = ctypes.cast(arr, type(p.imatrix))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    print(json.dumps({"rc": int(rc)}))
else:
    path, windows = sys.argv[2], np.load(sys.argv[3])
    llm = llama_cpp.Llama(model_path=path, n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
                          n_threads=2, verbose=False)
    total = 0.0
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        lg = np.asarray(llm.scores[:len(w)], np.float64)[:-1]
        m = lg.max(axis=1)
        lse = m + np.log(np.exp(lg - m[:, None]).sum(axis=1))
        total += float(np.sum(lse - lg[np.arange(len(w) - 1), w[1:]]))
    n = windows.shape[0] * (windows.shape[1] - 1)
    print(json.dumps({"ppl": float(np.exp(total / n)), "n_tokens": n}))
"""

_FTYPE = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q2_K": "Q2_K",
          "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K"}


def _llama(*args):
  out = subprocess.run([LLAMA_PY, "-c", _LLAMA_SCRIPT, *args], capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"llama.cpp helper failed ({args[0]}): {out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--windows", type=int, default=4)
  ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"])
  ap.add_argument("--gptq-types", nargs="*", default=["Q4_0", "Q4_K"], help="types also solved with GPTQ")
  ap.add_argument("--calib", type=int, default=16, help="GPTQ calibration windows of 512 tokens")
  args = ap.parse_args()
  if not os.path.isfile(LLAMA_PY):
    sys.exit(f"no llama.cpp environment at {LLAMA_PY}; see this script's docstring.")
  m = jquant.models.from_gguf()
  windows = jquant.data.eval_windows(m.tokenizer, args.windows)
  calib = jquant.data.calibration_windows(m.tokenizer, args.calib)
  rows = []
  with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, ".cache")) as tmp:
    np.save(os.path.join(tmp, "windows.npy"), windows)
    wpath = os.path.join(tmp, "windows.npy")
    f32 = os.path.join(tmp, "f32.gguf")
    jquant.gguf.export(f32, m.params)
    base_llama = _llama("ppl", f32, wpath)["ppl"]
    base_jq = jquant.eval.perplexity(m, m.params, windows, batch_size=2, progress=False)[0]
    print(f"float (F32 export): llama.cpp {base_llama:.4f}, jquant {base_jq:.4f}", flush=True)
    for name in args.types:
      t0 = time.time()
      rules = jquant.gguf.rules(m.params, name)
      row = {"type": name, "bpw": jquant.gguf.bits_per_weight(name)}
      solvers = {"rtn": lambda: jquant.quantize_params(m.params, rules)}
      if name in args.gptq_types:
        solvers["gptq"] = lambda: jquant.gptq.quantize_model(m, m.params, calib, rules, static_groups=True,
                                                             progress=False)
      for solver, fn in solvers.items():
        try:
          qparams = fn()
        except Exception as e:  # noqa: BLE001  (report and go on)
          row[f"{solver}_error"] = f"{type(e).__name__}: {e}"[:200]
          continue
        path = os.path.join(tmp, f"{name}-{solver}.gguf")
        rep = jquant.gguf.export(path, qparams, types=name)
        row[f"{solver}_mb"] = rep.nbytes / 1e6
        row[f"{solver}_llama"] = _llama("ppl", path, wpath)["ppl"]
        packed = jquant.gguf.load(path, tokenizer=False)
        row[f"{solver}_jquant"] = jquant.eval.perplexity(m, packed.params, windows, batch_size=2, progress=False)[0]
      qpath = os.path.join(tmp, f"{name}-llama.gguf")
      if _llama("quantize", f32, qpath, _FTYPE[name], "-", "pure")["rc"] == 0:
        row["llama_mb"] = os.path.getsize(qpath) / 1e6
        row["llama_llama"] = _llama("ppl", qpath, wpath)["ppl"]
      row["seconds"] = round(time.time() - t0)
      print(json.dumps(row), flush=True)
      rows.append(row)
  print("\n| type | bits/weight | file MB (jquant) | llama.cpp ppl: jquant RTN / jquant GPTQ / llama.cpp quantize "
        "| jquant ppl: RTN / GPTQ | llama.cpp vs jquant |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    g = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
    diffs = [abs(r[f"{s}_llama"] / r[f"{s}_jquant"] - 1) for s in ("rtn", "gptq") if f"{s}_jquant" in r]
    print(f"| {r['type']} | {r['bpw']:.4g} | {r.get('rtn_mb', 0):.1f} | {g('rtn_llama')} / {g('gptq_llama')} / "
          f"{g('llama_llama')} | {g('rtn_jquant')} / {g('gptq_jquant')} | "
          f"{max(diffs) * 100 if diffs else float('nan'):.2f}% |")


if __name__ == "__main__":
  main()
