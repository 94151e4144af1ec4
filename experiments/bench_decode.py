"""Decode speed of SmolLM2-135M with a KV cache: float32, W8, W4 packed, W8A8 weights x float / int8 caches.

For each weight format, KV cache and batch size, runs `jquant.generate.generate`
once to compile, then once timed (greedy, a prompt of ``--prompt`` Wikipedia
tokens per row, ``--new`` new tokens). Reports decode tokens/s (all rows,
steps 2..new-1; the first step compiles), prefill tokens/s, the weights' and
the cache's bytes, and memory: the process's peak RSS so far on the CPU
(monotone: a row's figure includes everything before it), the device's peak
bytes in use on a GPU/TPU. On a GPU/TPU no new row starts after ``--budget``
seconds (default 210, counted from the start, so one call ends within 5 minutes; skipped rows are
listed). Prints the backend and whether `jquant.ops.qdot`
may emit Pallas kernels (`jquant.ops.kernels_enabled()`) and whether the W4
weights have a layout they read. Writes
``experiments/results/bench_decode_b<batches>[_<backend>].md``.

``--ppl``: perplexity instead, on ``--windows`` Wikipedia windows of 512,
with the cache's quantization applied to keys and values
(`jquant.generate.with_kv_fake_quant`): float, int8, int4 per-token and int4
KIVI caches, and W4 g128 weights with float and int8 caches. Writes
``experiments/results/bench_decode_ppl<windows>.md``.

Usage:
    python experiments/bench_decode.py [--prompt 64] [--new 32] [--batches 1,8]
    python experiments/bench_decode.py --ppl [--windows 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _variants(m, jquant, names):
  from jquant.calibrate import W8A8Spec

  kernels = r"layers_\d+/(attn|mlp)/\w+/kernel$"

  def weight_only(**kw):
    return jquant.quantize_params(m.params, [jquant.Rule(kernels, jquant.QuantSpec(**kw))])

  builders = {
      "float32": lambda: m.params,
      "W8 per-channel": lambda: weight_only(bits=8, granularity="channel"),
      "W4 g128 (packed)": lambda: weight_only(bits=4, granularity="group", group_size=128, pad_groups=True),
      "W8A8 dynamic": lambda: jquant.convert(m.params, None, [jquant.Rule(kernels, W8A8Spec(activations="dynamic"))]),
  }
  return {n: builders[n]() for n in names}


def _peak_mb(jax):
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak"
  scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "RSS peak"


def speed(args):
  import jax
  import numpy as np
  import jquant
  from jquant import data, generate, kvcache, models
  from pallas_kernels import w4a16

  backend = jax.default_backend()
  start = time.perf_counter()
  m = models.from_gguf()
  params = _variants(m, jquant, args.weights.split(","))
  caches = {"float": None, "int8": kvcache.KVCacheSpec(bits=8),
            "int4 KIVI": kvcache.KVCacheSpec(bits=4, key_axis="channel", group_size=32)}
  caches = {k: caches[k] for k in args.caches.split(",")}
  w4 = params.get("W4 g128 (packed)")
  w4_kernel = None if w4 is None else w4a16.supports(
      jquant.intercept.as_matrix(w4["layers_0"]["mlp"]["up"]["kernel"], (0,))[0])
  head = (f"backend {backend} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, jax {jax.__version__}; "
          f"kernels_enabled()={jquant.ops.kernels_enabled()}; W4 layout read by the Pallas W4A16 kernel: "
          f"{w4_kernel} (it runs on {'this backend' if backend in ('gpu', 'tpu') else 'GPU/TPU only'})")
  print(head, flush=True)
  batches = [int(b) for b in args.batches.split(",")]
  stream = data.eval_windows(m.tokenizer, 4, length=512).reshape(-1)
  budget = args.budget if args.budget is not None else (None if backend == "cpu" else 210.0)
  skipped, what = [], _peak_mb(jax)[1]
  rows = []
  for wname, p in params.items():
    wmb = jquant.footprint(p).total_bytes / 2**20
    for cname, spec in caches.items():
      for b in batches:
        prompts = np.asarray(stream[:b * args.prompt]).reshape(b, args.prompt)
        if budget is not None and time.perf_counter() - start > budget:
          skipped.append(f"{wname} / kv {cname} / batch {b}")
          continue
        t0 = time.perf_counter()
        generate.generate(m, p, prompts, args.new, kv_cache=spec)  # compile prefill and decode step
        t_compile = time.perf_counter() - t0
        r = generate.generate(m, p, prompts, args.new, kv_cache=spec)
        dec = b * r.decode_steps / r.decode_seconds
        pre = b * args.prompt / r.prefill_seconds
        mem, what = _peak_mb(jax)
        rows.append((wname, cname, b, dec, 1e3 * r.decode_seconds / r.decode_steps, pre, wmb,
                     r.cache_bytes / 2**20, mem, t_compile))
        _speed_table(args, backend, head, what, rows, [])
        print(f"{wname:<18} kv {cname:<9} batch {b}: decode {dec:8.1f} tok/s ({rows[-1][4]:.1f} ms/step), "
              f"prefill {pre:8.1f} tok/s, weights {wmb:.0f} MB, cache {rows[-1][7]:.2f} MB, {what} {mem:.0f} MB, "
              f"first call {t_compile:.1f} s", flush=True)
  _speed_table(args, backend, head, what, rows, skipped, show=True)


def _speed_table(args, backend, head, what, rows, skipped, show=False):
  """Writes (after every row, so a cut-short run keeps its rows) and optionally prints the table."""
  lines = [f"# SmolLM2-135M decode with a KV cache (prompt {args.prompt}, {args.new} new tokens, greedy)", "",
           head + ".", "",
           f"| weights | KV cache | batch | decode tok/s | ms / step | prefill tok/s | weights MB | cache MB | "
           f"{what} MB | first call s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  lines += [f"| {w} | {c} | {b} | {d:.1f} | {ms:.1f} | {pr:.0f} | {wmb:.0f} | {cmb:.2f} | {mem:.0f} | {tc:.1f} |"
            for w, c, b, d, ms, pr, wmb, cmb, mem, tc in rows]
  if skipped:
    lines += ["", "Not run (past the time budget, --budget): " + "; ".join(skipped) + "."]
  name = args.out or (f"bench_decode_b{args.batches.replace(',', '_')}"
                      + ("" if backend == "cpu" else f"_{backend}") + ".md")
  _write(name, lines, show)


def ppl(args):
  import jquant
  from jquant import data, eval as jeval, generate, kvcache, models

  m = models.from_gguf()
  w = data.eval_windows(m.tokenizer, args.windows, length=512)
  K = kvcache.KVCacheSpec
  w4 = _variants(m, jquant, ["W4 g128 (packed)"])["W4 g128 (packed)"]
  runs = [("float32", "float", m.params, None),
          ("float32", "int8 per-token", m.params, K(bits=8)),
          ("float32", "int4 per-token g32", m.params, K(bits=4, group_size=32)),
          ("float32", "int4 KIVI (keys per-channel, block 32; values g32)", m.params,
           K(bits=4, key_axis="channel", group_size=32)),
          ("W4 g128 (packed)", "float", w4, None),
          ("W4 g128 (packed)", "int8 per-token", w4, K(bits=8))]
  if args.only:
    runs = [r for i, r in enumerate(runs) if str(i) in args.only.split(",")]
  rows = []
  for wname, cname, p, spec in runs:
    t0 = time.perf_counter()
    value, n = jeval.perplexity(generate.with_kv_fake_quant(m, spec), p, w, batch_size=4, progress=False)
    rows.append((wname, cname, value, n))
    print(f"{wname:<18} kv {cname:<50} ppl {value:8.3f} over {n} tokens ({time.perf_counter() - t0:.0f} s)",
          flush=True)
  lines = [f"# SmolLM2-135M perplexity with quantized KV caches ({args.windows} Wikipedia windows of 512)", "",
           "Keys (after RoPE) and values fake-quantized as the cache stores them; KIVI: a query sees a key block "
           "quantized once the block is complete.", "",
           "| weights | KV cache | ppl | tokens |", "|---|---|---:|---:|"]
  lines += [f"| {a} | {c} | {v:.3f} | {n} |" for a, c, v, n in rows]
  _write(args.out or f"bench_decode_ppl{args.windows}.md", lines)


def _write(name, lines, show=True):
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", name), "w") as f:
    f.write("\n".join(lines) + "\n")
  if show:
    print("\n".join(lines))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
  ap.add_argument("--new", type=int, default=32, help="new tokens per row (>= 3)")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--weights", default="float32,W4 g128 (packed),W8A8 dynamic,W8 per-channel",
                  help="comma-separated; the order rows run in (a GPU budget may cut the last)")
  ap.add_argument("--caches", default="float,int8", help="comma-separated from float, int8, int4 KIVI")
  ap.add_argument("--ppl", action="store_true", help="perplexity with quantized caches instead of speed")
  ap.add_argument("--windows", type=int, default=16)
  ap.add_argument("--only", default="", help="--ppl: comma-separated run indices (0-5)")
  ap.add_argument("--out", default="", help="results file name under experiments/results/")
  ap.add_argument("--budget", type=float, default=None,
                  help="seconds from the start after which no new row starts (default: none on CPU, 210 on "
                       "GPU/TPU, so one call ends within 5 minutes)")
  args = ap.parse_args(argv)
  if args.new < 3:
    ap.error(f"--new={args.new}; allowed: >= 3 (the first two steps are not timed)")
  ppl(args) if args.ppl else speed(args)


if __name__ == "__main__":
  main()
