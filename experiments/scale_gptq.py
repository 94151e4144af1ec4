"""GPTQ of a 1B Llama sharded over 8 devices: peak bytes per device and time per block; TPU compile-only memory.

A synthetic Llama with SmolLM2-135M's proportions scaled up to about 1B
parameters (random weights): dim 2048 (SmolLM2: 576), head_dim 64 (64),
32 query / 8 key-value heads (9 / 3), FFN 5632 = 2.75 dim (1536 = 2.67 dim),
vocab 49152 (49152), 20 layers (30): 1.00B parameters. Its parameters are
sharded over 8 simulated CPU devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=8``) as MaxText lays them out
(`jquant.sharding.shard_params`: FSDP on ``embed``, tensor parallelism on
heads / MLP / vocab), and `jquant.gptq.quantize_model` runs GPTQ W4 g128
(act-order, true-sequential) end to end on a few short calibration windows.

Measured:

* bytes per device of the float model and of the quantized result
  (`jquant.sharding.bytes_per_device`);
* peak live bytes per device during the pass: a thread samples
  ``jax.live_arrays()`` every 50 ms and sums each device's shards;
* the temporaries of every compiled step (block forward, Hessian
  accumulation, GPTQ sweep, ...) per device, from
  ``jax.jit(...).lower(...).compile().memory_analysis()``
  (``temp_size_in_bytes``); the estimated peak per device is the sampled
  live peak plus the largest step temporary;
* wall time per block (block 0 includes compilation; the later ones reuse
  the compiled steps).

The whole 20-layer model runs by default (about 50 minutes on 2 CPU cores);
``--layers N`` runs the first N blocks of the same shapes (the per-block work
and working set do not depend on the depth; the float model per device grows
linearly with it). Writes ``experiments/results/scale_gptq.md`` and ``.json``.

``--tpu-aot TOPOLOGY`` instead compiles GPTQ's two K x K steps (the damped
factor and the column-split sweep) for a TPU topology with libtpu (`make
tpu-aot`; no TPU needed) and writes their per-chip memory in units of K x K
matrices to ``experiments/results/scale_gptq_tpu.md`` and ``.json``: the
coefficients of the 70B estimate in the README.

``--shape dim=128,ffn_dim=256,...`` overrides the block shapes for a quick
check of the script; its results go to ``scale_gptq_check.{md,json}``, so the
1B results are not overwritten. ``--no-aot`` skips the compile-only
accounting of the 1B model's sweeps.

Usage:
    python experiments/scale_gptq.py [--layers 20] [--mesh 4x2] [--windows 8] [--seq 64] [--no-aot]
    python experiments/scale_gptq.py --layers 2 --no-aot --shape dim=128,ffn_dim=256,n_heads=4,n_kv_heads=2,vocab_size=512,head_dim=32
    python experiments/scale_gptq.py --tpu-aot v5e:2x4
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# libtpu for --tpu-aot (compile only; JAX_PLATFORMS=cpu keeps any TPU backend from starting), as tests/conftest.py.
LIBTPU = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, ".venv", "libtpu-aot", "libtpu",
                      "libtpu.so")
if "TPU_LIBRARY_PATH" not in os.environ and os.path.isfile(LIBTPU):
  os.environ["TPU_LIBRARY_PATH"] = os.path.abspath(LIBTPU)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside a test run that also loads it
# 8 simulated devices on 2 cores: a device thread can wait minutes at a collective while the others compute;
# XLA's CPU runtime would abort the process after 40 s (and warn after 20 s).
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_warn_stuck_timeout_seconds=600"
                              " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
                              " --xla_cpu_collective_timeout_seconds=3600")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jquant  # noqa: E402
from jquant import gptq, graph, models, sharding  # noqa: E402
from jquant.gptq import core as gptq_core  # noqa: E402
from jquant.gptq import model as gptq_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FULL_LAYERS = 20
SOLVE_JIT = gptq_core._solve_jit  # the compiled sweep itself (instrument() wraps the module's name)


FULL_SHAPE = dict(vocab_size=49152, dim=2048, n_heads=32, n_kv_heads=8, ffn_dim=5632, head_dim=64)
SHAPE = dict(FULL_SHAPE)  # what runs (--shape overrides it)


def config(layers: int, shape=None) -> models.LlamaConfig:
  return models.LlamaConfig(n_layers=layers, rope_theta=100000.0, **(SHAPE if shape is None else shape))


def n_params(cfg: models.LlamaConfig) -> int:
  d, hd = cfg.dim, cfg.head_dim
  attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
  block = attn + 3 * d * cfg.ffn_dim + 2 * d
  return cfg.n_layers * block + cfg.vocab_size * d + d


class LiveSampler:
  """Samples the bytes each device holds in live jax arrays; keeps the peak per device."""

  def __init__(self, period=0.05):
    self.period, self.peak, self._stop = period, {}, threading.Event()
    self.top = []  # the largest arrays on device 0 when its peak was reached
    self.thread = threading.Thread(target=self._run, daemon=True)

  def sample(self):
    now: dict = {}
    on0 = []
    for a in jax.live_arrays():
      try:
        for sh in a.addressable_shards:
          now[sh.device.id] = now.get(sh.device.id, 0) + sh.data.nbytes
          if sh.device.id == 0:
            on0.append((sh.data.nbytes, f"{a.dtype}{list(a.shape)} {getattr(a.sharding, 'spec', '')}"))
      except Exception:  # an array deleted while we look
        pass
    if now.get(0, 0) > self.peak.get(0, 0):
      self.top = sorted(on0, reverse=True)[:8]
    for d, b in now.items():
      self.peak[d] = max(self.peak.get(d, 0), b)

  def _run(self):
    while not self._stop.is_set():
      self.sample()
      time.sleep(self.period)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self.thread.join()


STEP_TEMPS: dict = {}  # step name -> per-device temp / argument / output bytes of its compiled program


def _analysed(name, f):
  """Wraps a jitted ``f``: on its first call with each input structure, records its compiled memory analysis."""
  seen = set()

  def call(*args, **kwargs):
    key = str(jax.tree_util.tree_structure((args, kwargs))) + str([getattr(a, "shape", None)
                                                                      for a in jax.tree_util.tree_leaves(args)])
    if key not in seen:
      seen.add(key)
      try:
        ma = f.lower(*args, **kwargs).compile().memory_analysis()
        if ma is not None:
          old = STEP_TEMPS.get(name, {})
          STEP_TEMPS[name] = {k: max(old.get(k, 0), int(getattr(ma, k)))
                              for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")}
      except Exception as e:  # noqa: BLE001  (the analysis is a measurement, never a reason to fail)
        STEP_TEMPS.setdefault(name, {"error": f"{type(e).__name__}: {e}"[:200]})
    return f(*args, **kwargs)

  return call


def instrument():
  """Memory analysis of the block steps and the GPTQ sweep; timestamps at the end of every block."""
  marks = []
  jitted = graph.Program.jitted

  def jitted_analysed(self, seg, reduce=None, *, record=False):
    f = jitted(self, seg, reduce, record=record)
    return _analysed("hessian step" if reduce is not None else "block forward", f)

  graph.Program.jitted = jitted_analysed
  gptq_core._factor_jit = _analysed("factor (Cholesky + triangular inverse)", gptq_core._factor_jit)
  solve = gptq_core._solve_jit
  gptq_core._solve_jit = _analysed("gptq sweep (shard_map over columns)", solve)
  forward = gptq_model._Runs.forward

  def forward_marked(self, i, flat, states):
    out = forward(self, i, flat, states)
    jax.block_until_ready(out)
    marks.append(time.perf_counter())
    return out

  gptq_model._Runs.forward = forward_marked
  return marks


def _groups(cfg) -> dict:
  """``{solve: (K, N)}`` of one block: layers sharing an input are solved side by side."""
  d, f, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim or cfg.dim // cfg.n_heads
  return {"q|k|v": (d, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd), "o": (cfg.n_heads * hd, d), "gate|up": (d, 2 * f),
          "down": (f, d)}


def compiled_sweep(mesh, k: int, n: int, spec):
  """Memory analysis of the GPTQ sweep (`_solve_jit`, act-order, output columns over every mesh device) of a
  (k, n) kernel, compiled for ``mesh``'s devices from shapes only (nothing executed)."""
  sds = jax.ShapeDtypeStruct
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  cols = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, tuple(mesh.axis_names)))
  h = sds((k, k), np.float32, sharding=rep)
  fac = jax.eval_shape(lambda h: gptq_core.factor_hessian(h, np.float32(0.01), act_order=True), sds((k, k), np.float32))
  fac = jax.tree_util.tree_map(lambda a: sds(a.shape, a.dtype, sharding=rep), fac)
  return SOLVE_JIT.lower(sds((k, n), np.float32, sharding=cols), h, fac, spec=spec, block_size=128, act_order=True,
                         static_groups=False, mesh=mesh, axis_names=tuple(mesh.axis_names)).compile().memory_analysis()


def aot_full(mesh, layers: int = FULL_LAYERS) -> dict:
  """Per-device memory of the 1B model's GPTQ pass, without running it: parameter shards read from the
  shardings, Hessian sums and inverse factors of one block (replicated, float32), and the compiled memory
  analysis of the GPTQ sweep (`jquant.gptq.core._solve_jit`, output columns over all devices) of each of the
  block's four solves, compiled for the real shapes (nothing executed)."""
  from jquant.models.llama import Transformer
  cfg = config(layers, FULL_SHAPE)
  init = lambda k: Transformer(cfg).init(k, jax.numpy.zeros((1, 2), jax.numpy.int32))["params"]
  abstract = jax.eval_shape(init, jax.random.key(0))
  shard = sharding.param_shardings(abstract, mesh)
  per_dev = 0
  for a, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shard)):
    per_dev += int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
  solves = _groups(cfg)
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=128)
  out = {"params": n_params(cfg), "float_bytes_per_device": per_dev, "solves": {}}
  for name, (k, n) in solves.items():
    t0 = time.perf_counter()
    ma = compiled_sweep(mesh, k, n, spec)
    out["solves"][name] = {"k": k, "n": n, "temp": int(ma.temp_size_in_bytes), "args": int(ma.argument_size_in_bytes),
                           "outputs": int(ma.output_size_in_bytes), "compile_s": time.perf_counter() - t0}
  # Held during a block: every group's Hessian sum (true-sequential keeps them all) and one inverse factor.
  out["hessians_bytes_per_device"] = 4 * sum(k * k for k, _ in solves.values())
  out["max_factor_bytes_per_device"] = 4 * max(k * k for k, _ in solves.values())
  out["block_float_bytes"] = 4 * (n_params(config(2, FULL_SHAPE)) - n_params(config(1, FULL_SHAPE)))
  big = max(out["solves"].values(), key=lambda v: v["temp"])
  # Peak of the pass: parameter shards, all Hessian sums of the block, the largest sweep's inverse factor,
  # weights, outputs and temporaries (its H is among the sums), plus the block's quantized codes (small).
  out["estimated_peak_bytes_per_device"] = (per_dev + out["hessians_bytes_per_device"] + big["args"] - 4 * big["k"] ** 2
                                            + big["temp"] + big["outputs"])
  return out


def tpu_aot(topology: str, factor_sizes=(2048, 4096), sweep_shapes=((2048, 8192),)) -> dict:
  """Per-chip memory of GPTQ's two K x K steps, compiled for a TPU ``topology`` (compile only, no TPU).

  `jquant.gptq.factor_hessian` (K x K in, replicated) is compiled for each K in
  ``factor_sizes``, and the column-split sweep (`_solve_jit`, output columns
  over every chip of the topology) for each (K, N) in ``sweep_shapes``; their
  `compile().memory_analysis()` is read and expressed in units of one K x K
  float32 matrix. libtpu's compile time grows steeply with K (a K = 4096
  factor takes minutes on 2 cores), so 70B sizes (K = 28672) are reached by
  these units, which do not depend on K.
  """
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  n = len(topo.devices)
  mesh = sharding.make_mesh(n, 1, devices=topo.devices)
  sds = jax.ShapeDtypeStruct
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=128)
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
  out = {"topology": topology, "chips": n, "factor": [], "sweep": []}
  for k in factor_sizes:
    t0 = time.perf_counter()
    ma = gptq_core._factor_jit.lower(sds((k, k), np.float32, sharding=rep), sds((), np.float32, sharding=rep),
                                        act_order=True).compile().memory_analysis()
    row = {"k": k, "compile_s": time.perf_counter() - t0, **{f: int(getattr(ma, f)) for f in fields}}
    out["factor"].append(row)
    print(f"{topology} factor K={k}: temp {row['temp_size_in_bytes'] / (4 * k * k):.2f} K^2 ({row['compile_s']:.0f} s)",
          flush=True)
  for k, nn in sweep_shapes:
    t0 = time.perf_counter()
    ma = compiled_sweep(mesh, k, nn, spec)
    row = {"k": k, "n": nn, "compile_s": time.perf_counter() - t0, **{f: int(getattr(ma, f)) for f in fields}}
    out["sweep"].append(row)
    print(f"{topology} sweep {k}x{nn}: temp {row['temp_size_in_bytes'] / (4 * k * k):.2f} K^2 "
          f"({row['compile_s']:.0f} s)", flush=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=FULL_LAYERS)
  ap.add_argument("--mesh", default="4x2", help="fsdp x tensor")
  ap.add_argument("--windows", type=int, default=8)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--no-aot", action="store_true", help="skip the compile-only accounting of the 1B model")
  ap.add_argument("--shape", default="", help="override block shapes, e.g. dim=512,ffn_dim=1408,n_heads=8,"
                  "n_kv_heads=2,vocab_size=4096 (a quick check of the script)")
  ap.add_argument("--tpu-aot", default="", metavar="TOPOLOGY",
                  help="instead of the run: compile GPTQ's K x K steps (factor, column-split sweep) for this TPU "
                  "topology (e.g. v5e:2x4; needs `make tpu-aot`) and write scale_gptq_tpu.{md,json}")
  args = ap.parse_args()
  if args.tpu_aot:
    return tpu_main(args.tpu_aot)
  for kv in filter(None, args.shape.split(",")):
    k, v = kv.split("=")
    SHAPE[k] = int(v)
  fsdp, tensor = (int(v) for v in args.mesh.split("x"))
  mesh = sharding.make_mesh(fsdp, tensor)
  cfg = config(args.layers)
  full = config(FULL_LAYERS, FULL_SHAPE)

  # Random weights, created directly on their shardings (the float model is never whole on one device).
  from jquant.models.llama import Model, Transformer
  init = lambda k: Transformer(cfg).init(k, jax.numpy.zeros((1, 2), jax.numpy.int32))["params"]
  shardings = sharding.param_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
  t0 = time.perf_counter()
  params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  params = dict(params)
  jax.block_until_ready(params)
  model = Model(cfg, params)
  print(f"init {time.perf_counter() - t0:.1f}s")
  float_dev = sharding.bytes_per_device(params)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (args.windows, args.seq), 0, cfg.vocab_size), np.int32)
  rules = [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel$", jquant.QuantSpec(bits=4, granularity="group",
                                                                              group_size=128))]
  marks = instrument()
  with LiveSampler() as live:
    start = time.perf_counter()
    qparams, report = gptq.quantize_model(model, params, calib, rules, batch_size=args.windows, progress=True,
                                          verbose=False, return_report=True)
    jax.block_until_ready(qparams)
    end = time.perf_counter()
    live.sample()
  q_dev = sharding.bytes_per_device(qparams)
  times = np.diff([start] + marks + [end]).tolist()
  spec_ok = all(
      part.sharding == want
      for (kp, q), f in zip(jax.tree_util.tree_leaves_with_path(qparams, is_leaf=lambda x: isinstance(x, jquant.QArray)),
                            jax.tree_util.tree_leaves(params))
      if isinstance(q, jquant.QArray)
      for part, want in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(sharding.qarray_shardings(q, f.sharding))))

  mx = lambda d: max(d.values())
  temp = max((v.get("temp_size_in_bytes", 0) for v in STEP_TEMPS.values()), default=0)
  per_block_float = (n_params(config(2)) - n_params(config(1))) * 4 / (fsdp * tensor)
  rows = {
      "config": {k: getattr(cfg, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                              "head_dim")},
      "mesh": {"fsdp": fsdp, "tensor": tensor}, "windows": args.windows, "seq": args.seq,
      "params": n_params(cfg), "params_full": n_params(full),
      "float_bytes_per_device": mx(float_dev), "quantized_bytes_per_device": mx(q_dev),
      "live_peak_bytes_per_device": mx(live.peak), "max_step_temp_bytes_per_device": temp,
      "estimated_peak_bytes_per_device": mx(live.peak) + temp, "largest_on_device0_at_peak": live.top,
      "float_block_bytes_per_device": per_block_float,
      "steps": STEP_TEMPS, "block_seconds": times, "total_seconds": end - start,
      "gptq_loss_over_rtn": report.total_loss / report.total_rtn_loss,
      "quantized_laid_out_like_float": bool(spec_ok),
      "solve_seconds_per_block": [sum(l.seconds for l in report.layers if l.path.startswith(f"layers_{i}/"))
                                  for i in range(cfg.n_layers)],
  }
  steady = times[1:] if len(times) > 1 else times
  per_block = float(np.mean(steady))
  rows["seconds_per_block_steady"] = per_block
  # The sweeps' work per block, sum_g K_g^2 N_g, against the 1B block's (1 when the 1B shapes ran).
  sweep = lambda c: sum(k * k * n for k, n in _groups(c).values())
  ratio = sweep(config(1, FULL_SHAPE)) / sweep(cfg)
  rows["sweep_work_ratio_full_over_ran"] = ratio
  os.makedirs(RESULTS, exist_ok=True)
  stem = "scale_gptq_check" if args.shape else "scale_gptq"  # a quick --shape check keeps the 1B results
  with open(os.path.join(RESULTS, stem + ".json"), "w") as fh:
    json.dump(rows, fh, indent=1, default=str)
  mb = lambda b: f"{b / 2**20:,.0f} MiB"
  lines = [
      f"# GPTQ W4 g128 on a sharded Llama ({fsdp}x{tensor} mesh of 8 simulated CPU devices)", "",
      f"Ran: a Llama with dim {cfg.dim}, {cfg.n_heads}/{cfg.n_kv_heads} heads, FFN {cfg.ffn_dim}, vocab "
      f"{cfg.vocab_size}, {args.layers} layers "
      f"({n_params(cfg) / 1e9:.2f}B parameters), {args.windows} windows x {args.seq} tokens, "
      f"act-order, true-sequential; {os.cpu_count()} CPU cores, float32.", "",
      "| quantity | per device |", "|---|---:|",
      f"| float parameters ({args.layers} layers) | {mb(mx(float_dev))} |",
      f"| float parameters of one block | {mb(per_block_float)} |",
      f"| quantized result ({args.layers} layers) | {mb(mx(q_dev))} |",
      f"| peak live arrays during GPTQ (sampled) | {mb(mx(live.peak))} |",
      f"| largest compiled step's temporaries | {mb(temp)} |",
      f"| estimated peak (live + temporaries) | {mb(rows['estimated_peak_bytes_per_device'])} |",
      "",
      "| compiled step | temp per device | arguments per device | outputs per device |", "|---|---:|---:|---:|"]
  for k, v in STEP_TEMPS.items():
    if "error" in v:
      lines.append(f"| {k} | {v['error']} | | |")
    else:
      lines.append(f"| {k} | {mb(v['temp_size_in_bytes'])} | {mb(v['argument_size_in_bytes'])} | "
                   f"{mb(v['output_size_in_bytes'])} |")
  lines += ["", "Largest arrays on device 0 at its peak: " + "; ".join(f"{d} ({mb(b)})" for b, d in live.top[:6]) + "."]
  lines += ["", "| block | seconds | of which solves |", "|---:|---:|---:|"]
  for i, (t, s) in enumerate(zip(times, rows["solve_seconds_per_block"])):
    lines.append(f"| {i}{' (compiles)' if i == 0 else ''} | {t:.1f} | {s:.1f} |")
  whole = cfg.n_layers == FULL_LAYERS and SHAPE == FULL_SHAPE
  if whole:
    timing = (f"The whole model ran: {cfg.n_layers} blocks in {(end - start) / 60:.1f} min; after block 0, "
              f"{min(steady):.0f}-{max(steady):.0f} s per block (mean {per_block:.0f} s, median "
              f"{float(np.median(steady)):.0f} s). ")
  else:
    timing = (f"Steady time per block {per_block:.1f} s (a 1B block does {ratio:.0f}x this model's sweep work "
              "sum_g K_g^2 N_g). ")
  lines += ["", timing + f"GPTQ loss / RTN loss {rows['gptq_loss_over_rtn']:.3f}. "
            f"Quantized leaves laid out like their float weights: {spec_ok}."]
  if not args.no_aot:
    aot = aot_full(mesh)
    rows["aot_full"] = aot
    lines += ["", f"## The {aot['params'] / 1e9:.2f}B model, compiled for its real shapes (not run)", "",
              "| per device | bytes |", "|---|---:|",
              f"| float32 parameter shards ({FULL_LAYERS} layers) | {mb(aot['float_bytes_per_device'])} |",
              f"| Hessian sums of one block (4 groups, float32, replicated) | {mb(aot['hessians_bytes_per_device'])} |",
              f"| estimated peak (shards + Hessians + largest sweep's arguments, temporaries, outputs) | "
              f"{mb(aot['estimated_peak_bytes_per_device'])} |", "",
              "| GPTQ sweep (K x N) | temp per device | arguments per device | outputs per device |",
              "|---|---:|---:|---:|"]
    for k, v in aot["solves"].items():
      lines.append(f"| {k} ({v['k']} x {v['n']}) | {mb(v['temp'])} | {mb(v['args'])} | {mb(v['outputs'])} |")
    with open(os.path.join(RESULTS, stem + ".json"), "w") as fh:
      json.dump(rows, fh, indent=1, default=str)
  open(os.path.join(RESULTS, stem + ".md"), "w").write("\n".join(lines) + "\n")
  print("\n".join(lines))



def tpu_main(topology: str):
  if not os.path.isfile(LIBTPU):
    raise SystemExit("libtpu is not installed: run `make tpu-aot` first.")
  r = tpu_aot(topology)
  k2 = lambda row, f: row[f] / (4 * row["k"] ** 2)
  lines = [f"# GPTQ's K x K steps compiled for TPU {topology} ({r['chips']} chips; libtpu, no TPU)", "",
           "Per chip, from `compile().memory_analysis()`, in units of one K x K float32 matrix (4 K^2 bytes).", "",
           "| step | K x N | arguments | temporaries | outputs | compile |", "|---|---|---:|---:|---:|---:|"]
  for row in r["factor"]:
    lines.append(f"| factor_hessian | {row['k']} x {row['k']} | {k2(row, 'argument_size_in_bytes'):.2f} | "
                 f"{k2(row, 'temp_size_in_bytes'):.2f} | {k2(row, 'output_size_in_bytes'):.2f} | "
                 f"{row['compile_s']:.0f} s |")
  for row in r["sweep"]:
    lines.append(f"| sweep (columns over {r['chips']} chips) | {row['k']} x {row['n']} | "
                 f"{k2(row, 'argument_size_in_bytes'):.2f} | {k2(row, 'temp_size_in_bytes'):.2f} | "
                 f"{k2(row, 'output_size_in_bytes'):.2f} | {row['compile_s']:.0f} s |")
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "scale_gptq_tpu.json"), "w") as fh:
    json.dump(r, fh, indent=1)
  open(os.path.join(RESULTS, "scale_gptq_tpu.md"), "w").write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
