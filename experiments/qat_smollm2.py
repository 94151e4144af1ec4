"""QAT of SmolLM2-135M at W3 g128 and W8A8, starting from RTN; Wikipedia perplexity before / after.

Trains on the news calibration corpus (Lee, `jquant.data`; never on the
evaluation windows), with a fixed number of steps of ``batch`` windows of
``seq_len + 1`` tokens, then converts to packed integer weights
(`jquant.qat.convert`) and measures Wikipedia perplexity against the float
model, RTN and (if `jquant.gptq` provides a model-level quantizer) GPTQ at the
same bits. Only the quantized Dense kernels and their scales train;
embeddings and norms stay frozen.

Writes ``experiments/results/qat_smollm2.md`` (table), ``qat_smollm2.png``
(training loss curves) and ``qat_smollm2_loss_*.tsv`` (loss logs).

Usage:
    python experiments/qat_smollm2.py [--steps-w3 280] [--steps-w8a8 60] [--seq-len 128] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DENSE = r"layers_\d+/(attn|mlp)/\w+/kernel$"
SECTIONS = ("float", "rtn3", "gptq3", "qat3", "rtn8", "qat8")


def _log(msg):
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _gptq_params(model, params, calib, rules):
  """GPTQ at the same spec through the library's model-level entry point, or None if there is none."""
  try:
    import jquant.gptq as gptq
  except ImportError:
    return None
  fn = getattr(gptq, "quantize_model", None)
  if fn is None:
    return None
  out = fn(model, params, calib, rules, progress=False)
  return out[0] if isinstance(out, tuple) else out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps-w3", type=int, default=280)
  ap.add_argument("--steps-w8a8", type=int, default=60)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--lr-weights", type=float, default=1e-4)
  ap.add_argument("--lr-scales", type=float, default=1e-3)
  ap.add_argument("--lr-weights-w8a8", type=float, default=1e-5)
  ap.add_argument("--lr-scales-w8a8", type=float, default=1e-4)
  ap.add_argument("--symmetric", action="store_true", help="symmetric W3 (default asymmetric)")
  ap.add_argument("--eval-windows", type=int, default=16)
  ap.add_argument("--eval-length", type=int, default=512)
  ap.add_argument("--heldout-windows", type=int, default=16, help="news windows kept out of training")
  ap.add_argument("--calib-gptq", type=int, default=32, help="calibration windows (512 tokens) for GPTQ")
  ap.add_argument("--no-wiki", action="store_true", help="skip Wikipedia perplexity (tuning on held-out news)")
  ap.add_argument("--only", default=",".join(SECTIONS),
                  help="comma-separated sections to run: " + ",".join(SECTIONS) + " (finished ones are skipped)")
  ap.add_argument("--redo", action="store_true", help="rerun sections whose rows are already stored")
  ap.add_argument("--tag", default="")
  ap.add_argument("--checkpoint-dir", default="/tmp/qat_smollm2_ckpt",
                  help="QAT checkpoints every --checkpoint-every steps; an interrupted run resumes from them")
  ap.add_argument("--checkpoint-every", type=int, default=50)
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jquant
  import jquant.data
  import jquant.eval
  import jquant.models
  import jquant.qat as qat

  t_start = time.perf_counter()
  model = jquant.models.from_gguf()
  tok = model.tokenizer
  n_news = jquant.data.available_windows(tok, "lee", args.seq_len + 1)
  news = np.asarray(jquant.data.calibration_windows(tok, n_news, length=args.seq_len + 1))
  train_w, held = news[:-args.heldout_windows], jnp.asarray(news[-args.heldout_windows:])
  evalw = None if args.no_wiki else jquant.data.eval_windows(tok, args.eval_windows, length=args.eval_length)
  _log(f"model loaded; {len(train_w)} news training windows of {args.seq_len + 1} tokens, {len(held)} held out; "
       f"backend {jax.default_backend()}, {os.cpu_count()} CPUs")

  def loss_fn(p, tokens):
    logits = model.apply(p, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  held_loss_fn = jax.jit(jquant.quantized(loss_fn))  # float, fake-quantized and packed trees alike

  def held_loss(p):
    return float(held_loss_fn(p, held))

  def wiki_ppl(p):
    if evalw is None:
      return float("nan")
    return jquant.eval.perplexity(model, p, evalw, batch_size=4, progress=False)[0]

  def batches(seed):
    rng = np.random.default_rng(seed)
    while True:
      order = rng.permutation(len(train_w))
      for i in range(0, len(order) - args.batch + 1, args.batch):
        yield jnp.asarray(train_w[order[i:i + args.batch]])

  # Rows persist in a JSON file, so sections can run in separate processes and a crash loses one section.
  store_path = os.path.join(RESULTS, f"qat_smollm2{args.tag}_rows.json")
  store = {"rows": {}, "conv_diffs": {}}
  if os.path.exists(store_path):
    with open(store_path) as f:
      store = json.load(f)
  wanted = [x for x in args.only.split(",") if x]
  bad = [x for x in wanted if x not in SECTIONS]
  if bad:
    raise SystemExit(f"--only: unknown sections {bad}; allowed: {SECTIONS}")

  def save_store():
    os.makedirs(RESULTS, exist_ok=True)
    with open(store_path + ".tmp", "w") as f:
      json.dump(store, f, indent=1)
    os.replace(store_path + ".tmp", store_path)

  def todo(section, method):
    return section in wanted and (args.redo or method not in store["rows"])

  def add(section, name, bits_label, p, seconds=0.0, steps=0):
    t = time.perf_counter()
    r = {"section": section, "method": name, "bits": bits_label, "held": held_loss(p), "ppl": wiki_ppl(p),
         "steps": steps, "train_s": seconds,
         "bpw": jquant.footprint(p).quantized_bits_per_weight if name != "float32" else 32.0}
    store["rows"][name] = r
    save_store()
    _log(f"{name:<28} held-out news loss {r['held']:.4f}  wiki ppl {r['ppl']:.3f}  "
         f"({time.perf_counter() - t:.0f}s eval)")

  def run_qat(name, rules, act_bits, steps, lr_w, lr_s, seed):
    state = qat.init(model.params, rules, act_bits=act_bits)
    sched = lambda lr: optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 1), lr * 0.1)
    opt = qat.optimizer(weights=optax.adam(sched(lr_w)), scales=optax.adam(sched(lr_s)), other=optax.set_to_zero())
    step = qat.make_train_step(loss_fn, opt)
    ts = qat.init_train_state(model.params, state, opt)
    del state
    log_path = os.path.join(RESULTS, f"qat_smollm2_loss_{name}{args.tag}.tsv")
    ckdir = os.path.join(args.checkpoint_dir, name)
    seconds_path = os.path.join(ckdir, "seconds.json")
    done, seconds = 0, 0.0
    ckpts = sorted((int(d.split("_")[1]) for d in os.listdir(ckdir) if d.startswith("step_")),
                   reverse=True) if os.path.isdir(ckdir) and not args.redo else []
    if ckpts and ckpts[0] <= steps:
      done = ckpts[0]
      ts = qat.load_train_state(os.path.join(ckdir, f"step_{done}"), ts)
      with open(seconds_path) as f:
        seconds = json.load(f)[str(done)]
      _log(f"QAT {name}: resuming from step {done} ({seconds:.0f}s of training so far)")
    # Keep the loss log consistent with the restored state.
    old = []
    if done and os.path.exists(log_path):
      with open(log_path) as f:
        old = [l for l in f if int(l.split()[0]) <= done]
    with open(log_path, "w") as f:
      f.writelines(old)
    it = batches(seed)
    for _ in range(done):
      next(it)  # the same data order as an uninterrupted run
    while done < steps:
      n = min(args.checkpoint_every, steps - done)
      ts, log = qat.train(step, ts, it, num_steps=n, log_every=5, log_path=log_path, checkpoint_dir=ckdir,
                          desc=f"QAT {name} steps {done + 1}-{done + n}")
      done += n
      seconds += log.seconds
      prev = {}
      if os.path.exists(seconds_path):
        with open(seconds_path) as f:
          prev = json.load(f)
      prev[str(done)] = seconds
      with open(seconds_path, "w") as f:
        json.dump(prev, f)
      for d in os.listdir(ckdir):  # keep only the newest checkpoint (each holds weights + Adam state)
        if d.startswith("step_") and d != f"step_{done}":
          shutil.rmtree(os.path.join(ckdir, d), ignore_errors=True)
      _log(f"QAT {name}: step {done}/{steps}, {seconds:.0f}s; last losses {np.round(log.losses[-3:], 3).tolist()}")
    params, qstate = ts.params, ts.qat
    del ts  # the optimizer state is no longer needed
    packed = qat.convert(params, qstate)
    # The converted (packed) model against the fake-quantized training model, on held-out news.
    fq = jax.jit(qat.fake_quantize)(params, qstate)
    lf = jax.jit(lambda p: jquant.quantized(model.apply)(p, held[:2, :-1]))
    diff = float(jnp.abs(lf(fq) - lf(packed)).max())
    del fq, params, qstate
    _log(f"QAT {name}: max |logits(converted) - logits(fake-quant)| = {diff:.2e}")
    return packed, seconds, diff

  if todo("float", "float32"):
    add("float", "float32", "-", model.params)

  spec = jquant.QuantSpec(bits=3, symmetric=args.symmetric, granularity="group", group_size=128, pad_groups=True)
  rules = [jquant.Rule(DENSE, spec)]
  label = f"W3 g128 {'sym' if args.symmetric else 'asym'}"
  if todo("rtn3", "RTN W3 g128"):
    t = time.perf_counter()
    rtn = jax.jit(lambda p: jquant.quantize_params(p, rules))(model.params)
    add("rtn3", "RTN W3 g128", label, rtn, time.perf_counter() - t)
    del rtn
  if todo("gptq3", "GPTQ W3 g128") and evalw is not None:
    calib = jquant.data.calibration_windows(tok, args.calib_gptq, length=512)
    t = time.perf_counter()
    g = _gptq_params(model, model.params, calib, rules)
    if g is not None:
      add("gptq3", "GPTQ W3 g128", label, g, time.perf_counter() - t)
      del g
    else:
      _log("GPTQ: no model-level entry point in jquant.gptq; row skipped")
  if todo("qat3", "QAT W3 g128 (from RTN)"):
    packed, secs, store["conv_diffs"]["W3"] = run_qat("w3", rules, None, args.steps_w3, args.lr_weights,
                                                      args.lr_scales, 0)
    add("qat3", "QAT W3 g128 (from RTN)", label, packed, secs, args.steps_w3)
    del packed

  spec8 = jquant.QuantSpec(bits=8, granularity="channel")
  rules8 = [jquant.Rule(DENSE, spec8)]
  if todo("rtn8", "RTN W8A8 (per-token dyn.)"):
    t = time.perf_counter()
    # RTN W8A8: int8 per-channel weights, dynamic per-token int8 activations (qat.convert at step 0 is RTN).
    rtn8 = qat.convert(model.params, qat.init(model.params, rules8, act_bits=8))
    add("rtn8", "RTN W8A8 (per-token dyn.)", "W8A8", rtn8, time.perf_counter() - t)
    del rtn8
  if todo("qat8", "QAT W8A8 (from RTN)"):
    packed, secs, store["conv_diffs"]["W8A8"] = run_qat("w8a8", rules8, 8, args.steps_w8a8,
                                                        args.lr_weights_w8a8, args.lr_scales_w8a8, 1)
    add("qat8", "QAT W8A8 (from RTN)", "W8A8", packed, secs, args.steps_w8a8)
    del packed

  order = {"float": 0, "rtn3": 1, "gptq3": 2, "qat3": 3, "rtn8": 4, "qat8": 5}
  rows = sorted(store["rows"].values(), key=lambda r: order[r["section"]])
  curves = {}
  for name in ("w3", "w8a8"):
    path = os.path.join(RESULTS, f"qat_smollm2_loss_{name}{args.tag}.tsv")
    if os.path.exists(path):
      data = np.loadtxt(path, ndmin=2)
      if len(data):
        curves[name] = (data[:, 0].astype(int).tolist(), data[:, 1].tolist())
  _write(args, rows, curves, store["conv_diffs"], time.perf_counter() - t_start)
  _log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min")


def _write(args, rows, curves, conv_diffs, total):
  os.makedirs(RESULTS, exist_ok=True)
  tag = args.tag
  fp = next((r["ppl"] for r in rows if r["method"] == "float32"), float("nan"))
  lines = [
      "# QAT of SmolLM2-135M (W3 g128 and W8A8, from RTN)",
      "",
      f"Machine: CPU container (`{platform.machine()}`, {os.cpu_count()} CPUs). Training data: Lee news corpus (`jquant.data` calibration text), windows of "
      f"{args.seq_len + 1} tokens, batch {args.batch} ({args.batch * args.seq_len} predicted tokens per step), "
      f"{args.heldout_windows} news windows held out. Adam with warm-up + cosine decay; "
      f"W3: lr weights {args.lr_weights:g}, scales {args.lr_scales:g}; W8A8: lr weights {args.lr_weights_w8a8:g}, "
      f"scales {args.lr_scales_w8a8:g}. Only the Dense kernels (all 7 per block) and their LSQ scales train; "
      "embeddings and norms are frozen and stay float. The learning rates come from a 15-step sweep scored "
      "on the held-out news loss only (W3, constant lr; RTN 5.195): weights 1e-4 / scales 1e-3 -> 4.222, "
      "1e-4 / 1e-4 -> 4.250, scales only (0 / 1e-3) -> 4.500, 2e-5 / 2e-4 -> 4.542.",
      f"Evaluation: Wikipedia perplexity (`jquant.eval.perplexity`, {args.eval_windows} windows of "
      f"{args.eval_length} tokens, never used in training), plus the loss on the held-out news windows.",
      "",
      "| method | bits | bits/w (quantized leaves) | QAT steps | quant / train s | held-out news loss | wiki ppl | vs float |",
      "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    vs = "-" if r["method"] == "float32" or math.isnan(r["ppl"]) else f"{r['ppl'] / fp - 1:+.1%}"
    lines.append(f"| {r['method']} | {r['bits']} | {r['bpw']:.3f} | {r['steps']} | {r['train_s']:.0f} | "
                 f"{r['held']:.4f} | {r['ppl']:.3f} | {vs} |")
  trained = sum(r["train_s"] for r in rows if r["steps"])
  lines += ["", f"QAT training time in total: {trained / 60:.1f} min. QAT also fine-tunes the weights on news text, "
            "so a QAT row can land below the float model (the W8A8 row does); the float model fine-tuned the same "
            "way is not measured here."]
  lines += ["", "Converted (packed QArray / int8 W8A8Weight) model vs the fake-quantized training model, max "
            "|logit difference| on two held-out windows: " +
            ", ".join(f"{k} {v:.2e}" for k, v in conv_diffs.items()) + ".",
            "", f"Wall time of the last invocation {total / 60:.1f} min. Loss curves: `qat_smollm2{tag}.png`; per-step logs: "
            f"`qat_smollm2_loss_*{tag}.tsv`.", ""]
  path = os.path.join(RESULTS, f"qat_smollm2{tag}.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (steps, losses) in curves.items():
      k = 5
      sm = np.convolve(losses, np.ones(k) / k, mode="valid") if len(losses) >= k else np.asarray(losses)
      ax.plot(steps[len(steps) - len(sm):], sm, label=f"QAT {name} (train loss, {k}-step mean)")
    held = {r["method"]: r["held"] for r in rows}
    for name, color in (("float32", "k"), ("RTN W3 g128", "C0"), ("RTN W8A8 (per-token dyn.)", "C1")):
      if name in held:
        ax.axhline(held[name], ls="--", color=color, lw=0.8, label=f"{name} held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("SmolLM2-135M QAT on news text")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"qat_smollm2{tag}.png"), dpi=120)
  except Exception as e:  # the table matters more than the plot
    print(f"plot skipped: {e}", file=sys.stderr)


if __name__ == "__main__":
  main()
