"""SmoothQuant: move activation outliers into the weights, exactly, before W8A8; on any model.

For a matmul input ``x`` (K channels) and the kernels ``W`` that read it,
``x @ W == (x / s) @ (s * W)`` along the contraction for any positive ``s``.
With

    s_j = max|x_j|^alpha / max|W_j,:|^(1 - alpha)

channels with outlier activations are divided down and their weight rows
scaled up, so one per-tensor int8 activation scale fits all channels better
(Xiao et al., 2023). The division by ``s`` is folded into whatever produces
``x`` (`jquant.folds`): a norm's scale (and bias), Gemma's ``1 + scale``, or
a linear layer's output columns *and its bias*; grouped-query ``v -> o``
with ``s`` tied over the query heads that read one kv head. The folds are
derived from the model's own program and each is verified on a calibration
batch before use, so a fold that would change the float model (a bias left
undivided, a GELU between ``up`` and ``down``, a post-norm LayerNorm that also
feeds the residual) is never applied: derived candidates that fail are
dropped, a fold you pass that fails raises `jquant.folds.FoldError`.

`search_alpha` picks ``alpha`` per fold by the error of exactly the int8
arithmetic that is served: the activations go through
`jquant.ops.quantize_activations_static` (scale from
`jquant.ops.static_activation_scale`) or
`jquant.ops.quantize_activations_per_token`, the weights through the W8A8
weight quantizer (`jquant.quantize` with a symmetric int8 per-channel spec),
and the product through `jquant.ops.qdot` on a `jquant.ops.W8A8Weight`.

Column scaling of ``up``/``v`` is free for per-output-channel int8 weights
(each column's scale absorbs it).

Example:
  >>> import jquant
  >>> from jquant import observers, smoothquant
  >>> chan = jquant.calibrate(model, params, calib, rules, observer=observers.MinMaxObserver("channel"))
  >>> smoothed, s = smoothquant.smooth(model, params, calib, chan.amax(), alpha=0.5)
  >>> # model.apply(smoothed, x) == model.apply(params, x) up to float rounding
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jquant import dataflow, folds as folds_lib, graph, ops
from jquant.calibrate import W8A8Spec
from jquant.qarray import quantize, to_matrix
from jquant.sharding import mesh_of
from jquant.spec import QuantSpec
from jquant.tokens import check_calibration_tokens
from jquant.utils import check_finite, path_str

S_MIN, S_MAX = 1e-5, 1e5  # keeps dead channels (max 0) finite
DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # a grid up to 1.0 scored better per layer, worse end to end
ACTIVATIONS = ("static", "dynamic")
_STATS_ADVICE = ("Calibrate on finite data (check the calibration windows and float16/bfloat16 overflow) and "
                 "fix any non-finite weight.")
WEIGHT_SPEC = W8A8Spec().weight_spec()  # the served W8A8 weights: symmetric int8, one scale per output channel


def smoothing_factors(x_absmax, w_absmax, alpha: float) -> jax.Array:
  """``s = max|x|^alpha / max|w|^(1-alpha)``, clipped to [1e-5, 1e5]; 1 where a max is 0.

  Args:
    x_absmax: ``(K,)`` per-channel ``max|x|``.
    w_absmax: ``(K,)`` per-input-row ``max|W|`` over the consumers' outputs.
    alpha: Migration strength in [0, 1].

  Raises:
    ValueError: concrete statistics holding NaN or inf (a NaN max would be
      read as a dead channel and smoothed by 1 silently); traced ones (under
      ``jax.jit``) cannot be checked.

  Example:
    >>> smoothing_factors(jnp.array([4.0, 1.0]), jnp.array([1.0, 1.0]), 0.5)
    Array([2., 1.], dtype=float32)
  """
  check_finite({"x_absmax": x_absmax, "w_absmax": w_absmax}, "smoothing_factors", "statistics", _STATS_ADVICE)
  x = jnp.asarray(x_absmax, jnp.float32)
  w = jnp.asarray(w_absmax, jnp.float32)
  s = jnp.power(jnp.maximum(x, 1e-30), alpha) / jnp.power(jnp.maximum(w, 1e-30), 1.0 - alpha)
  s = jnp.clip(s, S_MIN, S_MAX)
  return jnp.where((x > 0) & (w > 0), s, 1.0)


def weight_absmax(fold: folds_lib.Fold, params: Mapping) -> jax.Array:
  """``(K,)`` max ``|W|`` per input row over the fold's consumers (N-D kernels as their (K, N) matrices)."""
  rows = [jnp.max(jnp.abs(to_matrix(params[c], fold.axes_of(i)).astype(jnp.float32)), axis=1)
          for i, c in enumerate(fold.consumers)]
  return jnp.max(jnp.stack(rows), axis=0)


def activation_absmax(fold: folds_lib.Fold, act_absmax: Mapping, prefix: str = "") -> jax.Array:
  """``(K,)`` max ``|x|`` per channel over the fold's consumers (from per-channel calibration).

  Raises:
    ValueError: no statistics for the fold's consumers, or per-tensor ones.
  """
  full = lambda c: c[1:] if c.startswith("/") else (f"{prefix}/{c}" if prefix else c)
  name = (fold.under(prefix) if prefix else fold).name
  xs = [jnp.asarray(act_absmax[full(c)], jnp.float32) for c in fold.consumers if full(c) in act_absmax]
  if not xs:
    raise ValueError(f"smoothquant: no per-channel activation max for fold {name!r} (consumers "
                     f"{[full(c) for c in fold.consumers]}); act_absmax has keys like {sorted(act_absmax)[:3]}. "
                     "Calibrate the same model with observers.MinMaxObserver('channel').")
  if any(v.ndim != 1 for v in xs):
    raise ValueError(f"smoothquant: fold {name!r} needs per-channel statistics (shape (K,)), got shapes "
                     f"{[tuple(v.shape) for v in xs]}; calibrate with observers.MinMaxObserver('channel').")
  x = jnp.max(jnp.stack(xs), axis=0)
  return x


def fold_factors(fold: folds_lib.Fold, params: Mapping, act_absmax: Mapping, alpha, prefix: str = "") -> jax.Array:
  """The ``(K,)`` smoothing factors of one fold (tied over copies when the fold ties them).

  Args:
    fold: The `jquant.folds.Fold` (paths in ``params``; below ``prefix`` in
      ``act_absmax``).
    params: ``{path: array}`` holding the fold's paths.
    act_absmax: ``{kernel path: (K,) max|x|}``.
    alpha: Migration strength in [0, 1].
    prefix: The block the fold's paths are relative to ("" for full paths).
  """
  k = folds_lib.check_fold(params, fold)
  x, w = fold_factors_inputs(fold, params, act_absmax, prefix)
  if x.shape != (k,):
    raise ValueError(f"smoothquant: fold {fold.name!r} reads {k} channels but its statistics have shape "
                     f"{tuple(x.shape)}.")
  return smoothing_factors(x, w, alpha)


def fold_factors_inputs(fold: folds_lib.Fold, params: Mapping, act_absmax: Mapping, prefix: str = ""):
  """``(x_absmax, w_absmax)`` of a fold, tied over copies: what `smoothing_factors` reads."""
  return (fold.tie_stat(activation_absmax(fold, act_absmax, prefix), "max"),
          fold.tie_stat(weight_absmax(fold, params), "max"))


def _check_stats(act_absmax, fn: str):
  if not isinstance(act_absmax, Mapping):
    raise TypeError(f"{fn}: act_absmax must be a mapping {{kernel path: (K,) max|x|}}, got "
                    f"{type(act_absmax).__name__}; use jquant.calibrate(..., observer="
                    "observers.MinMaxObserver('channel')).amax().")
  check_finite(dict(act_absmax), fn, "the activation statistics act_absmax", _STATS_ADVICE)


def _alpha_for(alpha, name: str, fn: str) -> float:
  if isinstance(alpha, Mapping):
    if name in alpha:
      a = alpha[name]
    else:
      keys = [k for k in alpha if name.endswith("/" + k)]
      if not keys:
        raise ValueError(f"{fn}: alpha has no entry for fold {name!r}; allowed keys: the fold's name or its "
                         f"name inside its block (e.g. 'attn_norm'); got keys {sorted(alpha)[:6]}.")
      a = alpha[max(keys, key=len)]
  else:
    a = alpha
  a = float(a)
  if not 0.0 <= a <= 1.0:
    raise ValueError(f"{fn}: alpha={a!r} for {name}; allowed: a float in [0, 1].")
  return a


def _selected(folds, sites, fn: str):
  if sites is None:
    return list(folds)
  sites = tuple(sites)
  out = [f for f in folds if any(f.name == s or f.name.endswith("/" + s) for s in sites)]
  names = sorted({f.name.rsplit("/", 1)[-1] for f in folds})
  for s in sites:
    if not any(f.name == s or f.name.endswith("/" + s) for f in folds):
      raise ValueError(f"{fn}: site {s!r} names no fold of this model; its folds are {[f.name for f in folds][:8]} "
                       f"(a site is a fold's name or its end, e.g. {names[:4]}).")
  return out


def model_folds(model, params, calib, *, folds: Optional[Sequence[folds_lib.Fold]] = None,
                blocks: Optional[str] = None, batch_size: int = 8, rtol: Optional[float] = None):
  """``(apply, params, folds)``: the model's verified folds (derived, or ``folds`` checked on one batch).

  Raises:
    jquant.folds.FoldError: a given fold changes the float model.
    ValueError: parameters holding NaN or inf (naming every such leaf),
      token ids outside the model's vocabulary (jquant's models).
  """
  apply, own = graph.as_apply(model)
  params = own if params is None else params
  if params is None:
    raise ValueError("smoothquant: params is None and the model holds none; pass its parameters.")
  check_finite(params, "smoothquant", "params", "Fix these weights before smoothing.")
  check_calibration_tokens(model, calib, fn="smoothquant")
  check_finite({"calib": calib}, "smoothquant", "the calibration inputs",
               "Clean the calibration data; every example must be finite.")
  batch = graph.batches(calib, batch_size, fn="smoothquant")[0]
  if folds is None:
    folds = folds_lib.derive(apply, params, *batch, blocks=blocks, rtol=rtol).folds
  else:
    folds = list(folds)
    folds_lib.verify(apply, params, batch, folds, rtol=rtol)
  return apply, params, list(folds)


def smooth(model, params, calib, act_absmax: Mapping[str, jax.Array], alpha: Union[float, Mapping[str, float]] = 0.5,
           *, folds: Optional[Sequence[folds_lib.Fold]] = None, sites: Optional[Sequence[str]] = None,
           blocks: Optional[str] = None, batch_size: int = 8, rtol: Optional[float] = None):
  """Smooths a model's parameters; the float function is unchanged.

  Args:
    model: A Linen module, an NNX module, an object with ``.apply``, or a
      function (see `jquant.graph.as_apply`).
    params: Its float parameters (None: the model's own).
    calib: Calibration data (`jquant.graph.batches`); the folds are derived
      and verified on its first batch.
    act_absmax: ``{kernel path: per-channel max|x| (K,)}``, e.g.
      ``jquant.calibrate(..., observer=MinMaxObserver("channel")).amax()``.
    alpha: Migration strength, one float or ``{fold name or its end
      ("layers_3/attn_norm" or "attn_norm"): float}`` (from `search_alpha`).
    folds: `jquant.folds.Fold` s to use instead of the derived ones (full
      paths); each is verified first.
    sites: Which folds to smooth, by name or name end (``"attn_norm"``,
      ``"mlp/up"``); default all.
    blocks: Optional regex naming the blocks (see `jquant.graph.find_blocks`).
    batch_size: Examples per batch when ``calib`` is one array.
    rtol: Fold verification tolerance (default `jquant.folds.default_rtol`).

  Returns:
    ``(smoothed params, {fold name: s})``. Factors are computed from the
    original weights and statistics, then all folds applied. Parameters
    sharded over a mesh (`jquant.sharding.shard_params`: FSDP / tensor
    parallel) are smoothed where they live and come back on their own
    shardings, each factor ``s`` replicated over that mesh; the results equal
    the single-device ones bit for bit (for the same ``act_absmax``).

  Raises:
    jquant.folds.FoldError: a given fold changes the float model.
    ValueError: missing or per-tensor statistics, alpha outside [0, 1];
      ``act_absmax`` or parameters holding NaN or inf (the message names
      every such kernel path / leaf); token ids outside the model's
      vocabulary (jquant's models).

  Example:
    >>> smoothed, s = smooth(model, params, calib, chan.amax(), alpha=0.5)
  """
  _check_stats(act_absmax, "smooth")
  _, params, fs = model_folds(model, params, calib, folds=folds, blocks=blocks, batch_size=batch_size, rtol=rtol)
  fs = _selected(fs, sites, "smooth")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(kp) for kp, _ in leaves]
  flat = dict(zip(paths, (v for _, v in leaves)))
  factors = {f.name: fold_factors(f, flat, act_absmax, _alpha_for(alpha, f.name, "smooth")) for f in fs}
  for f in fs:
    flat = folds_lib.apply_fold(flat, f, factors[f.name])
  # Sharded params (jquant.sharding): every leaf back on its own layout (the eager folds let XLA pick the
  # layout of their results, e.g. a norm scale divided by factors laid out otherwise comes back replicated);
  # the (K,) factors replicated over the params' mesh.
  old = dict(zip(paths, (v for _, v in leaves)))
  flat = {p: _laid_out_like(flat[p], old[p]) for p in paths}
  mesh = mesh_of(params)
  if mesh is not None:
    factors = {k: jax.device_put(v, NamedSharding(mesh, PartitionSpec())) for k, v in factors.items()}
  return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths]), factors


def _laid_out_like(new, old):
  """``new`` on ``old``'s multi-device `NamedSharding` (unchanged otherwise)."""
  s = getattr(old, "sharding", None)
  if (isinstance(s, NamedSharding) and len(s.device_set) > 1 and not isinstance(new, jax.core.Tracer)
      and getattr(new, "sharding", None) != s):
    return jax.device_put(new, s)
  return new


def fold_error(x, kernels: Sequence, axes: Sequence[tuple], s, activations: str = "static",
               weight_spec: QuantSpec = WEIGHT_SPEC) -> jax.Array:
  """Squared error of the served W8A8 product after smoothing, on recorded inputs ``x``.

  The smoothed input ``x / s`` and kernel ``s * W`` are quantized and
  multiplied exactly as `jquant.ops.qdot` serves a `jquant.ops.W8A8Weight`
  (static: a per-tensor scale `jquant.ops.static_activation_scale` of
  ``max|x / s|`` on this sample; dynamic: per token).

  Args:
    x: ``(..., K)`` inputs as `jquant.capture` records them.
    kernels: The consumers' kernels; ``axes`` their contraction axes.
    s: ``(K,)`` factors.
    activations: ``"static"`` or ``"dynamic"``.
    weight_spec: The W8A8 weight spec (symmetric int8, per channel or tensor).

  Returns:
    float32 ``sum ||served - x @ W||^2`` over the kernels.
  """
  x2 = jnp.reshape(x, (-1, x.shape[-1])).astype(jnp.float32)
  xs = x2 / s
  act_scale = ops.static_activation_scale(jnp.max(jnp.abs(xs))) if activations == "static" else None
  err = jnp.float32(0.0)
  for k, ax in zip(kernels, axes):
    m = to_matrix(k, ax).astype(jnp.float32)
    ref = x2 @ m
    w = ops.W8A8Weight(quantize(m * s[:, None], weight_spec), act_scale)
    err = err + jnp.sum(jnp.square(ops.qdot(xs, w).astype(jnp.float32) - ref))
  return err


def search_alpha(model, params, calib, act_absmax: Mapping[str, jax.Array], *,
                 alphas: Sequence[float] = DEFAULT_ALPHAS, folds: Optional[Sequence[folds_lib.Fold]] = None,
                 sites: Optional[Sequence[str]] = None, activations: str = "static",
                 weight_spec: QuantSpec = WEIGHT_SPEC, skip_positions: int = 0, batch_size: int = 4,
                 blocks: Optional[str] = None, rtol: Optional[float] = None, progress: bool = True) -> dict:
  """Per-fold alpha with the least served W8A8 error on calibration data.

  Runs the float model block by block (`jquant.graph`; smoothing is exact, so
  every block sees its float inputs), records each fold's consumer inputs on
  device, and scores every alpha by `fold_error` summed over the batches.

  Args:
    model, params, calib: As for `smooth` (a few windows are enough).
    act_absmax: Per-channel max|x| per kernel path (as for `smooth`).
    alphas: Candidates in [0, 1].
    folds, sites, blocks, rtol: As for `smooth`.
    activations: ``"static"`` or ``"dynamic"`` activation quantization to score.
    weight_spec: The served weight spec (default W8A8's per-channel int8).
    skip_positions: Leave the first positions (axis 1) out of the error.
    batch_size: Examples per batch when ``calib`` is one array.
    progress: Show a tqdm bar over blocks.

  Returns:
    ``{fold name: best alpha}`` for `smooth`. Sharded ``params`` run SPMD on
    their mesh (the errors differ from single-device ones by float rounding
    only).

  Raises:
    ValueError: bad ``activations``/``alphas``; ``act_absmax``, parameters
      or the recorded activations holding NaN or inf (naming the kernel
      path, leaf or fold); out-of-range token ids (jquant's models).
    jquant.graph.GraphError: no blocks.
  """
  if activations not in ACTIVATIONS:
    raise ValueError(f"search_alpha: activations={activations!r}; allowed: {ACTIVATIONS}.")
  alphas = tuple(float(a) for a in alphas)
  if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
    raise ValueError(f"search_alpha: alphas={alphas!r}; allowed: a non-empty sequence of floats in [0, 1].")
  if weight_spec.bits != 8 or not weight_spec.symmetric or weight_spec.granularity == "group":
    raise ValueError(f"search_alpha: weight_spec={weight_spec}; allowed: symmetric 8-bit, per channel or tensor.")
  _check_stats(act_absmax, "search_alpha")
  apply, params, fs = model_folds(model, params, calib, folds=folds, blocks=blocks, batch_size=batch_size, rtol=rtol)
  fs = _selected(fs, sites, "search_alpha")
  data = graph.batches(calib, batch_size, fn="search_alpha")
  programs = dataflow.Programs(apply, params, blocks)
  progs = [programs(b) for b in data]
  by_path = dict(zip(progs[0].param_paths, graph._flat_params(params)))
  states = [p.prefix(params, *b) for p, b in zip(progs, data)]
  reducers: dict = {}
  totals = {}
  for bi in tqdm(range(len(progs[0].block_segments)), desc="smoothquant alpha search", disable=not progress):
    segs = [p.block_segments[bi] for p in progs]
    block = segs[0].name
    mine = [(f, f.relative_to(block)) for f in fs]
    mine = [(f, r) for f, r in mine if r is not None]
    rel_folds = tuple(r for _, r in mine)
    bp = progs[0].block_params(by_path, segs[0])
    stats = [fold_factors_inputs(r, bp, act_absmax, block) for r in rel_folds]
    reduce = reducers.get(rel_folds)
    if reduce is None:
      reduce = reducers[rel_folds] = _scorer(rel_folds, alphas, activations, weight_spec, skip_positions)
    acc = None
    for i, (prog, seg) in enumerate(zip(progs, segs)):
      outs, errs = prog.jitted(seg, reduce=reduce, record=True)(bp, graph.state_list(seg, states[i]), bp, stats)
      states[i] = graph.updated(seg, states[i], outs)
      acc = errs if acc is None else [a + e for a, e in zip(acc, errs)]
    for (f, _), e in zip(mine, acc or []):
      e = np.asarray(e, np.float64)
      if not np.isfinite(e).any():  # argmin over NaN would pick alpha[0] silently
        raise ValueError(f"search_alpha: the served W8A8 error of fold {f.name!r} (consumers {list(f.consumers)}) "
                         f"is non-finite for every alpha: the activations recorded at its consumers hold NaN or "
                         f"inf. {_STATS_ADVICE}")
      totals[f.name] = alphas[int(np.argmin(np.where(np.isfinite(e), e, np.inf)))]
  return totals


def _scorer(folds, alphas, activations, weight_spec, skip):
  """A `jquant.graph.Program.jitted` reduce: errors of every fold x alpha on one batch, on device."""

  def reduce(outs, inputs, bp, xmax):
    errs = []
    for f, (xm, wm) in zip(folds, xmax):
      x = inputs[f.consumers[0]]
      if skip and x.ndim >= 3:
        x = x[:, skip:]
      kernels = [bp[c] for c in f.consumers]
      row = [fold_error(x, kernels, [f.axes_of(i) for i in range(len(kernels))], smoothing_factors(xm, wm, a),
                        activations, weight_spec) for a in alphas]
      errs.append(jnp.stack(row))
    return outs, errs

  return reduce


__all__ = ["smooth", "search_alpha", "smoothing_factors", "fold_factors", "fold_factors_inputs", "fold_error",
           "weight_absmax", "activation_absmax", "model_folds", "DEFAULT_ALPHAS", "ACTIVATIONS", "WEIGHT_SPEC",
           "S_MIN", "S_MAX"]
