"""Activation observers: pure functions over mergeable running statistics.

An observer is a frozen dataclass (its configuration) whose methods are pure
functions over a `NamedTuple` state:

* ``init(shape)``: the empty state for activations of shape ``(..., K)``;
* ``observe(x)``: the state of one batch;
* ``merge(a, b)``: the state of ``a``'s data followed by ``b``'s data;
* ``update(state, x, axis_name=None)``: ``merge(state, observe(x))``; with
  ``axis_name`` the batch statistic is first reduced over that mapped axis
  (``pmin``/``pmax``/``psum``), so a batch sharded over a mesh gives every
  device the state of the whole batch;
* ``all_reduce(state, axis_name)``: merges the states held by the devices of a
  mapped axis (the collective form of ``merge``);
* ``amax(state)``: the symmetric clipping value that the int8 scale is derived
  from (``scale = amax / 127``).

``merge`` is associative (two halves merged equal the whole), so states can be
computed per batch, per host or per device and combined in any grouping.
Min-max and histogram states are also commutative and merge exactly (integer
counts, min/max); the moving average is an ordered, bias-corrected EMA whose
merge is associative up to float rounding.

Per-tensor observers reduce over every axis; per-channel observers keep the
last axis (the Dense input features ``K``), as SmoothQuant needs.

Histograms and ranges that differ. A histogram over ``[0, amax]`` cannot be
merged with one over ``[0, amax']`` without re-binning, and re-binning a
linear histogram onto a coarser grid is only approximate unless the grids
nest. Two common ways out are (a) a first pass that fixes the range, then a
second pass that fills a fixed histogram (two passes, and outliers that only
appear in later data fall in the last bin), or (b) a mergeable layout. This
module uses (b): bins are uniform in ``log2|x|`` over a fixed, universal span
(``2^min_exp`` to ``2^max_exp``, ``bins_per_octave`` per octave). Every state
uses the same edges, so merging is a plain integer sum, exact, associative
and commutative, with no first pass; the relative resolution is constant
(``2^(1/bins_per_octave) - 1``, 2.2% at the default 32), which also keeps
small activations resolved when a few massive ones (an attention sink)
stretch the range by three orders of magnitude, where a 2048-bin linear
histogram would lump all ordinary activations into its first few bins. The
exact ``amax`` is carried next to the counts. Counts are int32: at most
``2^31 - 1`` activations per bin.

Example:
  >>> import jax.numpy as jnp
  >>> obs = PercentileObserver(percentile=99.9)
  >>> x = jnp.linspace(-4.0, 4.0, 1000).reshape(10, 100)
  >>> s = obs.merge(obs.observe(x[:5]), obs.observe(x[5:]))
  >>> bool(jnp.all(s.counts == obs.observe(x).counts))
  True
  >>> float(obs.amax(s)) <= 4.0
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

GRANULARITIES = ("tensor", "channel")
QMAX_INT8 = 127


def _check_granularity(owner: str, granularity: str):
  if granularity not in GRANULARITIES:
    raise ValueError(f"{owner}: granularity={granularity!r}; allowed: {GRANULARITIES}.")


def _stat_shape(shape, granularity: str) -> tuple:
  """Shape of a per-tensor (``()``) or per-channel (``(K,)``) statistic."""
  if granularity == "tensor":
    return ()
  if len(shape) < 1:
    raise ValueError(f"per-channel observer needs activations with a channel axis, got shape {tuple(shape)}.")
  return (shape[-1],)


def _reduce_axes(x, granularity: str) -> tuple:
  return tuple(range(x.ndim)) if granularity == "tensor" else tuple(range(x.ndim - 1))


# ---------------------------------------------------------------------------
# Min-max.


class MinMaxState(NamedTuple):
  """Running minimum and maximum (``+inf``/``-inf`` when nothing was seen)."""
  min: jax.Array
  max: jax.Array


@dataclasses.dataclass(frozen=True)
class MinMaxObserver:
  """Exact running min and max, per tensor or per channel.

  Attributes:
    granularity: ``"tensor"`` or ``"channel"`` (last axis kept).

  Example:
    >>> obs = MinMaxObserver(granularity="channel")
    >>> s = obs.observe(jnp.array([[1.0, -3.0], [-2.0, 0.5]]))
    >>> obs.amax(s).tolist()
    [2.0, 3.0]
  """

  granularity: str = "tensor"

  def __post_init__(self):
    _check_granularity("MinMaxObserver", self.granularity)

  def init(self, shape) -> MinMaxState:
    s = _stat_shape(shape, self.granularity)
    return MinMaxState(jnp.full(s, jnp.inf, jnp.float32), jnp.full(s, -jnp.inf, jnp.float32))

  def observe(self, x) -> MinMaxState:
    x = jnp.asarray(x, jnp.float32)
    axes = _reduce_axes(x, self.granularity)
    return MinMaxState(jnp.min(x, axis=axes), jnp.max(x, axis=axes))

  def merge(self, a: MinMaxState, b: MinMaxState) -> MinMaxState:
    return MinMaxState(jnp.minimum(a.min, b.min), jnp.maximum(a.max, b.max))

  def all_reduce(self, state: MinMaxState, axis_name) -> MinMaxState:
    return MinMaxState(jax.lax.pmin(state.min, axis_name), jax.lax.pmax(state.max, axis_name))

  def update(self, state, x, axis_name=None) -> MinMaxState:
    b = self.observe(x)
    if axis_name is not None:
      b = self.all_reduce(b, axis_name)
    return self.merge(state, b)

  def amax(self, state: MinMaxState) -> jax.Array:
    a = jnp.maximum(jnp.abs(state.min), jnp.abs(state.max))
    return jnp.where(jnp.isfinite(a), a, 0.0)


# ---------------------------------------------------------------------------
# Moving-average min-max.


class MovingAverageState(NamedTuple):
  """Decayed sums of per-batch minima / maxima and of the weights.

  With decay ``d`` and batches ``1..n``: ``min_sum = sum_i d^(n-i) min_i``,
  ``weight = sum_i d^(n-i)``; the averaged minimum is ``min_sum / weight``.
  """
  min_sum: jax.Array
  max_sum: jax.Array
  weight: jax.Array
  count: jax.Array  # int32 number of batches


@dataclasses.dataclass(frozen=True)
class MovingAverageMinMaxObserver:
  """Exponential moving average of per-batch min and max (bias corrected).

  The classic update ``m <- m + c (v - m)`` depends on the order of updates
  and cannot be merged; keeping the decayed sum and the decayed weight
  separately makes it a monoid: ``merge(a, b)`` (``a`` earlier) is
  ``a * d^count_b + b``. The result equals the bias-corrected EMA
  ``sum_i d^(n-i) v_i / sum_i d^(n-i)`` with ``d = 1 - averaging_constant``.
  Merging is associative up to float rounding and not commutative (order
  matters, as for any moving average).

  Across devices, ``update(..., axis_name=...)`` reduces each batch's min/max
  over the mapped axis before the EMA step (all devices see the same step);
  ``all_reduce`` is therefore only defined for single-batch states.

  Attributes:
    granularity: ``"tensor"`` or ``"channel"``.
    averaging_constant: ``c`` in (0, 1]; 1 keeps only the last batch.

  Example:
    >>> obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    >>> s = obs.merge(obs.observe(jnp.array([2.0])), obs.observe(jnp.array([4.0])))
    >>> round(float(obs.amax(s)), 4)   # (0.5 * 2 + 4) / 1.5
    3.3333
  """

  granularity: str = "tensor"
  averaging_constant: float = 0.01

  def __post_init__(self):
    _check_granularity("MovingAverageMinMaxObserver", self.granularity)
    if not 0.0 < float(self.averaging_constant) <= 1.0:
      raise ValueError(
          f"MovingAverageMinMaxObserver: averaging_constant={self.averaging_constant!r}; allowed: (0, 1].")

  @property
  def decay(self) -> float:
    return 1.0 - float(self.averaging_constant)

  def init(self, shape) -> MovingAverageState:
    s = _stat_shape(shape, self.granularity)
    z = jnp.zeros(s, jnp.float32)
    return MovingAverageState(z, z, z, jnp.zeros((), jnp.int32))

  def observe(self, x) -> MovingAverageState:
    mm = MinMaxObserver(self.granularity).observe(x)
    one = jnp.ones(mm.min.shape, jnp.float32)  # not ones_like: stays replicated under shard_map
    return MovingAverageState(mm.min, mm.max, one, jnp.ones((), jnp.int32))

  def merge(self, a: MovingAverageState, b: MovingAverageState) -> MovingAverageState:
    f = jnp.power(jnp.float32(self.decay), b.count.astype(jnp.float32))
    return MovingAverageState(a.min_sum * f + b.min_sum, a.max_sum * f + b.max_sum, a.weight * f + b.weight,
                              a.count + b.count)

  def all_reduce(self, state: MovingAverageState, axis_name) -> MovingAverageState:
    # Same-step observations of one batch split over devices: min of mins, max of maxes.
    return state._replace(min_sum=jax.lax.pmin(state.min_sum, axis_name),
                          max_sum=jax.lax.pmax(state.max_sum, axis_name))

  def update(self, state, x, axis_name=None) -> MovingAverageState:
    b = self.observe(x)
    if axis_name is not None:
      b = self.all_reduce(b, axis_name)
    return self.merge(state, b)

  def amax(self, state: MovingAverageState) -> jax.Array:
    w = jnp.where(state.weight > 0, state.weight, 1.0)
    return jnp.maximum(jnp.abs(state.min_sum / w), jnp.abs(state.max_sum / w))


# ---------------------------------------------------------------------------
# Log-binned histogram (shared by the percentile and MSE observers).


class HistogramState(NamedTuple):
  """Counts of ``|x|`` in log2-uniform bins plus the exact running ``max|x|``.

  ``counts`` has shape ``stat_shape + (n_bins,)``; bin 0 also holds zeros and
  values below ``2^min_exp``, the last bin values at or above ``2^max_exp``.
  """
  counts: jax.Array  # int32
  amax: jax.Array    # float32, 0 when nothing was seen


@dataclasses.dataclass(frozen=True)
class _HistogramObserver:
  granularity: str = "tensor"
  min_exp: int = -24
  max_exp: int = 24
  bins_per_octave: int = 32

  def __post_init__(self):
    name = type(self).__name__
    _check_granularity(name, self.granularity)
    if not (isinstance(self.bins_per_octave, int) and self.bins_per_octave >= 1):
      raise ValueError(f"{name}: bins_per_octave={self.bins_per_octave!r}; allowed: a positive int.")
    if not (isinstance(self.min_exp, int) and isinstance(self.max_exp, int) and self.min_exp < self.max_exp):
      raise ValueError(f"{name}: min_exp={self.min_exp!r}, max_exp={self.max_exp!r}; allowed: ints with "
                       "min_exp < max_exp.")

  @property
  def n_bins(self) -> int:
    return (self.max_exp - self.min_exp) * self.bins_per_octave

  def bin_edges(self) -> np.ndarray:
    """Upper edges of the bins (float64), ``2^(min_exp + (i+1)/bins_per_octave)``."""
    i = np.arange(1, self.n_bins + 1, dtype=np.float64)
    return np.exp2(self.min_exp + i / self.bins_per_octave)

  def bin_index(self, x) -> jax.Array:
    """Bin of every element of ``|x|`` (int32, same shape)."""
    a = jnp.abs(jnp.asarray(x, jnp.float32))
    # log2(0) = -inf lands in bin 0 after the clip; the cast of a clipped float is exact.
    pos = jnp.floor((jnp.log2(a) - self.min_exp) * self.bins_per_octave)
    return jnp.clip(pos, 0, self.n_bins - 1).astype(jnp.int32)

  def init(self, shape) -> HistogramState:
    s = _stat_shape(shape, self.granularity)
    return HistogramState(jnp.zeros(s + (self.n_bins,), jnp.int32), jnp.zeros(s, jnp.float32))

  def observe(self, x) -> HistogramState:
    x = jnp.asarray(x, jnp.float32)
    idx = self.bin_index(x)
    nb = self.n_bins
    amax = jnp.max(jnp.abs(x), axis=_reduce_axes(x, self.granularity))
    if self.granularity == "tensor":
      counts = jnp.bincount(idx.ravel(), length=nb).astype(jnp.int32)
    else:
      k = x.shape[-1]
      flat = (idx.reshape(-1, k) + jnp.arange(k, dtype=jnp.int32) * nb).ravel()
      counts = jnp.bincount(flat, length=k * nb).astype(jnp.int32).reshape(k, nb)
    return HistogramState(counts, amax)

  def merge(self, a: HistogramState, b: HistogramState) -> HistogramState:
    return HistogramState(a.counts + b.counts, jnp.maximum(a.amax, b.amax))

  def all_reduce(self, state: HistogramState, axis_name) -> HistogramState:
    return HistogramState(jax.lax.psum(state.counts, axis_name), jax.lax.pmax(state.amax, axis_name))

  def update(self, state, x, axis_name=None) -> HistogramState:
    b = self.observe(x)
    if axis_name is not None:
      b = self.all_reduce(b, axis_name)
    return self.merge(state, b)

  def _finalize(self, state: HistogramState, fn) -> jax.Array:
    """Applies the host-side (float64 NumPy) ``fn(counts_1d, amax)`` per channel."""
    counts = np.asarray(jax.device_get(state.counts), np.float64)
    amax = np.asarray(jax.device_get(state.amax), np.float64)
    flat_c = counts.reshape(-1, self.n_bins)
    flat_a = amax.reshape(-1)
    out = np.array([fn(c, a) if a > 0 else 0.0 for c, a in zip(flat_c, flat_a)], np.float64)
    return jnp.asarray(out.reshape(amax.shape), jnp.float32)


@dataclasses.dataclass(frozen=True)
class PercentileObserver(_HistogramObserver):
  """Clips at a percentile of ``|x|``, from a log-binned histogram.

  The clipping value is the upper edge of the bin where the cumulative count
  reaches ``percentile``% of all values (at most the exact ``max|x|``), so it
  over-estimates the true percentile by at most one bin (2.2% by default).

  Attributes:
    percentile: In (0, 100]; 100 is min-max.
    granularity, min_exp, max_exp, bins_per_octave: histogram layout (module
      docstring). Per-channel histograms cost ``K * n_bins`` int32 each.

  Example:
    >>> obs = PercentileObserver(percentile=99.0)
    >>> x = jnp.concatenate([jnp.ones(990), 100.0 * jnp.ones(10)])
    >>> float(obs.amax(obs.observe(x))) < 1.03
    True
  """

  percentile: float = 99.99

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 < float(self.percentile) <= 100.0:
      raise ValueError(f"PercentileObserver: percentile={self.percentile!r}; allowed: (0, 100].")

  def amax(self, state: HistogramState) -> jax.Array:
    edges = self.bin_edges()
    q = float(self.percentile) / 100.0

    def fn(c, a):
      cum = np.cumsum(c)
      j = int(np.searchsorted(cum, q * cum[-1], side="left"))
      return min(edges[min(j, len(edges) - 1)], a)

    return self._finalize(state, fn)


@dataclasses.dataclass(frozen=True)
class MSEObserver(_HistogramObserver):
  """The clipping value with the least expected int8 error, from a log histogram.

  For a candidate clip ``c`` (every bin edge up to ``max|x|``, and ``max|x|``)
  with step ``s = c / qmax``, a value ``x`` from the histogram costs
  ``(x - c)^2`` if clipped (``x > c``), ``x^2`` if it rounds to zero
  (``x < s/2``) and the uniform rounding noise ``s^2 / 12`` otherwise; each bin
  is represented by its midpoint. Prefix sums make the search O(n_bins) per
  tensor or channel (host side, float64).

  Attributes:
    qmax: Largest code (127 for symmetric int8).
    granularity, min_exp, max_exp, bins_per_octave: histogram layout.

  Example:
    >>> obs = MSEObserver()
    >>> x = jnp.concatenate([jax.random.normal(jax.random.key(0), (10000,)), jnp.array([1000.0])])
    >>> float(obs.amax(obs.observe(x))) < 100.0
    True
  """

  qmax: int = QMAX_INT8

  def amax(self, state: HistogramState) -> jax.Array:
    edges = self.bin_edges()
    lower = np.concatenate([[0.0], edges[:-1]])
    mid = 0.5 * (lower + edges)
    # Bins whose whole range is below s/2 = c/(2 qmax) round to zero: an index shift, since bins are log-uniform.
    shift = int(math.ceil(math.log2(2 * self.qmax) * self.bins_per_octave))

    def fn(c, a):
      n = len(c)
      top = int(np.searchsorted(edges, a, side="left"))  # bin holding amax
      top = min(top, n - 1)
      x = mid.copy()
      x[top] = 0.5 * (lower[top] + a)
      m1, m2 = c * x, c * x * x
      c0, c1, c2 = np.cumsum(c), np.cumsum(m1), np.cumsum(m2)
      cand = np.concatenate([edges[:top], [a]])  # candidate j clips everything in bins > j
      j = np.arange(top + 1)
      # Suffix sums over bins > j, computed directly (no cancellation against totals).
      r0 = np.concatenate([np.cumsum(c[::-1])[::-1][1:], [0.0]])
      r1 = np.concatenate([np.cumsum(m1[::-1])[::-1][1:], [0.0]])
      r2 = np.concatenate([np.cumsum(m2[::-1])[::-1][1:], [0.0]])
      clipped = np.maximum(r2[j] - 2 * cand * r1[j] + cand**2 * r0[j], 0.0)
      k = j - shift
      kk = np.clip(k, 0, None)
      zero = np.where(k >= 0, c2[kk], 0.0)
      step = cand / self.qmax
      noise = (c0[j] - np.where(k >= 0, c0[kk], 0.0)) * step**2 / 12.0
      err = clipped + zero + noise
      return float(cand[int(np.argmin(err))])

    return self._finalize(state, fn)


Observer = Any  # any of the observer dataclasses above


def observer_by_name(name: str, granularity: str = "tensor", **kwargs) -> Observer:
  """Builds an observer from a short name: minmax, moving_average, percentile, mse."""
  table = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
           "percentile": PercentileObserver, "mse": MSEObserver}
  if name not in table:
    raise ValueError(f"observer_by_name: name={name!r}; allowed: {tuple(table)}.")
  return table[name](granularity=granularity, **kwargs)
