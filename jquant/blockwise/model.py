"""Block-wise reconstruction over any model: learn each block's quantizers against its float output.

`quantize_model` takes a model as data (`jquant.graph`: a Linen module with
its params, an NNX module, jquant's own models, an apply function) and, for
each block in order (OmniQuant, Shao et al. 2023; AutoRound, Cheng et al.
2023; EfficientQAT's Block-AP stage, Chen et al. 2024):

1. the block's inputs are the calibration examples run through the prefix
   and the blocks before it *already quantized* (the first block: the
   prefix's output); its targets are the *float* block's outputs on those
   same inputs (``target="same_input"``), or the float model's own
   activations after the block (``target="float_model"``: the block also
   learns to undo the error the earlier blocks carry in, as OmniQuant
   does);
2. every rule-selected weight of the block gets a learnable quantizer
   (`jquant.blockwise.core`: per-group scale factors, zero points, a
   rounding offset or a weight update) starting from round-to-nearest or
   from a given quantized tree (``init=``, e.g. GPTQ's or AWQ's result:
   their scales, zero points and codes are the start);
3. an optax optimiser (Adam, or AutoRound's signed gradient descent)
   minimises the mean squared error of the block's outputs for
   ``config.steps`` steps, one calibration batch per step, inside one
   compiled step shared by all alike blocks; the learned quantizers are kept
   only when they lower the error over all calibration batches from its
   start (else the start is kept: the result is never worse than its start
   on the calibration data);
4. the learned quantizers are packed into ordinary `QArray` s (what
   `jquant.quantize_params` makes: checkpoints, `jquant.quantized`, GGUF
   export work as for any other result), and the quantized block produces
   the next block's inputs.

Leaves a rule selects that no block matmul reads (an untied head) are
rounded to nearest (or taken from ``init``), as in `jquant.gptq`; both walk
the model with `jquant.blockpass`.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jquant
    >>> from jquant import blockwise
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return x + nn.Dense(32, name="down")(jax.nn.gelu(nn.Dense(64, name="up")(nn.LayerNorm()(x))))
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for i in range(2):
    ...       x = Block(name=f"layers_{i}")(x)
    ...     return x
    >>> x = jax.random.normal(jax.random.key(0), (8, 16, 32))
    >>> params = Net().init(jax.random.key(1), x)["params"]
    >>> rules = [jquant.Rule("kernel", jquant.QuantSpec(bits=3, granularity="group", group_size=16))]
    >>> res = blockwise.quantize_model(Net(), params, x, rules, steps=20, progress=False, return_report=True)
    >>> all(b.loss <= b.start_loss for b in res.report.blocks)
    True
    >>> y = jax.jit(jquant.quantized(Net().apply))({"params": res.params}, x)
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jquant import blockpass, graph, intercept
from jquant.blockwise import core
from jquant.qarray import dequantize
from jquant.spec import Rule
from jquant.tokens import check_calibration_tokens
from jquant.utils import check_finite, path_str

TARGETS = ("same_input", "float_model")
OPTIMIZERS = ("adam", "signsgd")


@dataclasses.dataclass(frozen=True)
class BlockwiseConfig:
  """Knobs of block-wise reconstruction.

  Attributes:
    steps: Optimiser steps per block (one calibration batch each, cycling).
    batch_size: Calibration examples per batch (per step) when ``calib`` is
      one array; a list of batches is used as given.
    lr: Learning rate of the rounding offset / weight update ``V`` and of
      the zero points (both in quantization steps).
    scale_lr: Learning rate of the log scale factors.
    learn: What is learned, a subset of ``("scale", "zero", "round",
      "weight")``: ``"scale"`` the per-group scales (as a factor of the
      start), ``"zero"`` the zero points (asymmetric specs), ``"round"`` a
      rounding offset ``V`` in ``[-0.5, 0.5]`` steps (AutoRound),
      ``"weight"`` an unbounded weight update (EfficientQAT's Block-AP);
      ``"round"`` and ``"weight"`` exclude each other.
    optimizer: ``"adam"`` or ``"signsgd"`` (AutoRound's signed gradient).
    decay: Decay the learning rates linearly to 0 over the steps.
    target: ``"same_input"``: the float block on the quantized model's
      inputs; ``"float_model"``: the float model's own activations.
    skip_positions: Leave the first positions (axis 1 of the block's
      ``(B, T, ...)`` outputs) out of the loss (attention sinks).
    check_batches: Calibration batches the start and the result are scored
      on (the first ones; None: all) to decide which is kept.
    seed: Seeds the order in which batches are visited.
  """

  steps: int = 100
  batch_size: int = 4
  lr: float = 5e-3
  scale_lr: float = 5e-3
  learn: tuple = ("scale", "zero", "round")
  optimizer: str = "adam"
  decay: bool = True
  target: str = "same_input"
  skip_positions: int = 0
  check_batches: Optional[int] = None
  seed: int = 0

  def __post_init__(self):
    for name in ("steps", "batch_size"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"BlockwiseConfig: {name}={v!r}; allowed: a positive int.")
    for name in ("lr", "scale_lr"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
        raise ValueError(f"BlockwiseConfig: {name}={v!r}; allowed: a finite float > 0.")
    learn = tuple(self.learn) if not isinstance(self.learn, str) else (self.learn,)
    bad = [x for x in learn if x not in core.LEARNABLE]
    if bad or not learn or ("round" in learn and "weight" in learn):
      raise ValueError(f"BlockwiseConfig: learn={self.learn!r}; allowed: a non-empty subset of {core.LEARNABLE} "
                       "without both 'round' and 'weight'.")
    object.__setattr__(self, "learn", tuple(x for x in core.LEARNABLE if x in learn))
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"BlockwiseConfig: optimizer={self.optimizer!r}; allowed: {OPTIMIZERS}.")
    if self.target not in TARGETS:
      raise ValueError(f"BlockwiseConfig: target={self.target!r}; allowed: {TARGETS}.")
    if isinstance(self.skip_positions, bool) or not isinstance(self.skip_positions, int) or self.skip_positions < 0:
      raise ValueError(f"BlockwiseConfig: skip_positions={self.skip_positions!r}; allowed: an int >= 0.")

    if self.check_batches is not None and (isinstance(self.check_batches, bool) or
                                           not isinstance(self.check_batches, int) or self.check_batches < 1):
      raise ValueError(f"BlockwiseConfig: check_batches={self.check_batches!r}; allowed: None or a positive int.")

  def replace(self, **kw) -> "BlockwiseConfig":
    return dataclasses.replace(self, **kw)


class BlockReport(NamedTuple):
  """One block's reconstruction.

  Attributes:
    block: The block (``layers_3``).
    layers: Full paths of the weights learned.
    start_loss: Output error (`core.output_error`, mean over the
      ``config.check_batches`` first calibration batches) of the start (RTN
      or ``init``).
    loss: The same for the result.
    learned: False when the learned quantizers did not beat the start (the
      start is kept).
    seconds: Wall time of the block.
  """

  block: str
  layers: tuple
  start_loss: float
  loss: float
  learned: bool
  seconds: float


@dataclasses.dataclass(frozen=True)
class BlockwiseReport:
  """Per-block results of `quantize_model`; ``print(report)`` gives a table.

  Attributes:
    blocks: `BlockReport` per block, in order.
    seconds: Wall time of the whole pass.
    rtn_leaves: Paths rounded to nearest (or taken from ``init``): selected
      by a rule, but no block matmul reads them.
    config: The `BlockwiseConfig` used.
  """

  blocks: tuple
  seconds: float
  rtn_leaves: tuple = ()
  config: Optional[BlockwiseConfig] = None

  def __str__(self):
    lines = [f"Block-wise reconstruction: {len(self.blocks)} blocks, {self.seconds:.1f}s",
             "| block | weights | start loss | loss | ratio | kept |", "|---|---:|---:|---:|---:|---|"]
    for b in self.blocks:
      r = b.loss / b.start_loss if b.start_loss > 0 else float("nan")
      lines.append(f"| {b.block} | {len(b.layers)} | {b.start_loss:.4g} | {b.loss:.4g} | {r:.3f} | "
                   f"{'learned' if b.learned else 'start'} |")
    if self.rtn_leaves:
      lines.append(f"round-to-nearest / init (no block matmul reads them): {', '.join(self.rtn_leaves)}")
    return "\n".join(lines)


class BlockwiseResult(NamedTuple):
  """``quantize_model(..., return_report=True)``: the quantized tree and its `BlockwiseReport`."""

  params: Any
  report: BlockwiseReport


# ----------------------------------------------------------------------------------------------
# Compiled steps, shared by alike blocks (same program, segment structure, weights, specs and settings)
# ----------------------------------------------------------------------------------------------

_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _optimizer(cfg: BlockwiseConfig) -> optax.GradientTransformation:
  def one(lr):
    lr = optax.linear_schedule(lr, 0.0, cfg.steps) if cfg.decay else lr
    if cfg.optimizer == "signsgd":
      return optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(lr))
    return optax.adam(lr)

  labels = lambda theta: {r: {k: k for k in t} for r, t in theta.items()}
  return optax.multi_transform({"scale": one(cfg.scale_lr), "zero": one(cfg.lr), "offset": one(cfg.lr)}, labels)


def _steps(prog, seg, learned: tuple, cfg: BlockwiseConfig):
  """``(train_step, loss)`` compiled for one block structure; ``learned``: ((rel, spec, dtype name), ...)."""
  cache = _STEPS.setdefault(prog, {})
  key = (seg.key, learned, cfg)
  hit = cache.get(key)
  if hit is not None:
    return hit
  f = prog.jitted(seg)
  opt = _optimizer(cfg)

  def loss_fn(theta, rel_params, latent, starts, state_in, refs):
    rel = dict(rel_params)
    for r, spec, dt in learned:
      init = core.QuantInit(spec, *starts[r])
      rel[r] = core.fake_quant(latent[r], init, theta[r]).astype(dt)
    outs, _ = f(rel, state_in)
    return core.output_error(outs, refs, cfg.skip_positions)

  def step(theta, opt_state, rel_params, latent, starts, state_in, refs):
    loss, g = jax.value_and_grad(loss_fn)(theta, rel_params, latent, starts, state_in, refs)
    updates, opt_state = opt.update(g, opt_state, theta)
    theta = optax.apply_updates(theta, updates)
    return {r: core.project(t, cfg.learn) for r, t in theta.items()}, opt_state, loss

  hit = cache[key] = (jax.jit(step), jax.jit(loss_fn), opt)
  return hit


# ----------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------


def _config(config, overrides) -> BlockwiseConfig:
  cfg = config or BlockwiseConfig()
  if not isinstance(cfg, BlockwiseConfig):
    raise TypeError(f"blockwise.quantize_model: config is a {type(cfg).__name__}; allowed: a BlockwiseConfig.")
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(BlockwiseConfig)})
  if unknown:
    raise TypeError(f"blockwise.quantize_model: unknown options {unknown}; allowed: the fields of BlockwiseConfig "
                    f"({[f.name for f in dataclasses.fields(BlockwiseConfig)]}).")
  return cfg.replace(**overrides) if overrides else cfg


def _init_leaves(init, params, prog) -> dict:
  """``{full path: leaf}`` of the ``init`` tree (same structure as ``params``)."""
  if init is None:
    return {}
  if isinstance(init, Mapping) and list(init) == ["params"] and not (isinstance(params, Mapping)
                                                                       and list(params) == ["params"]):
    init = init["params"]
  lp, tp = jax.tree_util.tree_flatten(params, is_leaf=intercept.is_quantized)
  li, ti = jax.tree_util.tree_flatten(init, is_leaf=intercept.is_quantized)
  if len(li) != len(lp):
    raise ValueError(f"blockwise.quantize_model: init has {len(li)} leaves, params {len(lp)}; allowed: a tree "
                     "of the same structure as params (the result of jquant.quantize_params, gptq.quantize_model "
                     "or awq.quantize_model on them).")
  paths = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(init, is_leaf=intercept.is_quantized)[0]]
  if tuple(paths) != tuple(prog.param_paths):
    raise ValueError("blockwise.quantize_model: init's leaf paths differ from params' "
                     f"(first: {paths[:3]} vs {list(prog.param_paths[:3])}); pass the quantized tree of these "
                     "params.")
  return dict(zip(paths, li))


def quantize_model(model, params, calib, rules: Sequence[Rule], *, init=None, blocks: Optional[str] = None,
                   config: Optional[BlockwiseConfig] = None, progress: bool = True, return_report: bool = False,
                   **overrides):
  """Quantizes a model block by block, learning each block's quantizers against the float block.

  Args:
    model: A Linen module, an NNX module, an object with
      ``.apply(params, *inputs)`` (jquant's models) or a function
      ``fn(params, *inputs)`` (see `jquant.graph.as_apply`).
    params: Its float parameters (None: the model's own). The targets are
      computed with these.
    calib: Calibration data as `jquant.graph.batches` takes it: an array of
      examples (split into ``batch_size`` batches) or a list of batches.
    rules: `jquant.Rule` list giving each kernel's `jquant.QuantSpec` by its
      full path; kernels are quantized along the contraction axes the model's
      own matmuls use (``DenseGeneral``, ``Einsum`` kernels need no axes).
      Every rule must match at least one parameter path (a rule matching
      none is refused: it would leave in float what it meant to quantize).
    init: Optional quantized tree of the same structure (a GPTQ, AWQ or RTN
      result made with the same rules): each `QArray`'s scales, zero points
      and dequantized values are the start of its weight (so the start *is*
      that result); weights it leaves in float start from RTN.
    blocks: Optional regex naming the blocks (see `jquant.graph.find_blocks`).
    config: A `BlockwiseConfig`; keyword ``overrides`` replace its fields
      (``steps=200``, ``learn=("scale", "weight")``, ...).
    progress: Show a tqdm bar over blocks and steps.
    return_report: Return a `BlockwiseResult` (params and `BlockwiseReport`).

  Returns:
    The parameter tree (same structure as ``params``) with `QArray` weights,
    runnable with ``jquant.quantized(apply)``; or a `BlockwiseResult`.

  Raises:
    ValueError: empty calibration data or rules; a rule that matches no
      parameter path of the model (naming it); bad options (``steps <= 0``, ...);
      parameters or calibration inputs holding NaN or inf (naming the
      leaves); quantized ``params``; an ``init`` of another structure or
      spec; specs it cannot learn (two-level, float mins); a block loss that
      turns non-finite (naming the block).
    TypeError: unknown options, a config that is not a `BlockwiseConfig`,
      rules that are not `jquant.Rule`.
    jquant.graph.GraphError: no blocks found, or blocks that cannot be run
      one at a time.

  Example:
    >>> qparams = jquant.gptq.quantize_model(model, model.params, calib, rules)
    >>> qparams = blockwise.quantize_model(model, model.params, calib, rules, init=qparams,
    ...                                    learn=("scale", "zero", "weight"), steps=100)
  """
  cfg = _config(config, overrides)
  if blocks is not None and not isinstance(blocks, str):
    raise TypeError(f"blockwise.quantize_model: blocks={blocks!r}; allowed: None or one regex string naming the "
                    "blocks, e.g. r'layers_\\d+' or 'layers_(1|2)$' (see jquant.graph.find_blocks).")
  rules = blockpass.check_rules(rules, "blockwise.quantize_model")  # a list of Rules, not empty
  apply, params, wrapped = blockpass.model_params(model, params, "blockwise.quantize_model")
  quantized_leaves = [path_str(kp) for kp, v in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=intercept.is_quantized)[0] if intercept.is_quantized(v)]
  if quantized_leaves:
    raise ValueError(f"blockwise.quantize_model: params holds quantized leaves ({quantized_leaves[:3]}...); "
                     "allowed: the float parameters (the targets come from them). Pass a quantized result as "
                     "init= to start from it.")
  check_finite(params, "blockwise.quantize_model", "the float parameters",
               "Fix or reload these weights before quantizing.")
  blockpass.check_rules_match(
      rules, [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]], "blockwise.quantize_model")
  check_finite({"calib": calib}, "blockwise.quantize_model", "the calibration inputs",
               "Clean the calibration data; every example must be finite.")
  batches = graph.batches(calib, cfg.batch_size, fn="blockwise.quantize_model")
  seq = [jnp.shape(x)[1] for x in jax.tree_util.tree_leaves(calib) if jnp.ndim(x) >= 2]
  if cfg.skip_positions and seq and cfg.skip_positions >= min(seq):
    raise ValueError(f"blockwise.quantize_model: skip_positions={cfg.skip_positions} leaves no position of the "
                     f"calibration sequences (length {min(seq)}); allowed: 0 <= skip_positions < {min(seq)}.")
  check_calibration_tokens(model, calib, fn="blockwise.quantize_model")
  start = time.perf_counter()

  runs = blockpass.Runs(model, apply, params, batches, blocks, fn="blockwise.quantize_model")
  prog = runs.main.prog
  flat, treedef = runs.flat(params)
  given = _init_leaves(init, params, prog)
  new_flat = dict(flat)
  deq_flat = dict(flat)
  states = runs.prefix(flat, batches)
  float_states = states if cfg.target == "float_model" else None
  order = np.random.default_rng(cfg.seed)

  reports, found_axes = [], {}
  segs = prog.block_segments
  bar = tqdm(total=len(segs) * cfg.steps, desc="Blockwise", disable=not progress)
  for i, seg in enumerate(segs):
    t0 = time.perf_counter()
    targets, _ = runs.targets(seg, flat, states[0], rules, found_axes, fn="blockwise.quantize_model")
    progs = [t.prog for t in runs.of_batch]
    bsegs = [p.block_segments[i] for p in progs]
    st_lists = [graph.state_list(s, st) for s, st in zip(bsegs, states)]
    rel_float = prog.block_params(flat, seg)
    bp = [p.block_params(flat, s) for p, s in zip(progs, bsegs)]
    # Targets: the float block on the quantized model's inputs (or the float model's own activations).
    if float_states is None:
      refs = [p.jitted(s)(b, st)[0] for p, s, b, st in zip(progs, bsegs, bp, st_lists)]
    else:
      refs = [p.jitted(s)(b, graph.state_list(s, fst))[0] for p, s, b, fst in zip(progs, bsegs, bp, float_states)]
      float_states = [graph.updated(s, fst, o) for s, fst, o in zip(bsegs, float_states, refs)]
    rels = sorted(targets)
    if not rels:
      reports.append(BlockReport(seg.name, (), 0.0, 0.0, False, time.perf_counter() - t0))
      bar.update(cfg.steps)
      states = runs.forward(i, deq_flat, states) if i + 1 < len(segs) else states
      continue
    learned, latent, starts, inits = [], {}, {}, {}
    for r in rels:
      full, spec, ka = targets[r]
      w = rel_float[r]
      spec = blockpass.axis_spec(spec, tuple(ka))
      try:
        core.check_spec(spec, full)
        g = given.get(full)
        g = g if intercept.is_quantized(g) else None
        qi = core.init_quantizer(w, spec, g)
      except ValueError as e:
        raise ValueError(f"blockwise.quantize_model: {full}: {e}") from None
      inits[r] = qi
      latent[r] = jnp.asarray(w, jnp.float32) if g is None else dequantize(g, jnp.float32)
      starts[r] = (qi.scale, qi.zero_point, qi.step)
      learned.append((r, spec, np.dtype(jnp.result_type(w)).name))
    learned = tuple(learned)
    theta0 = {r: core.init_params(inits[r], cfg.learn) for r in rels}
    fns = [_steps(p, s, learned, cfg) for p, s in zip(progs, bsegs)]
    n_check = len(batches) if cfg.check_batches is None else min(cfg.check_batches, len(batches))
    scored = list(zip(fns, bp, st_lists, refs))[:n_check]
    start_loss = float(np.mean([float(fn[1](theta0, b, latent, starts, st, rf)) for fn, b, st, rf in scored]))
    if not np.isfinite(start_loss):
      raise ValueError(f"blockwise.quantize_model: the start's block output error of {seg.name!r} is "
                       f"{start_loss} although every weight and input is finite: the block's activations "
                       "overflow; run the model in float32. If the inputs are token ids, check they lie in the "
                       "embedding's vocabulary: Flax's nn.Embed gives NaN rows for ids outside it "
                       "(jquant.tokens.check_token_ids(tokens, vocab_size, fn=...) names them).")
    theta, opt_state = theta0, fns[0][2].init(theta0)
    visit = []
    for k in range(cfg.steps):
      if not visit:
        visit = list(order.permutation(len(batches)))
      b = visit.pop()
      theta, opt_state, _ = fns[b][0](theta, opt_state, bp[b], latent, starts, st_lists[b], refs[b])
      bar.update(1)
    end_loss = float(np.mean([float(fn[1](theta, b, latent, starts, st, rf)) for fn, b, st, rf in scored]))
    if not np.isfinite(end_loss):
      raise ValueError(f"blockwise.quantize_model: the block output error of {seg.name!r} became non-finite "
                       f"({end_loss}) while learning (start {start_loss:.4g}); lower lr={cfg.lr} / "
                       f"scale_lr={cfg.scale_lr} or run the model in float32.")
    keep = end_loss < start_loss
    theta = theta if keep else theta0
    for r, spec, dt in learned:
      full = targets[r][0]
      q = core.pack(latent[r], inits[r], theta[r], dtype=dt)
      new_flat[full] = q
      deq_flat[full] = dequantize(q, dt)
    reports.append(BlockReport(seg.name, tuple(targets[r][0] for r in rels), start_loss,
                               end_loss if keep else start_loss, bool(keep), time.perf_counter() - t0))
    bar.set_postfix_str(f"{seg.name} loss/start {reports[-1].loss / max(start_loss, 1e-30):.3f}")
    if i + 1 < len(segs):
      states = runs.forward(i, deq_flat, states)
    for r in rels:  # only block i's forward reads these dequantized copies: keep memory near one block's
      deq_flat[targets[r][0]] = flat[targets[r][0]]
  bar.close()
  del states

  # Selected leaves no block matmul reads: taken from init where it quantized them, else rounded to nearest.
  for p, g in given.items():
    if intercept.is_quantized(g) and not intercept.is_quantized(new_flat[p]):
      new_flat[p] = g
  out = jax.tree_util.tree_unflatten(treedef, [new_flat[p] for p in prog.param_paths])
  out, rtn_leaves = blockpass.round_the_rest(out, new_flat, rules, found_axes, apply, params, batches[0])
  rest = tuple(p for p in given if intercept.is_quantized(given[p]) and p not in
               {l for b in reports for l in b.layers})
  report = BlockwiseReport(tuple(reports), time.perf_counter() - start, tuple(rtn_leaves) + rest, cfg)
  out = {"params": out} if wrapped else out
  return BlockwiseResult(out, report) if return_report else out


__all__ = ["quantize_model", "BlockwiseConfig", "BlockReport", "BlockwiseReport", "BlockwiseResult", "TARGETS",
           "OPTIMIZERS"]
