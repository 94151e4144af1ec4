"""Gemma 3 270M in jquant's own decoder, read from its llama.cpp GGUF: checked against Google DeepMind's model.

Not part of `make test`. `jquant.models.from_gguf(jquant.models.gemma3_270m_path())` reads the ``gemma3``
architecture (q/k norms, post-norms, GeGLU, embeddings scaled by sqrt(d), five sliding-window layers of 512
positions with RoPE base 1e4 for every global layer with base 1e6) and its SentencePiece tokenizer;
`jquant.gguf.load` reads the same file with its Q4_K/Q5_0/Q6_K/Q8_0 tensors packed. This script measures:

1. the tokenizer against the ``sentencepiece`` library built from the same pieces (Wikipedia and news documents);
2. jquant's float logits against the ``gemma`` package's ``Gemma3_270M`` on the same weights
   (`experiments/gemma3_gguf.py`'s mapping) on one 640-token window, past the 512-position sliding window;
3. perplexity of the float model and of the packed model on the Wikipedia windows of
   `experiments/gemma3_third_party.py` (``<bos>`` + 511 tokens each);
4. greedy generation with the KV cache (`jquant.generate`) from the float and the packed model.

Usage:
    make experiments-venv
    .venv/bin/python experiments/gemma3_jquant.py [--eval-windows 8] [--long 640] [--skip-gemma]
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import json
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
RESULTS = os.path.join(HERE, "results")
PROMPTS = ("The capital of France is", "The largest planet in the solar system is",
           "import numpy as np\nx = np.")


def _with_bos(windows, bos):
  import numpy as np
  return np.concatenate([np.full((len(windows), 1), bos, np.int32), windows], axis=1)


def tokenizer_check(tok, reader, n_docs):
  import gemma3_gguf as G
  from jquant import data
  docs = list(data.documents("wikipedia")[:n_docs]) + list(data.documents("lee")[:n_docs])
  docs.append("Tabs\tand  double  spaces,\n\nnewlines, digits 12345, ünïcode 日本語 🙂 <b>tags</b>.")
  round_trip = sum(tok.decode(tok.encode(d).ids) == d for d in docs)  # encode adds <bos>; decode drops it
  sp = G.sentencepiece_processor(reader)
  same = None if sp is None else sum(tok.encode(d, add_special_tokens=False).ids == sp.encode(d) for d in docs)
  n_tok = sum(len(tok.encode(d).ids) for d in docs)
  return {"documents": len(docs), "round_trip": round_trip, "equal_to_sentencepiece": same, "tokens": n_tok}


def gemma_logits(path, tokens):
  """The gemma package's Gemma3_270M logits (float32) on the same weights."""
  import gguf
  import jax
  import jax.numpy as jnp
  import numpy as np
  import gemma3_gguf as G
  from gemma import gm
  model = gm.nn.Gemma3_270M()
  reader = gguf.GGUFReader(path)
  G.check_config(reader, model.config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  params = jax.tree_util.tree_map(jnp.asarray, G.gemma_params(reader, G.flat_shapes(shapes), progress=False))
  out = jax.jit(lambda p, t: model.apply({"params": p}, t).logits)(params, jnp.asarray(tokens))
  return np.asarray(out, np.float32)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--eval-windows", type=int, default=8)
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--long", type=int, default=640, help="tokens of the window compared with the gemma package")
  ap.add_argument("--tokenizer-docs", type=int, default=20)
  ap.add_argument("--new-tokens", type=int, default=16)
  ap.add_argument("--skip-gemma", action="store_true")
  args = ap.parse_args(argv)

  import gguf
  import jax
  import jax.numpy as jnp
  import numpy as np
  import jquant
  from jquant import data, eval as jeval, generate

  t0 = time.perf_counter()
  path = jquant.models.gemma3_270m_path()
  timings = {}
  t = time.perf_counter()
  m = jquant.models.from_gguf(path)
  timings["load float s"] = time.perf_counter() - t
  t = time.perf_counter()
  packed = jquant.gguf.load(path)
  timings["load packed s"] = time.perf_counter() - t
  fp = {"float": jquant.footprint(m.params).total_bytes / 1e6,
        "packed": jquant.footprint(packed.params).total_bytes / 1e6, "file": os.path.getsize(path) / 1e6}
  tok, bos = m.tokenizer, m.tokenizer.token_to_id("<bos>")
  print(f"loaded {os.path.basename(path)}: {m.config}\n  float {fp['float']:.1f} MB in {timings['load float s']:.1f}s;"
        f" packed {fp['packed']:.1f} MB (file {fp['file']:.1f} MB) in {timings['load packed s']:.1f}s", flush=True)

  tk = tokenizer_check(tok, gguf.GGUFReader(path), args.tokenizer_docs)
  print("tokenizer:", tk, flush=True)

  # 2. Logits against the gemma package, on a window longer than the sliding window.
  long = _with_bos(data.eval_windows(tok, 1, length=args.long - 1), bos)
  t = time.perf_counter()
  ours = np.asarray(jax.jit(m.apply)(m.params, jnp.asarray(long)), np.float32)[0]
  timings["jquant forward long s"] = time.perf_counter() - t
  vs_gemma = None
  if not args.skip_gemma:
    theirs = gemma_logits(path, long)[0]
    w = m.config.sliding_window
    d = np.abs(ours - theirs).max(-1)  # per position

    def logprobs(x):  # row-wise log-softmax, float64, a row at a time (the logits are 262144 wide)
      x = x.astype(np.float64)
      return x - x.max() - np.log(np.sum(np.exp(x - x.max())))

    vs_gemma = {"tokens": int(long.shape[1]), "max_abs_logit_diff": float(d.max()),
                "max_abs_logit": float(np.abs(theirs).max()),
                f"max_abs_diff_first_{w}": float(d[:w].max()), f"max_abs_diff_after_{w}": float(d[w:].max()),
                "top1_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
                "max_abs_logprob_diff": max(float(np.abs(logprobs(a) - logprobs(b)).max())
                                            for a, b in zip(ours, theirs))}
    del ours
    # Without the sliding window jquant must disagree after the window (the check can fail).
    import dataclasses
    no_win = jquant.models.Model(dataclasses.replace(m.config, sliding_window=10**6), m.params, tok)  # wider than any window
    nw = np.asarray(jax.jit(no_win.apply)(m.params, jnp.asarray(long)), np.float32)[0]
    vs_gemma[f"max_abs_diff_after_{w}_without_window"] = float(np.abs(nw[w:] - theirs[w:]).max())
    del nw, theirs
    print("vs gemma package:", vs_gemma, flush=True)

  # 3. Perplexity, float and packed, same windows as gemma3_third_party.py.
  ev = _with_bos(data.eval_windows(tok, args.eval_windows, length=args.length - 1), bos)
  ppl = {}
  for name, model in (("float", m), ("packed", packed)):
    t = time.perf_counter()
    ppl[name] = jeval.perplexity(model, model.params, ev, batch_size=2, progress=False)[0]
    timings[f"ppl {name} s"] = time.perf_counter() - t
    print(f"ppl {name}: {ppl[name]:.4f} ({timings[f'ppl {name} s']:.0f}s)", flush=True)

  # 4. Greedy generation with the KV cache.
  gens = {}
  for name, model in (("float", m), ("packed", packed)):
    prompts = [tok.encode(p).ids for p in PROMPTS]  # the file asks for <bos>: encode prepends it
    t = time.perf_counter()
    out = generate.generate(model, model.params, prompts, args.new_tokens)
    timings[f"generate {name} s"] = time.perf_counter() - t
    gens[name] = [tok.decode([int(i) for i in row]) for row in np.asarray(out.tokens)]
    for p, g in zip(PROMPTS, gens[name]):
      print(f"  {name}: {p!r} -> {g!r}", flush=True)

  res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__,
         "config": repr(m.config), "footprint_MB": fp, "tokenizer": tk, "vs_gemma": vs_gemma, "ppl": ppl,
         "eval_windows": args.eval_windows, "length": args.length, "generations": gens, "timings": timings,
         "total_s": time.perf_counter() - t0}
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "gemma3_jquant.json"), "w") as f:
    json.dump(res, f, indent=1)
  lines = [
      "# Gemma 3 270M in jquant's own decoder (from its llama.cpp GGUF)", "",
      f"`python experiments/gemma3_jquant.py` on {res['machine']} (shared with other jobs), jax {jax.__version__}; "
      f"total {res['total_s'] / 60:.1f} min.", "",
      f"Config read from the file: `{m.config}`.", "",
      "| | value |", "|---|---|",
      f"| float32 model / packed (Q4_K_M as in the file) / file | {fp['float']:.1f} / {fp['packed']:.1f} / "
      f"{fp['file']:.1f} MB |",
      f"| load: float / packed | {timings['load float s']:.1f} / {timings['load packed s']:.1f} s |",
      f"| tokenizer: documents round-tripped; ids equal to SentencePiece's | {tk['round_trip']}/{tk['documents']}; "
      f"{tk['equal_to_sentencepiece']}/{tk['documents']} ({tk['tokens']} tokens) |"]
  if vs_gemma:
    w = m.config.sliding_window
    lines += [
        f"| logits vs the `gemma` package, {vs_gemma['tokens']} tokens: max abs diff (max abs logit) | "
        f"{vs_gemma['max_abs_logit_diff']:.2e} ({vs_gemma['max_abs_logit']:.1f}) |",
        f"| same, positions < {w} / >= {w}; without jquant's sliding window, >= {w} | "
        f"{vs_gemma[f'max_abs_diff_first_{w}']:.2e} / {vs_gemma[f'max_abs_diff_after_{w}']:.2e}; "
        f"{vs_gemma[f'max_abs_diff_after_{w}_without_window']:.2e} |",
        f"| top-1 agreement; max abs log-prob diff | {vs_gemma['top1_agreement']:.4f}; "
        f"{vs_gemma['max_abs_logprob_diff']:.2e} |"]
  lines += [
      f"| Wikipedia ppl ({args.eval_windows} windows, `<bos>` + {args.length - 1}): float / packed | "
      f"{ppl['float']:.4f} / {ppl['packed']:.4f} |", "",
      "Greedy continuations (`jquant.generate`, KV cache):", ""]
  for name in gens:
    for p, g in zip(PROMPTS, gens[name]):
      lines.append(f"- {name}: {p!r} -> {g!r}")
  with open(os.path.join(RESULTS, "gemma3_jquant.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
