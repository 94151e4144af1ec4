"""llama.cpp runs jquant's GGUF exports: its perplexity against jquant's on the same token windows.

Not part of `make test`. Needs llama.cpp, built from the ``llama-cpp-python`` sdist into a separate
virtual environment (about 10 minutes on 2 cores):

    python3 -m venv .cache/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF" \\
      .cache/llamacpp-venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python numpy

then ``.venv/bin/python experiments/gguf_llamacpp.py [--windows 4] [--types Q8_0 Q4_K ...]
[--solvers rtn rtn-imp gptq-fit awq] [--keep DIR]`` (about 6 minutes per type and solver on 2 busy cores; rows are
cached in ``experiments/results/gguf_llamacpp.json`` and reused while the settings match).

For each type: SmolLM2-135M quantized by jquant on the type's grid (``rtn``; ``rtn-imp``: ``clip="fit"``
weighted by the importance below; ``gptq``: static min-max groups; ``gptq-fit``: static groups fitted under the
importance, damp 0.01; ``awq``) and exported; the float model exported as F32 and quantized by llama.cpp's own
``llama_model_quantize`` (``pure``: every tensor the type, llama.cpp's fallbacks where rows do not fit), once
without and once with an importance matrix: per input column the mean square of the calibration activations
(what ``llama-imatrix`` computes; that tool is not in the Python package), from the same calibration windows
jquant's solvers see, passed through llama.cpp's C API. llama.cpp evaluates every file on the same windows (no
BOS, each window from an empty cache, NLL of tokens 1.. as jquant does); jquant evaluates its own exports
loaded back packed (`jquant.gguf.load`), with float activations and with llama.cpp's quantized activations
(`jquant.gguf.llamacpp_params`).
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


SOLVERS = ("rtn", "rtn-imp", "gptq", "gptq-fit", "awq")
GPTQ_FIT = dict(static_groups=True, damp=0.01)  # the best of damp 0.001 / 0.01 / 0.1 at Q4_K (README)


def _importance(m, calib, folder):
  """``{path: (K,)}``: per input column the mean square of the float model's calibration activations (the
  Hessians' diagonals / 2: llama.cpp's importance matrix), cached in ``folder``."""
  path = os.path.join(folder, "importance.npz")
  if not os.path.exists(path):
    import jax
    hs = jquant.mixed.hessians(m, calib, batch_size=2, progress=False)
    np.savez(path, **{p.replace("/", "|"): np.asarray(jax.numpy.diagonal(h), np.float32) / 2 for p, h in hs.items()})
  with np.load(path) as z:
    return {k.replace("|", "/"): z[k] for k in z.files}


def _imatrix(imp, path):
  """The importance matrix by GGUF tensor name, as the .npz the llama.cpp helper passes to its quantizer."""
  from jquant.gguf import names as gnames
  np.savez(path, **{gnames.gguf_name(p)[0]: v for p, v in imp.items()})


def _solve(solver, m, calib, rules, imp):
  """jquant's parameters on the type's grid (``rules`` from `jquant.gguf.rules`) by one solver."""
  fit = [jquant.Rule(r.pattern, None if r.spec is None else r.spec.replace(clip="fit")) for r in rules]
  if solver == "rtn":
    return jquant.quantize_params(m.params, rules)
  if solver == "rtn-imp":  # llama.cpp's importance-matrix quantization, in jquant
    return jquant.quantize_params(m.params, fit, importance=imp)
  if solver == "awq":
    return jquant.awq.quantize_model(m, m.params, calib, rules, progress=False)
  if solver == "gptq-fit":  # static groups fitted with each row's error weighted by the importance
    return jquant.gptq.quantize_model(m, m.params, calib, fit, importance=imp, progress=False, **GPTQ_FIT)
  return jquant.gptq.quantize_model(m, m.params, calib, rules, static_groups=True, progress=False)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--windows", type=int, default=4)
  ap.add_argument("--types", nargs="+", default=["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0",
                                                  "Q3_K", "Q2_K"])
  ap.add_argument("--solvers", nargs="+", default=["rtn", "rtn-imp", "gptq-fit", "awq"], choices=SOLVERS)
  ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens (GPTQ, AWQ, imatrix)")
  ap.add_argument("--fresh", action="store_true", help="ignore cached rows")
  ap.add_argument("--keep", default=None, help="a folder keeping the written GGUF files (default: a temporary one)")
  args = ap.parse_args()
  if not os.path.isfile(LLAMA_PY):
    sys.exit(f"no llama.cpp environment at {LLAMA_PY}; see this script's docstring.")
  from results_cache import open_cache
  _, runs, save = open_cache(os.path.join(ROOT, "experiments", "results", "gguf_llamacpp.json"),
                             {"windows": args.windows, "calib": args.calib}, args.fresh)
  m = jquant.models.from_gguf()
  windows = jquant.data.eval_windows(m.tokenizer, args.windows)
  calib = jquant.data.calibration_windows(m.tokenizer, args.calib)

  def llamacpp_ppl(params):  # jquant's prediction of llama.cpp's perplexity (its activation arithmetic)
    return jquant.eval.perplexity(m, jquant.gguf.llamacpp_params(params), windows, batch_size=2, progress=False)[0]

  with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, ".cache")) as tmp:
    if args.keep:
      os.makedirs(args.keep, exist_ok=True)
      tmp = args.keep
    wpath = os.path.join(tmp, "windows.npy")
    np.save(wpath, windows)
    f32 = os.path.join(tmp, "f32.gguf")
    jquant.gguf.export(f32, m.params, overwrite=True)
    if "float" not in runs:
      runs["float"] = {"llama": _llama("ppl", f32, wpath)["ppl"],
                       "jquant": jquant.eval.perplexity(m, m.params, windows, batch_size=2, progress=False)[0]}
      save()
    print(f"float (F32 export): {runs['float']}", flush=True)
    imat = os.path.join(tmp, "imatrix.npz")
    for name in args.types:
      rules = jquant.gguf.rules(m.params, name)
      for solver in args.solvers:
        key = f"{name} {solver}"
        path = os.path.join(tmp, f"{name}-{solver}.gguf")
        if key in runs:
          if "jquant_llamacpp" not in runs[key] and os.path.exists(path):
            # a kept file scored before jquant.gguf.llamacpp_params existed
            runs[key]["jquant_llamacpp"] = llamacpp_ppl(jquant.gguf.load(path, tokenizer=False).params)
            save()
          continue
        t0 = time.time()
        qparams = _solve(solver, m, calib, rules, _importance(m, calib, tmp))
        rep = jquant.gguf.export(path, qparams, types=name, overwrite=True)
        packed = jquant.gguf.load(path, tokenizer=False)
        runs[key] = {"mb": rep.nbytes / 1e6, "llama": _llama("ppl", path, wpath)["ppl"],
                     "jquant": jquant.eval.perplexity(m, packed.params, windows, batch_size=2, progress=False)[0],
                     "seconds": round(time.time() - t0)}
        runs[key]["jquant_llamacpp"] = llamacpp_ppl(packed.params)
        save()
        print(key, json.dumps(runs[key]), flush=True)
      for imatrix in ("-", "imatrix"):
        key = f"{name} llama.cpp" + (" imatrix" if imatrix != "-" else "")
        if key in runs:
          continue
        if imatrix != "-" and not os.path.exists(imat):
          _imatrix(_importance(m, calib, tmp), imat)
        qpath = os.path.join(tmp, f"{name}-llama{'-imatrix' if imatrix != '-' else ''}.gguf")
        if _llama("quantize", f32, qpath, _FTYPE[name], imat if imatrix != "-" else "-", "pure")["rc"] == 0:
          runs[key] = {"mb": os.path.getsize(qpath) / 1e6, "llama": _llama("ppl", qpath, wpath)["ppl"]}
          save()
          print(key, json.dumps(runs[key]), flush=True)
  print(table(runs, args.types))


_NAMES = {"rtn": "RTN", "rtn-imp": "RTN + importance", "gptq": "GPTQ min-max", "gptq-fit": "GPTQ", "awq": "AWQ"}


def table(runs, types, solvers=("rtn", "rtn-imp", "gptq-fit", "awq")):
  """The README's table from the cached runs: llama.cpp's perplexity of every file, jquant's of its own."""
  g = lambda k, f="llama": f"{runs[k][f]:.3f}" if k in runs and f in runs[k] else "-"  # noqa: E731
  names = " / ".join(_NAMES[s] for s in solvers)
  lines = [f"| type | bits/weight | file MB | llama.cpp ppl: jquant {names} | llama.cpp quantize: plain / imatrix "
           f"| jquant ppl: {names} | llama.cpp vs jquant: float activations / llama.cpp's |",
           "|---|---|---|---|---|---|---|"]
  for t in types:
    keys = [f"{t} {s}" for s in solvers]
    gap = lambda f: max((abs(runs[k]["llama"] / runs[k][f] - 1) * 100 for k in keys  # noqa: E731
                         if k in runs and f in runs[k]), default=float("nan"))
    mb = runs[keys[0]]["mb"] if keys[0] in runs else float("nan")
    lines.append(f"| {t} | {jquant.gguf.bits_per_weight(t):.4g} | {mb:.1f} | "
                 + " / ".join(g(k) for k in keys) + f" | {g(t + ' llama.cpp')} / {g(t + ' llama.cpp imatrix')} | "
                 + " / ".join(g(k, "jquant") for k in keys)
                 + f" | {gap('jquant'):.2f}% / {gap('jquant_llamacpp'):.2f}% |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
