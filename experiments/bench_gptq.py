"""Solver speed: `jquant.gptq.solve` against a straightforward implementation of the published algorithm.

For each kernel shape (in, out) it builds a Hessian from correlated random
inputs and times, after compilation, ``jquant.gptq.solve`` (W4 g128 sym,
block 128), and side by side on the same matrix:

* ``numpy``: the published algorithm written plainly in NumPy float32, in the
  reference layout (weights (out, in), a Python loop over input columns with
  lazy block updates of 128), the way the PyTorch reference runs on a CPU;
* ``torch``: the same code in PyTorch (CPU), if torch is installed (it is not
  a dependency of jquant);
* ``rtn``: jitted round-to-nearest with the same spec, for scale.

Compilation time is reported separately (first call minus a steady call).
Writes ``experiments/results/gptq_bench.md``.

Usage:
    python experiments/bench_gptq.py [--shapes 576x1536,1536x576,2048x2048,4096x4096] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
GROUP, BLOCK, BITS = 128, 128, 4


def problem(k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2 * k, k), dtype=np.float32)
  x = x + 0.5 * x[:, :1] + 0.3 * np.roll(x, 1, axis=1)  # correlated inputs: far from diagonal H
  x *= np.linspace(0.2, 2.0, k, dtype=np.float32)
  h = (2.0 / x.shape[0]) * (x.T @ x)
  w = rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)
  return w.astype(np.float32), h.astype(np.float32)


def _params(x, qmax):
  """Symmetric group parameters of columns-as-groups x (out, g): the spec's min-max rule."""
  amax = np.abs(x).max(axis=1)
  s = amax / qmax
  return np.where(s > 1e-30, s, 1.0).astype(x.dtype)


def reference_gptq(xp, w_in_out, h, *, group=GROUP, block=BLOCK, bits=BITS, damp=0.01):
  """The published algorithm, written plainly for array module ``xp`` (numpy or torch), float32.

  Layout as in the reference: W (out, in); quantizes input columns left to right.
  """
  qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
  W = xp.asarray(np.ascontiguousarray(w_in_out.T)).clone() if xp.__name__ == "torch" else w_in_out.T.copy()
  H = xp.asarray(h).clone() if xp.__name__ == "torch" else h.copy()
  cols = W.shape[1]
  dead = xp.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H = H + damp * xp.mean(xp.diag(H)) * xp.eye(cols, dtype=H.dtype)
  if xp.__name__ == "torch":
    L = xp.linalg.cholesky(H)
    Hinv = xp.linalg.cholesky(xp.cholesky_inverse(L), upper=True)
  else:
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T.copy()
  Q = xp.zeros_like(W)
  scale = None
  for i1 in range(0, cols, block):
    i2 = min(i1 + block, cols)
    W1 = W[:, i1:i2].clone() if xp.__name__ == "torch" else W[:, i1:i2].copy()
    Err1 = xp.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      if (i1 + i) % group == 0:
        g = W[:, i1 + i:i1 + i + group]
        if xp.__name__ == "torch":
          amax = g.abs().amax(dim=1)
          scale = xp.where(amax / qmax > 1e-30, amax / qmax, xp.ones_like(amax))
        else:
          scale = _params(g, qmax)
      w = W1[:, i]
      d = Hinv1[i, i]
      q = xp.clip(xp.round(w / scale), qmin, qmax) * scale
      Q[:, i1 + i] = q
      err = (w - q) / d
      W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
      Err1[:, i] = err
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return Q


def _best(fn, reps):
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="576x1536,1536x576,2048x2048,4096x4096")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--act-order", action="store_true", help="also time act_order=True")
  ap.add_argument("--out", default=os.path.join(RESULTS, "gptq_bench.md"))
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import jquant
  from jquant import gptq
  try:
    import torch
  except ImportError:
    torch = None

  spec = jquant.QuantSpec(bits=BITS, symmetric=True, granularity="group", group_size=GROUP, pad_groups=True)
  rtn = jax.jit(lambda w: jquant.quantize(w, spec))
  loss_of = jax.jit(gptq.quant_loss)
  rows = []
  for shape in args.shapes.split(","):
    k, n = (int(v) for v in shape.split("x"))
    w_np, h_np = problem(k, n)
    w, h = jnp.asarray(w_np), jnp.asarray(h_np)
    variants = [False, True] if args.act_order else [False]
    for act_order in variants:
      run = lambda: jax.block_until_ready(gptq.solve(w, h, spec, act_order=act_order))
      t0 = time.perf_counter()
      q, loss = run()
      first = time.perf_counter() - t0
      steady = _best(run, args.reps)
      rtn_q = rtn(w)
      rtn_s = _best(lambda: jax.block_until_ready(rtn(w)), args.reps)
      row = {"shape": f"{k}x{n}", "act_order": act_order, "jax_s": steady, "compile_s": max(first - steady, 0.0),
             "loss": float(loss), "rtn_loss": float(loss_of(w, rtn_q, h)), "rtn_s": rtn_s}
      if not act_order:
        reps_np = 1 if k * n > 4e6 else args.reps
        row["numpy_s"] = _best(lambda: reference_gptq(np, w_np, h_np), reps_np)
        q_np = reference_gptq(np, w_np, h_np)
        row["numpy_loss"] = float(loss_of(w, jnp.asarray(q_np.T), h))
        if torch is not None:
          torch.set_num_threads(os.cpu_count() or 1)
          row["torch_s"] = _best(lambda: reference_gptq(torch, w_np, h_np), reps_np)
      rows.append(row)
      print(row, flush=True)

  cpu = f"{os.cpu_count()}-core CPU container" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
  lines = [f"# GPTQ solver speed ({cpu}, jax {jax.__version__})", "",
           f"W{BITS} g{GROUP} symmetric, block {BLOCK}, damp 0.01; Hessian from correlated random inputs. "
           f"Times are the best of {args.reps} steady calls (NumPy baseline: 1 call above 4M weights); "
           "compile = first call minus a steady call. Loss = sum_j (w-q)_j^T H (w-q)_j / 2.", "",
           "| kernel (in x out) | act-order | jquant solve s | compile s | NumPy f32 reference s | "
           "torch CPU s | speed-up vs NumPy | speed-up vs torch | GPTQ loss | NumPy ref loss | RTN loss | RTN s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    np_s, t_s = r.get("numpy_s"), r.get("torch_s")
    np_txt = "" if np_s is None else f"{np_s:.3f}"
    torch_txt = "n/a" if t_s is None else f"{t_s:.3f}"
    speed = "" if np_s is None else f"{np_s / r['jax_s']:.1f}x"
    speed_t = "" if t_s is None else f"{t_s / r['jax_s']:.1f}x"
    lines.append(
        f"| {r['shape']} | {'on' if r['act_order'] else 'off'} | {r['jax_s']:.3f} | {r['compile_s']:.2f} | "
        f"{np_txt} | {torch_txt} | {speed} | {speed_t} | {r['loss']:.4g} | {r.get('numpy_loss', float('nan')):.4g} | "
        f"{r['rtn_loss']:.4g} | {r['rtn_s']:.4f} |")
  if torch is None:
    lines += ["", "torch is not installed here: the torch column is n/a."]
  else:
    lines += ["", f"torch {torch.__version__} (CPU, {torch.get_num_threads()} threads) runs the same reference code."]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
