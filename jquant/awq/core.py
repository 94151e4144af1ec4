"""AWQ math on arrays: statistics, scale and clipping searches, exact folding.

Activation-aware weight quantization (Lin et al., 2023) multiplies the input
rows of a weight by per-channel scales ``s`` before quantizing it and divides
the preceding operation's output by ``s``, so the float product is unchanged:

    x @ W  ==  (x / s) @ (s[:, None] * W)

Channels that see large activations get ``s > 1``; their weights use more of
the quantization grid, which protects the products that matter most. This
module holds the array-level pieces; `jquant.awq.model` walks a model with
them. Everything is a pure function; statistics and searches run in float32.

Inputs are checked for NaN and inf when they are concrete (a ValueError names
the argument); under ``jax.jit`` they are tracers and cannot be read, so
`jquant.awq.model` checks each block's statistics as soon as it computes them.

Example:
    >>> import jax, jax.numpy as jnp, jquant
    >>> from jquant.awq import core
    >>> x = jax.random.normal(jax.random.key(0), (256, 64)).at[:, 3].multiply(30.0)
    >>> w = jax.random.normal(jax.random.key(1), (64, 32))
    >>> spec = jquant.QuantSpec(bits=3, granularity="group", group_size=32)
    >>> loss = lambda s: core.output_error(x @ w, x @ core.scaled_fake_quant(w, s, spec))
    >>> res = core.search_scales(loss, core.activation_stats(x), n_grid=20)
    >>> float(res.alpha) > 0, bool(res.errors[res.index] < res.errors[0])   # protects channel 3
    (True, True)
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from jquant.qarray import expand_to_groups, fake_quant, grid_search
from jquant.spec import QuantSpec
from jquant.utils import check_finite

SCALE_FLOOR = 1e-4  # smallest scale before normalization; keeps zero channels finite
_TINY_STAT = 1e-30  # zero statistics are read as this, so their logs stay finite
VARIANTS = ("act", "act_over_weight", "both")
_ACT_ADVICE = "Check the calibration data and the float model's activations (e.g. float16 overflow)."
_W_ADVICE = "Fix these weights, or keep the layer in float."


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def alpha_grid(n_grid: int) -> jax.Array:
  """The exponents searched: ``i / n_grid`` for ``i`` in ``0..n_grid-1`` (in [0, 1))."""
  if not isinstance(n_grid, int) or n_grid < 1:
    raise ValueError(f"alpha_grid: n_grid={n_grid!r}; allowed: a positive int.")
  return jnp.arange(n_grid, dtype=jnp.float32) / n_grid


def position_weights(length: int, skip_positions: int = 0) -> jax.Array:
  """Per-position weights (1 = counted, 0 = skipped) for the first ``skip_positions``.

  Position 0 of a causal LM window is often an attention sink with massive
  activations; skipping it keeps it from dominating statistics and errors.
  """
  if not 0 <= skip_positions < length:
    raise ValueError(f"position_weights: skip_positions={skip_positions!r}; allowed: 0..{length - 1} "
                     f"for windows of length {length}.")
  return (jnp.arange(length) >= skip_positions).astype(jnp.float32)


def activation_stats(x, *, skip_positions: int = 0) -> jax.Array:
  """Mean absolute activation per input channel (float32).

  Args:
    x: Activations, ``(..., T, d)`` when ``skip_positions > 0``, else
      ``(..., d)``.
    skip_positions: Leave out the first positions of every window.

  Returns:
    ``(d,)`` float32 ``mean |x|`` over every axis but the last.

  Raises:
    ValueError: concrete ``x`` holding NaN or inf; ``skip_positions`` with
      ``x`` of rank < 3.

  Example:
    >>> activation_stats(jnp.array([[1.0, -2.0], [3.0, 0.0]]))
    Array([2., 1.], dtype=float32)
  """
  check_finite({"x": x}, "awq.activation_stats", "activations", _ACT_ADVICE)
  x = _f32(x)
  if skip_positions:
    if x.ndim < 3:
      raise ValueError(f"activation_stats: skip_positions={skip_positions} needs x shaped (..., T, d); "
                       f"got shape {x.shape}.")
    x = x[..., skip_positions:, :]
  return jnp.mean(jnp.abs(x).reshape(-1, x.shape[-1]), axis=0)


def weight_stats(kernels: Sequence[jax.Array], spec: Optional[QuantSpec] = None) -> jax.Array:
  """Mean over output columns of ``|w|`` relative to its quantization group's max.

  The weight-magnitude term of AWQ's second scale variant. Kernels are Flax
  ``(in, out)``; several kernels sharing an input are pooled over all their
  output columns. All-zero groups give 0, not NaN.

  Args:
    kernels: ``(in, out_i)`` arrays with the same ``in``.
    spec: Quantization spec whose groups normalize ``|w|`` (per column when
      None or not grouped).

  Returns:
    ``(in,)`` float32.

  Raises:
    ValueError: a concrete kernel holding NaN or inf (``kernels/<i>``).
  """
  check_finite({"kernels": list(kernels)}, "awq.weight_stats", "weights", _W_ADVICE)
  cols = []
  for w in kernels:
    w = jnp.abs(_f32(w))
    size = w.shape[0]
    length = spec.group_size if spec is not None and spec.granularity == "group" else size
    groups = -(-size // length)
    pad = groups * length - size
    wg = jnp.pad(w, ((0, pad), (0, 0))).reshape(groups, length, -1)
    gmax = jnp.max(wg, axis=1, keepdims=True)
    rel = jnp.where(gmax > 0, wg / jnp.where(gmax > 0, gmax, 1.0), 0.0)
    cols.append(rel.reshape(groups * length, -1)[:size])
  return jnp.mean(jnp.concatenate(cols, axis=1), axis=1)


def candidate_scales(x_mean, alpha, w_mean=None) -> jax.Array:
  """One AWQ scale vector: ``x_mean^alpha`` (optionally ``/ w_mean^(1-alpha)``).

  Floored at `SCALE_FLOOR`, then normalized by ``sqrt(max * min)`` so the
  scales straddle 1. Zero channels get small positive scales, never 0, NaN
  or inf.

  Args:
    x_mean: ``(d,)`` mean ``|x|`` per channel.
    alpha: Scalar exponent in [0, 1].
    w_mean: Optional ``(d,)`` weight-magnitude term (`weight_stats`).

  Returns:
    ``(d,)`` float32 positive scales.
  """
  # Log domain: equal statistics give exactly equal logs, so uniform channels
  # give scales of exactly 1 (alpha = 0 is exactly plain round-to-nearest).
  alpha = _f32(alpha)
  log_s = alpha * jnp.log(jnp.maximum(_f32(x_mean), _TINY_STAT))
  if w_mean is not None:
    log_s = log_s - jnp.log(jnp.power(jnp.maximum(_f32(w_mean), 0.0), 1.0 - alpha) + SCALE_FLOOR)
  log_s = jnp.maximum(log_s, jnp.log(jnp.float32(SCALE_FLOOR)))
  return jnp.exp(log_s - 0.5 * (jnp.max(log_s) + jnp.min(log_s)))


def candidate_grid(x_mean, w_mean=None, *, n_grid: int = 20, variant: str = "act"):
  """All candidate scales of a search.

  Args:
    x_mean: ``(d,)`` activation statistics.
    w_mean: ``(d,)`` weight statistics (needed by the weight variants).
    n_grid: Exponents per variant (`alpha_grid`).
    variant: ``"act"`` (``x_mean^alpha``), ``"act_over_weight"``
      (``x_mean^alpha / w_mean^(1-alpha)``) or ``"both"`` (the two grids).

  Returns:
    ``(scales, alphas, weighted)``: ``(n, d)`` candidates, their ``(n,)``
    exponents and a ``(n,)`` bool saying which use the weight term.

  Raises:
    ValueError: bad ``variant``; concrete statistics holding NaN or inf
      (a NaN statistic would give NaN scales for every alpha > 0).
  """
  check_finite({"x_mean": x_mean, "w_mean": w_mean}, "awq.candidate_grid", "statistics", _ACT_ADVICE)
  if variant not in VARIANTS:
    raise ValueError(f"candidate_grid: variant={variant!r}; allowed: {VARIANTS}.")
  if variant != "act" and w_mean is None:
    raise ValueError(f"candidate_grid: variant={variant!r} needs w_mean (see weight_stats), got None.")
  alphas = alpha_grid(n_grid)
  parts, flags = [], []
  if variant in ("act", "both"):
    parts.append(jax.vmap(lambda a: candidate_scales(x_mean, a))(alphas))
    flags.append(jnp.zeros(n_grid, bool))
  if variant in ("act_over_weight", "both"):
    parts.append(jax.vmap(lambda a: candidate_scales(x_mean, a, w_mean))(alphas))
    flags.append(jnp.ones(n_grid, bool))
  return (jnp.concatenate(parts), jnp.tile(alphas, len(parts)), jnp.concatenate(flags))


def scaled_fake_quant(kernel, s, spec: Optional[QuantSpec]) -> jax.Array:
  """The effective float weight after AWQ scaling: ``Q(s * W) / s``.

  Multiplying the layer's input by ``1 / s`` instead (what folding does) gives
  the same product, so a candidate can be scored on the unscaled input.

  Args:
    kernel: ``(in, out)`` weight.
    s: ``(in,)`` positive scales.
    spec: Its quantization spec (None: left float, returned unchanged).
  """
  if spec is None:
    return kernel
  _check_kernel_spec(kernel, spec, "scaled_fake_quant")
  check_finite({"kernel": kernel, "s": s}, "awq.scaled_fake_quant", "inputs", _W_ADVICE)
  s = _f32(s)[:, None]
  w = _f32(kernel) * s
  return (fake_quant(w, spec) / s).astype(kernel.dtype)


def output_error(ref, out, weights=None) -> jax.Array:
  """Mean squared error in float32, optionally weighted per position.

  Args:
    ref, out: Same shapes ``(..., T, d)`` (or ``(..., d)`` without weights).
    weights: Optional ``(T,)`` position weights (`position_weights`).
  """
  err = jnp.square(_f32(out) - _f32(ref))
  if weights is None:
    return jnp.mean(err)
  w = _f32(weights)[:, None]
  total = jnp.sum(err * w)
  count = jnp.sum(jnp.broadcast_to(w, err.shape))
  return total / jnp.maximum(count, 1.0)


class ScaleSearch(NamedTuple):
  """Result of `search_scales`.

  Attributes:
    scales: ``(d,)`` the chosen scales.
    index: Index of the chosen candidate.
    alpha: Its exponent.
    weighted: Whether it divides by the weight term.
    errors: ``(n,)`` the error of every candidate (inf where non-finite).
    alphas: ``(n,)`` every candidate's exponent.
    weighted_all: ``(n,)`` which candidates use the weight term.
  """

  scales: jax.Array
  index: jax.Array
  alpha: jax.Array
  weighted: jax.Array
  errors: jax.Array
  alphas: jax.Array
  weighted_all: jax.Array


def search_scales(loss_fn: Callable[[jax.Array], jax.Array], x_mean, w_mean=None, *, n_grid: int = 20,
                  variant: str = "act") -> ScaleSearch:
  """Grid search of AWQ scales scored by ``loss_fn``.

  Args:
    loss_fn: ``s (d,) -> scalar`` error of the real output computed with the
      candidate's scaled, quantized weights (see `scaled_fake_quant`,
      `output_error`). Must be traceable; candidates run one at a time under
      ``lax.map`` so memory stays that of one evaluation.
    x_mean, w_mean, n_grid, variant: See `candidate_grid`.

  Returns:
    A `ScaleSearch`. Ties go to the earliest candidate, so with the ``"act"``
    grid ``alpha = 0`` (plain round-to-nearest) wins unless strictly beaten.

  Raises:
    ValueError: concrete statistics holding NaN or inf (see
      `candidate_grid`), or, outside ``jax.jit``, every candidate's loss
      non-finite (there is nothing to choose from). Under ``jax.jit``
      non-finite losses count as inf and an all-inf search returns candidate
      0: check ``errors`` there.
  """
  cands, alphas, weighted = candidate_grid(x_mean, w_mean, n_grid=n_grid, variant=variant)
  errors = _f32(jax.lax.map(loss_fn, cands))
  check_all_inf(errors, "awq.search_scales")
  errors = jnp.where(jnp.isfinite(errors), errors, jnp.inf)
  i = jnp.argmin(errors)
  return ScaleSearch(cands[i], i, alphas[i], weighted[i], errors, alphas, weighted)


def check_all_inf(errors, fn: str, where: str = "") -> None:
  """Raises if concrete candidate ``errors`` hold no finite value (a search with nothing to choose from)."""
  if isinstance(errors, jax.core.Tracer) or bool(jnp.isfinite(errors).any()):
    return
  raise ValueError(f"{fn}: every candidate's error is non-finite (NaN or inf){where}, so no scale can be chosen; "
                   "the weights or activations scored hold NaN/inf or overflow float32. "
                   f"{_ACT_ADVICE}")


class ClipRange(NamedTuple):
  """Per-group clipping range of a kernel, shaped ``(n_groups, out)``."""

  lo: jax.Array
  hi: jax.Array
  shrink: jax.Array  # the chosen factor of the min-max range, in (0, 1]


def _check_kernel_spec(kernel, spec: QuantSpec, fn: str):
  if kernel.ndim != 2:
    raise ValueError(f"{fn}: kernel must be 2-D (in, out); got shape {kernel.shape}.")
  if spec.axis not in (0, -2):
    raise ValueError(f"{fn}: spec.axis={spec.axis}; allowed: 0 (the contraction axis of a Flax "
                     "(in, out) kernel).")


def _groups(a, length: int):
  """(in, ...) -> (G, length, ...) zero-padded; zeros change no product."""
  size = a.shape[0]
  groups = -(-size // length)
  a = jnp.pad(a, [(0, groups * length - size)] + [(0, 0)] * (a.ndim - 1))
  return a.reshape((groups, length) + a.shape[1:])


def sample_tokens(x, n_tokens: int, *, skip_positions: int = 0) -> jax.Array:
  """Evenly strided rows of ``x`` flattened to ``(N, d)`` (at most ``n_tokens``)."""
  x = jnp.asarray(x)
  if skip_positions:
    x = x[..., skip_positions:, :]
  x = x.reshape(-1, x.shape[-1])
  step = max(x.shape[0] // n_tokens, 1)
  return x[::step][:n_tokens]


def search_clip(kernel, x, spec: QuantSpec, *, n_grid: int = 20, max_shrink: float = 0.5) -> Optional[ClipRange]:
  """Per quantization group and output column, the range shrink with the least output error.

  For each shrink ``p`` in ``1, 1 - 1/n_grid, ...`` (down to ``1 - max_shrink``)
  the group's range is cut to ``p`` times min-max (``[-p amax, p amax]`` for
  symmetric specs, ``[p min, p max]`` around 0 otherwise), the clipped kernel
  quantized with ``spec``, and the error of each group's partial product
  ``x_g @ w_g`` measured on the tokens ``x``.

  Args:
    kernel: ``(in, out)`` weight (already AWQ-scaled, if it is).
    x: ``(N, in)`` sampled input tokens (already divided by the scales).
    spec: Group or channel granularity along axis 0.
    n_grid: Shrink steps per unit of range.
    max_shrink: Largest fraction of the range cut away.

  Returns:
    A `ClipRange`, or None for per-tensor specs (no per-group range to tune).

  Raises:
    ValueError: a kernel that is not 2-D or not along axis 0; concrete
      ``kernel`` or ``x`` holding NaN or inf; a bad ``max_shrink``.
  """
  _check_kernel_spec(kernel, spec, "search_clip")
  check_finite({"kernel": kernel, "x": x}, "awq.search_clip", "inputs", _ACT_ADVICE)
  if spec.granularity == "tensor":
    return None
  if not 0.0 <= max_shrink < 1.0:
    raise ValueError(f"search_clip: max_shrink={max_shrink!r}; allowed: a float in [0, 1).")
  w = _f32(kernel)
  x = _f32(x).reshape(-1, w.shape[0])
  length = spec.group_length(w.shape[0])
  spec.num_groups(w.shape[0])  # raises on sizes the spec cannot group
  xg = _groups(x.T, length)                        # (G, L, N)
  ref = jnp.einsum("gln,glo->gno", xg, _groups(w, length))
  wg = _groups(w, length)
  lo0 = jnp.minimum(jnp.min(wg, axis=1), 0.0)      # (G, out); the range always holds 0
  hi0 = jnp.maximum(jnp.max(wg, axis=1), 0.0)
  if spec.symmetric:
    hi0 = jnp.maximum(hi0, -lo0)
    lo0 = -hi0
  n_steps = max(int(max_shrink * n_grid), 1)
  shrinks = 1.0 - jnp.arange(n_steps, dtype=jnp.float32) / n_grid

  def err_for(p):
    lo = expand_to_groups(lo0 * p, spec, w.shape[0])
    hi = expand_to_groups(hi0 * p, spec, w.shape[0])
    q = fake_quant(jnp.clip(w, lo, hi), spec)
    out = jnp.einsum("gln,glo->gno", xg, _groups(q, length))
    return jnp.mean(jnp.square(out - ref), axis=1)  # (G, out)

  best = grid_search(err_for, shrinks, lo0.shape)
  return ClipRange(lo0 * best, hi0 * best, best)


def apply_clip(kernel, clip: Optional[ClipRange], spec: QuantSpec) -> jax.Array:
  """Clamps each group of ``kernel`` to its `ClipRange` (identity for None)."""
  if clip is None:
    return kernel
  lo = expand_to_groups(clip.lo, spec, kernel.shape[0])
  hi = expand_to_groups(clip.hi, spec, kernel.shape[0])
  return jnp.clip(_f32(kernel), lo, hi).astype(kernel.dtype)


# --- Folding: exact in float, so the float model's outputs do not change. ---

def scale_rows(kernel, s) -> jax.Array:
  """``s[:, None] * kernel``: scales the input rows of an ``(in, out)`` kernel."""
  return (_f32(kernel) * _f32(s)[:, None]).astype(kernel.dtype)


def fold_into_norm(norm_scale, s, norm_bias=None):
  """Divides a norm's output by ``s``: weight ``/ s`` (and bias ``/ s``).

  Valid for RMSNorm ``x / rms(x) * w`` and LayerNorm ``(x - mu) / sigma * w + b``.

  Returns:
    ``(new_scale, new_bias)`` (``new_bias`` None when ``norm_bias`` is None).
  """
  s = _f32(s)
  new_scale = (_f32(norm_scale) / s).astype(jnp.asarray(norm_scale).dtype)
  new_bias = None if norm_bias is None else (_f32(norm_bias) / s).astype(jnp.asarray(norm_bias).dtype)
  return new_scale, new_bias


def fold_into_columns(kernel, s, bias=None):
  """Divides a linear layer's outputs by ``s``: columns of ``kernel`` (and bias) ``/ s``.

  Returns:
    ``(new_kernel, new_bias)`` (``new_bias`` None when ``bias`` is None).
  """
  s = _f32(s)
  if kernel.shape[-1] != s.shape[0]:
    raise ValueError(f"fold_into_columns: kernel has {kernel.shape[-1]} output columns but s has "
                     f"{s.shape[0]} entries; they must match.")
  new_kernel = (_f32(kernel) / s[None, :]).astype(kernel.dtype)
  new_bias = None if bias is None else (_f32(bias) / s).astype(bias.dtype)
  return new_kernel, new_bias
