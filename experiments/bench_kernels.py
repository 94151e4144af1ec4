"""Checks and times the Pallas kernels against XLA on one accelerator.

Cases (``--small`` shrinks them for a CPU smoke run):

* W4A16 at M = 1, 8, 16, 64 with K = N = 8192 (group 128, symmetric): the
  Pallas kernel with its table blocks and a sweep (`w4_sweep`: split_k in
  {2, 4, 8, 16}, bn in {64, 128, 256}, bk in {256, 512, 1024}, 4 or 8 warps,
  3 or 4 stages; M = 8 and 16 rerun M = 1's eight fastest points; the four
  fastest points of M = 1 and M = 64 rerun with inline-PTX unpacking), XLA's
  dequantize-then-matmul path, and the bf16 XLA matmul.
* W8A8 at M = K = N = 4096 and 8192 (settled): the Pallas kernel with its
  table blocks and one runner-up (weights stored (N, K), the int8 tensor-core
  operand layout), XLA's int8 dot with the same epilogue (4096 only), and the
  bf16 XLA matmul.

The report ends with the fastest variant per case and suggested W4A16 table
entries (``pallas_kernels/w4a16/blocks.py``) for the M <= 16 and M <= 64
buckets. Each W4A16 case stops its sweep at a share of ``--soft-limit`` (most
promising points first), so the whole run stays near ``--soft-limit`` seconds.

Every variant is first checked against a float32 XLA reference on random data
(``rel_err = |out - ref| / |ref|``, Frobenius; W8A8 int32 sums bit for bit).
Timing: ``R`` calls inside one jitted function, each on its own weight copy
(``R`` copies exceed L2, so every call reads its weights from HBM; no two
calls share an operand, so XLA cannot merge them), dispatched back to back and
synchronized with ``block_until_ready``; the median over repetitions, after
warm-up, divided by ``R``. Each case runs under try/except and a watchdog ends
the run (printing what it has) before the time limit.

Usage::

    python experiments/bench_kernels.py                   # on a GPU (or TPU)
    python experiments/bench_kernels.py --interpret --small   # CPU smoke run

Writes ``bench_kernels.md`` / ``.json`` / ``.png`` to ``$OUT`` when set, else to
``experiments/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import threading
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root first

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.w4a16 import blocks as wo_blocks  # noqa: E402
from pallas_kernels.w4a16 import gpu as wo_gpu  # noqa: E402
from pallas_kernels.w4a16 import reference as wo_ref  # noqa: E402
from pallas_kernels.w4a16 import tpu as wo_tpu  # noqa: E402
from pallas_kernels.w8a8 import blocks as w8_blocks  # noqa: E402
from pallas_kernels.w8a8 import gpu as w8_gpu  # noqa: E402
from pallas_kernels.w8a8 import reference as w8_ref  # noqa: E402
from pallas_kernels.w8a8 import tpu as w8_tpu  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

# Datasheet rates (dense). HBM in bytes/s, tensor-core peaks in op/s.
PEAKS = {
    "H200": dict(hbm=4.8e12, bf16=989e12, int8=1979e12),
    "H100 PCIe": dict(hbm=2.0e12, bf16=756e12, int8=1513e12),
    "H100": dict(hbm=3.35e12, bf16=989e12, int8=1979e12),
    "A100": dict(hbm=2.0e12, bf16=312e12, int8=624e12),
}


def device_peaks(kind: str):
  for key, val in PEAKS.items():
    if key.lower() in kind.lower():
      return key, val
  return None, None


@dataclasses.dataclass
class Row:
  case: str
  impl: str
  us: float = float("nan")
  speedup: float = float("nan")
  achieved: str = ""
  rel_err: float = float("nan")
  config: str = ""
  note: str = ""


class Bench:
  """Holds settings, the rows so far and the watchdog."""

  def __init__(self, args):
    self.args = args
    self.rows: list[Row] = []
    self.start = time.time()
    self.kind = jax.devices()[0].device_kind
    self.platform = jax.devices()[0].platform
    self.peak_name, self.peaks = device_peaks(self.kind)
    if args.hbm_tbs:
      self.peaks = dict(self.peaks or {}, hbm=args.hbm_tbs * 1e12)
    self.backend = "tpu" if self.platform == "tpu" else "gpu"
    if self.platform == "cpu" and not args.interpret:
      raise SystemExit("bench_kernels: no GPU/TPU here; run with --interpret --small for a smoke test.")
    self.lock = threading.Lock()
    self.w4_rows: dict = {}  # M -> [(Row, planned WOBlocks)] of finished Pallas W4A16 variants
    self.case_deadline = float("inf")  # extra variants of the running case stop after this (s)

  # --- bookkeeping ----------------------------------------------------------
  def elapsed(self) -> float:
    return time.time() - self.start

  def out_dir(self) -> str:
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    return out

  def add(self, row: Row):
    with self.lock:
      self.rows.append(row)
    print(f"  {row.case:28s} {row.impl:34s} {row.us:10.1f} us  x{row.speedup:5.2f}  {row.achieved:22s} "
          f"err {row.rel_err:.1e} {row.note}", flush=True)

  def table(self) -> str:
    lines = [f"Device: {self.kind} ({self.platform}); JAX {jax.__version__}; "
             f"peaks: {self.peak_name or 'unknown'} {self.peaks or ''}; wall {self.elapsed():.0f} s"
             + (" (interpret mode: times are meaningless)" if self.args.interpret else ""),
             "",
             "| case | implementation | time (us) | speedup vs bf16 | achieved | rel err | config |",
             "|---|---|---:|---:|---|---:|---|"]
    for r in self.rows:
      note = f" {r.note}" if r.note else ""
      lines.append(f"| {r.case} | {r.impl}{note} | {r.us:.1f} | {r.speedup:.2f} | {r.achieved} | "
                   f"{r.rel_err:.1e} | {r.config} |")
    return "\n".join(lines)

  def write(self):
    with self.lock:
      text = self.table()
      best = best_configs(self)
      if best:
        text += "\n\nFastest Pallas variant per case:\n" + best
      out = self.out_dir()
      with open(os.path.join(out, "bench_kernels.md"), "w") as f:
        f.write(text + "\n")
      with open(os.path.join(out, "bench_kernels.json"), "w") as f:
        json.dump({"device": self.kind, "jax": jax.__version__, "rows": [dataclasses.asdict(r) for r in self.rows]},
                  f, indent=1)
    return text

  def plot(self):
    try:
      import matplotlib
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
      return
    rows = [r for r in self.rows if math.isfinite(r.speedup) and "bf16" not in r.impl]
    if not rows:
      return
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    labels = [f"{r.case} | {r.impl}" for r in rows]
    ax.barh(range(len(rows)), [r.speedup for r in rows], color=["C0" if "pallas" in r.impl else "C1" for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over bf16 XLA matmul")
    ax.set_title(f"jquant kernels on {self.kind}")
    fig.tight_layout()
    fig.savefig(os.path.join(self.out_dir(), "bench_kernels.png"), dpi=110)
    plt.close(fig)

  def start_watchdog(self):
    def fire():
      print(f"\n!! watchdog: {self.args.time_limit:.0f} s reached; writing partial results and exiting.", flush=True)
      try:
        print(self.write(), flush=True)
      finally:
        os._exit(3)
    t = threading.Timer(self.args.time_limit, fire)
    t.daemon = True
    t.start()
    return t

  # --- measurement ------------------------------------------------------------
  def time_op(self, op, xs, ws):
    """Median microseconds per call of ``op(x_i, w_i)`` over the R pairs (see module doc)."""
    reps = len(xs)

    @jax.jit
    def many(xs, ws):
      return tuple(op(x, w) for x, w in zip(xs, ws))

    out = many(xs, ws)
    jax.block_until_ready(out)
    for _ in range(self.args.warmup - 1):
      jax.block_until_ready(many(xs, ws))
    t0 = time.perf_counter()
    jax.block_until_ready(many(xs, ws))
    one = time.perf_counter() - t0
    inner = max(1, min(50, int(self.args.batch_ms / 1e3 / max(one, 1e-6))))
    samples = []
    for _ in range(self.args.repeats):
      t0 = time.perf_counter()
      for _ in range(inner):
        out = many(xs, ws)
      jax.block_until_ready(out)
      samples.append((time.perf_counter() - t0) / (inner * reps))
    return statistics.median(samples) * 1e6

  def copies(self, nbytes_one: int) -> int:
    """Weight copies per timed call: >= 256 MB in all (5x the 50 MB L2 of H100/H200), so
    every call streams its (smallest, quantized) weights from HBM, not from L2."""
    if self.args.small:
      return 2
    return int(min(16, max(2, math.ceil(256e6 / nbytes_one))))

  def achieved_bw(self, nbytes, us):
    tbs = nbytes / (us * 1e-6) / 1e12
    if self.peaks and "hbm" in self.peaks:
      return f"{tbs:.2f} TB/s ({100 * tbs * 1e12 / self.peaks['hbm']:.0f}% HBM)"
    return f"{tbs:.2f} TB/s"

  def achieved_ops(self, ops, us, peak_key):
    t = ops / (us * 1e-6) / 1e12
    if self.peaks and peak_key in self.peaks:
      return f"{t:.0f} T{'FLOP' if peak_key == 'bf16' else 'OP'}/s ({100 * t * 1e12 / self.peaks[peak_key]:.0f}% {peak_key})"
    return f"{t:.0f} TOP/s"

  def guarded(self, case, impl, fn):
    """Runs one variant; records the error instead of stopping the benchmark."""
    if impl.startswith("pallas*") and self.elapsed() > min(self.args.soft_limit, self.case_deadline):
      self.add(Row(case, impl, note="skipped (time budget)"))
      return None
    try:
      return fn()
    except Exception as e:  # noqa: BLE001
      msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
      print(f"  !! {case} {impl}: {msg}", flush=True)
      if self.args.verbose:
        traceback.print_exc()
      self.add(Row(case, impl, note="FAILED " + msg.replace("|", "/")))
      return None


def rel_err(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(out)):
    return float("inf")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


# --------------------------------------------------------------------------- W8A8
def bench_w8a8(b: Bench, size: int):
  m = k = n = size
  case = f"W8A8 {m}x{k}x{n}"
  key = jax.random.key(size)
  kx, kw, ks = jax.random.split(key, 3)
  interp = b.args.interpret
  copies = b.copies(k * n)
  xs_f = [jax.random.normal(jax.random.fold_in(kx, i), (m, k), jnp.bfloat16) for i in range(copies)]
  wq = [jax.random.randint(jax.random.fold_in(kw, i), (k, n), -127, 128, jnp.int32).astype(jnp.int8)
        for i in range(copies)]
  ws = jax.random.uniform(ks, (1, n), jnp.float32, 0.001, 0.01)
  wq_nk = [w.T.copy() for w in wq]  # weights stored (N, K) once, as a deployment would
  xq = []
  for x in xs_f:
    q, s = w8_ref.quantize_per_token(x)
    xq.append((q, s))
  jax.block_until_ready((xq, wq_nk))
  flops = 2.0 * m * n * k

  # Baseline: bf16 XLA matmul of the same shape.
  wbf = [w.astype(jnp.bfloat16) for w in wq]
  t_bf16 = b.guarded(case, "bf16 XLA", lambda: b.time_op(lambda x, w: jnp.dot(x, w), xs_f, wbf))
  del wbf
  if t_bf16 is not None:
    b.add(Row(case, "bf16 XLA (baseline)", t_bf16, 1.0, b.achieved_ops(flops, t_bf16, "bf16")))

  # Ground truth: int32 sums from XLA, scaled in f32.
  acc_ref = np.asarray(w8_ref.int8_matmul(xq[0][0], wq[0]))
  y_ref = acc_ref.astype(np.float64) * np.asarray(xq[0][1], np.float64) * np.asarray(ws, np.float64)

  def record(impl, fn, weights, config=""):
    """fn(x_q, x_scale or None, w) -> output (int32 sums when x_scale is None)."""
    def go():
      acc = fn(xq[0][0], None, weights[0])
      exact = bool(np.array_equal(np.asarray(acc), acc_ref))
      err = rel_err(fn(xq[0][0], xq[0][1], weights[0]), y_ref)
      us = b.time_op(lambda a, w: fn(a[0], a[1], w), xq, weights)
      sp = t_bf16 / us if t_bf16 else float("nan")
      b.add(Row(case, impl, us, sp, b.achieved_ops(flops, us, "int8"), err, config,
                "" if exact else "INT32 MISMATCH"))
    b.guarded(case, impl, go)

  def xla_int8(a, s, w):
    if s is None:
      return w8_ref.int8_matmul(a, w)
    return w8_ref.w8a8_matmul(a, s, w, ws, jnp.bfloat16)

  if b.args.small or size <= 4096:
    record("XLA int8 dot + epilogue", xla_int8, wq)

  kern = w8_tpu if b.backend == "tpu" else w8_gpu
  configs = [None]
  if b.backend == "gpu" and not b.args.small:
    # Settled on H200 (1.5x bf16); one runner-up keeps the table honest.
    configs += [w8_blocks.W8A8Blocks(128, 128, 64, num_warps=4, num_stages=5)]
  # (K, N) weights lost 5x on H200; they stay in the CPU smoke run only.
  layouts = ["nk", "kn"] if b.backend == "gpu" and b.args.small else (["nk"] if b.backend == "gpu" else ["kn"])
  for layout in layouts:
    for cfg in (configs if layout == "nk" else [None]):
      def pallas(a, s, w, cfg=cfg, layout=layout):
        kw = dict(interpret=interp, blocks=cfg)
        if b.backend == "gpu":
          kw["w_layout"] = layout
        return kern.w8a8_matmul(a, s, w, None if s is None else ws, jnp.bfloat16, **kw)

      shown = cfg or w8_blocks.pick(b.backend, m, k, n, _target(b))
      name = f"pallas{'*' if cfg else ''} W ({'N,K' if layout == 'nk' else 'K,N'})"
      record(name, pallas, wq_nk if layout == "nk" else wq, _fmt_blocks(shown))


def _target(b: Bench) -> str:
  if b.backend == "tpu":
    from pallas_kernels import tpu_generation
    return tpu_generation()
  from pallas_kernels import gpu_arch
  return gpu_arch()


def _fmt_blocks(blk) -> str:
  if blk is None:
    return ""
  d = dataclasses.asdict(blk)
  return " ".join(f"{k}={v}" for k, v in d.items())


# -------------------------------------------------------------------------- W4A16
def bench_w4a16(b: Bench, m: int, k: int, n: int, group: int = 128):
  case = f"W4A16 M={m} K={k} N={n} g{group}"
  interp = b.args.interpret
  layout = wo_ref.WeightLayout(bits=4, k=k, group_size=group, offset=8)
  g = k // group
  key = jax.random.key(1000 + m)
  packed_bytes = k // 2 * n + g * n * 4
  copies = b.copies(k // 2 * n)
  ws = [jax.random.bits(jax.random.fold_in(key, i), (k // 2, n), jnp.uint8) for i in range(copies)]
  ss = [jax.random.uniform(jax.random.fold_in(key, 100 + i), (g, n), jnp.float32, 0.005, 0.02)
        for i in range(copies)]
  xs = [jax.random.normal(jax.random.fold_in(key, 200 + i), (m, k), jnp.bfloat16) for i in range(copies)]
  jax.block_until_ready((ws, ss, xs))
  io_bytes = m * k * 2 + m * n * 2

  # bf16 baseline on the dequantized weights (same shape, 4x the bytes).
  def bf16_weights():
    return [wo_ref.dequantize(w, s, None, layout).astype(jnp.bfloat16) for w, s in zip(ws, ss)]

  ref = np.asarray(jnp.dot(xs[0].astype(jnp.float32), wo_ref.dequantize(ws[0], ss[0], None, layout),
                           precision=jax.lax.Precision.HIGHEST))
  wbf = bf16_weights()
  t_bf16 = b.guarded(case, "bf16 XLA", lambda: b.time_op(lambda x, w: jnp.dot(x, w), xs, wbf))
  del wbf
  if t_bf16 is not None:
    b.add(Row(case, "bf16 XLA (baseline)", t_bf16, 1.0, b.achieved_bw(k * n * 2 + io_bytes, t_bf16)))

  pairs = list(zip(ws, ss))

  def record(impl, op, config=""):
    def go():
      y = jax.jit(op)(xs[0], pairs[0])
      err = rel_err(y, ref) if ref is not None else float("nan")
      us = b.time_op(op, xs, pairs)
      sp = t_bf16 / us if t_bf16 else float("nan")
      b.add(Row(case, impl, us, sp, b.achieved_bw(packed_bytes + io_bytes, us), err, config))
    b.guarded(case, impl, go)

  record("XLA dequantize + dot", lambda x, p: wo_ref.weight_only_matmul(x, p[0], p[1], None, layout))

  if b.backend == "tpu":
    record("pallas (TPU)", lambda x, p: wo_tpu.weight_only_matmul(x, p[0], p[1], None, layout, interpret=interp),
           _fmt_blocks(wo_tpu.plan(m, n, layout)))
    return
  base = wo_blocks.table_entry("gpu", _target(b), m)
  variants = [("pallas (table)", None)]
  if not b.args.small:
    variants += [(_w4_name(v, base), v) for v in w4_sweep(b, base, m)]
  else:
    variants += [("pallas* split_k=2 x_mode=pre", dataclasses.replace(base, split_k=2, x_mode="pre")),
                 ("pallas* split_k=8 asm", dataclasses.replace(base, split_k=8, asm_unpack=True))]
  seen = set()

  def run(name, blk):
    shown = wo_gpu.plan(m, n, layout, jnp.bfloat16, blk)
    if shown in seen:  # the planner clamps some sweep points onto the same kernel
      return
    seen.add(shown)
    n_rows = len(b.rows)
    record(name, lambda x, p, blk=blk: wo_gpu.weight_only_matmul(x, p[0], p[1], None, layout, interpret=interp,
                                                                 blocks=blk), _fmt_blocks(shown))
    if len(b.rows) > n_rows and math.isfinite(b.rows[-1].us):
      b.w4_rows.setdefault(m, []).append((b.rows[-1], shown))

  deadline = b.case_deadline
  b.case_deadline = deadline - 10.0  # keep time for the inline-PTX reruns below
  for name, blk in variants:
    run(name, blk)
  b.case_deadline = deadline
  if not b.args.small and not (1 < m <= 16):
    for blk in _asm_followups(b, m):
      run(_w4_name(blk, base), blk)


def _w4_name(v, base) -> str:
  diff = [f"{f.name}={getattr(v, f.name)}" for f in dataclasses.fields(v) if getattr(v, f.name) != getattr(base, f.name)]
  return "pallas* " + (" ".join(diff).replace("num_warps", "w").replace("num_stages", "st") or "table")


def w4_sweep(b: Bench, base, m: int):
  """Sweep points for one M, most promising first (the time budget cuts the tail).

  Small M (one 16-row tile) is a pure weight stream: the sweep varies the
  programs in flight (``split_k`` x ``N / bn``), the bytes per step (``bk``)
  and warps/stages (shared memory per program = stages x bk/2 x bn bytes sets
  how many programs fit on an SM). M = 8 and 16 share M = 1's tile, so they
  rerun only M = 1's fastest points.
  """
  r = dataclasses.replace
  s = base
  if m > 1 and m <= 16 and b.w4_rows.get(1):
    top = sorted((row.us, blk) for row, blk in b.w4_rows[1] if math.isfinite(row.us) and row.rel_err < 2e-2)
    picks = [blk for _, blk in top[:8]]
    return [r(s, **{f: getattr(p, f) for f in ("bn", "bk", "split_k", "num_warps", "num_stages", "x_mode",
                                                "asm_unpack")}) for p in picks]
  out = [r(s, asm_unpack=True)]
  if m <= 16:
    for bk in (256, 512):
      for sk in ((4, 8, 16) if bk == 256 else (4, 8, 16, 2)):
        for bn in (128, 64, 256):
          out.append(r(s, bn=bn, bk=bk, split_k=sk, num_warps=4, num_stages=4 if bk * bn <= 65536 else 3))
    out += [r(s, bn=64, bk=1024, split_k=sk, num_stages=3) for sk in (4, 8)]
    out += [r(s, bn=bn, bk=256, split_k=sk, num_warps=8, num_stages=4) for bn in (128, 256) for sk in (4, 8)]
    out += [r(s, bn=128, bk=512, split_k=sk, num_warps=8, num_stages=3) for sk in (4, 8)]
    out += [r(s, bn=128, bk=256, split_k=sk, num_stages=3) for sk in (4, 8)]
  else:
    for bk in (256, 128):
      for sk in (4, 2, 8):
        for bn in (128, 64):
          out.append(r(s, bn=bn, bk=bk, split_k=sk, num_warps=4, num_stages=4))
    out += [r(s, bn=128, bk=256, split_k=sk, num_warps=8) for sk in (2, 4)]
    out += [r(s, bn=bn, bk=256, split_k=4, num_stages=3) for bn in (64, 128)]
  out += [r(s, x_mode="split")]
  return out


def _asm_followups(b: Bench, m: int):
  """The fastest non-asm points rerun with inline-PTX unpacking."""
  rows = sorted((row.us, blk) for row, blk in b.w4_rows.get(m, []) if math.isfinite(row.us) and not blk.asm_unpack)
  return [dataclasses.replace(blk, asm_unpack=True) for _, blk in rows[:4]]


def best_configs(b: Bench) -> str:
  """Per case, the fastest Pallas variant (to carry into the block tables)."""
  out = []
  for case in dict.fromkeys(r.case for r in b.rows):
    cands = [r for r in b.rows if r.case == case and r.impl.startswith("pallas") and math.isfinite(r.us)
             and r.rel_err < 2e-2 and "MISMATCH" not in r.note]
    if cands:
      best = min(cands, key=lambda r: r.us)
      out.append(f"- {case}: {best.impl} {best.us:.1f} us (x{best.speedup:.2f}) [{best.config}]")
  out += suggested_w4_entries(b)
  return "\n".join(out)


def suggested_w4_entries(b: Bench) -> list[str]:
  """Table entries for ``pallas_kernels/w4a16/blocks.py``: per M bucket, the planned blocks with the
  lowest summed time over the bucket's benchmarked M that ran at all of them (correct results only)."""
  lines = []
  for lo, limit in ((0, 16), (16, 64)):
    ms = sorted(m for m in b.w4_rows if lo < m <= limit and b.w4_rows[m])
    if not ms:
      continue
    times: dict = {}
    for m in ms:
      for row, blk in b.w4_rows[m]:
        if row.rel_err < 2e-2:
          key = dataclasses.replace(blk, bm=0)  # bm follows M; compare the rest
          times.setdefault(key, {})[m] = row.us
    full = {key: sum(t.values()) for key, t in times.items() if len(t) == len(ms)}
    if not full:
      continue
    key = min(full, key=full.get)
    blk = dataclasses.replace(key, bm=min(max(ms), 128) if limit > 16 else 16)
    args = ", ".join(f"{f.name}={getattr(blk, f.name)!r}" for f in dataclasses.fields(blk)[3:])
    per_m = ", ".join(f"M={m}: {times[key][m]:.1f} us" for m in ms)
    lines.append(f"- suggested sm90 W4A16 entry for M <= {limit} ({per_m}): "
                 f"({limit}, WOBlocks({blk.bm}, {blk.bn}, {blk.bk}, {args}))")
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--interpret", action="store_true", help="run the kernels in the Pallas interpreter (CPU)")
  p.add_argument("--small", action="store_true", help="small shapes (smoke test)")
  p.add_argument("--only", choices=["w8a8", "w4a16"], default=None)
  p.add_argument("--repeats", type=int, default=9, help="timed repetitions (median)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--batch-ms", type=float, default=20.0, help="device time per timed repetition")
  p.add_argument("--time-limit", type=float, default=200.0, help="watchdog: exit with partial results (s)")
  p.add_argument("--soft-limit", type=float, default=150.0,
                 help="skip extra variants after this (s); each W4A16 M gets a share of it")
  p.add_argument("--hbm-tbs", type=float, default=None, help="override HBM bandwidth (TB/s)")
  p.add_argument("--verbose", action="store_true")
  args = p.parse_args(argv)
  if args.small:
    args.repeats = min(args.repeats, 3)
    args.warmup = min(args.warmup, 1)
    args.batch_ms = 1.0
  b = Bench(args)
  dog = b.start_watchdog()
  print(f"bench_kernels on {b.kind} ({b.platform}), JAX {jax.__version__}, backend {b.backend}"
        f"{' (interpret)' if args.interpret else ''}", flush=True)
  w8_sizes = (128,) if args.small else (4096, 8192)
  w4_shapes = [(4, 256, 256)] if args.small else [(mm, 8192, 8192) for mm in (1, 8, 16, 64)]
  # Share of the soft limit by which each W4A16 case ends its sweep (M = 1 sweeps widest).
  share = {1: 0.42, 8: 0.52, 16: 0.62, 64: 0.90}
  if args.only in (None, "w4a16"):
    for m, k, n in w4_shapes:
      b.case_deadline = share.get(m, 1.0) * args.soft_limit if args.only is None else float("inf")
      b.guarded(f"W4A16 M={m}", "case", lambda m=m, k=k, n=n: bench_w4a16(b, m, k, n, 128 if k >= 128 else 32))
      b.write()
  b.case_deadline = float("inf")
  if args.only in (None, "w8a8"):
    for size in w8_sizes:
      b.guarded(f"W8A8 {size}", "case", lambda size=size: bench_w8a8(b, size))
      b.write()
  dog.cancel()
  text = b.write()
  b.plot()
  print("\n" + text)
  print(f"\nwrote {os.path.join(b.out_dir(), 'bench_kernels.md')} in {b.elapsed():.0f} s", flush=True)
  return b


if __name__ == "__main__":
  main()
