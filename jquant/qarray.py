"""`QArray`: a quantized tensor as a registered pytree, and the quantizers.

A `QArray` holds the packed integer payload, the scales and (asymmetric only)
integer zero points as pytree children, and the `QuantSpec`, the contraction
axis, its logical length and the original dtype as static metadata. Its
logical shape is derived from the payload, so it stays right under ``vmap``.

Example:
    >>> import jax, jax.numpy as jnp, jquant
    >>> w = jax.random.normal(jax.random.key(0), (256, 64))
    >>> spec = jquant.QuantSpec(bits=4, granularity="group", group_size=128)
    >>> q = jquant.quantize(w, spec)
    >>> q.qvalue.shape, q.scale.shape, q.nbytes       # two int4 per byte
    ((128, 64), (2, 64), 8704)
    >>> err = jnp.abs(jquant.dequantize(q) - w).max()
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jquant import packing
from jquant.spec import QuantSpec

_TINY = 1e-30  # keeps all-zero groups finite: their scale is 1 and codes 0


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class QArray:
  """A quantized array: packed codes, scales, zero points, static metadata.

  Attributes:
    qvalue: Packed payload: uint8 (``bits < 8``, or asymmetric 8-bit) or int8
      (symmetric 8-bit). Packed along ``axis`` (see `jquant.packing`); codes of
      symmetric specs below 8 bits are stored offset by ``2^(bits-1)``.
    scale: Float scales; the logical shape with the contraction axis replaced
      by the number of groups (1 for per-channel; all ones for per-tensor).
    zero_point: ``None`` (symmetric) or uint8 integer zero points like
      ``scale``.
    spec: The `QuantSpec` used.
    size: Logical length of the (flattened) contraction axis.
    axis: Contraction axis of the payload as a negative index (valid under
      added batch dims).
    dtype: The dtype `dequantize` returns.
    axis_shape: None for one contraction axis; for several adjacent ones
      (``QuantSpec(axis=(0, 1))``), their logical sizes. The payload holds
      them flattened into one axis (``prod(axis_shape) == size``); `shape`,
      `codes` and `dequantize` give the logical layout back.
  """

  qvalue: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array]
  spec: QuantSpec
  size: int
  axis: int
  dtype: np.dtype
  axis_shape: Optional[tuple] = None

  def tree_flatten(self):
    return (self.qvalue, self.scale, self.zero_point), (self.spec, self.size, self.axis, self.dtype,
                                                        self.axis_shape)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def stored_shape(self) -> tuple[int, ...]:
    """The shape with the contraction axes flattened into one (the payload's rank)."""
    shape = list(self.qvalue.shape)
    shape[self.axis] = self.size
    return tuple(shape)

  @property
  def shape(self) -> tuple[int, ...]:
    shape = self.stored_shape
    if self.axis_shape is None:
      return shape
    a = self.axis % len(shape)
    return shape[:a] + tuple(self.axis_shape) + shape[a + 1:]

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def bits(self) -> int:
    return self.spec.bits

  @property
  def nbytes(self) -> int:
    """Exact bytes held: payload + scales + zero points."""
    total = _nbytes(self.qvalue) + _nbytes(self.scale)
    return total + (_nbytes(self.zero_point) if self.zero_point is not None else 0)

  @property
  def sharding(self):
    return getattr(self.qvalue, "sharding", None)

  def codes(self) -> jax.Array:
    """The signed-or-unsigned integer codes (int32), unpacked, logical shape."""
    c = packing.unpack(self.qvalue, self.bits, self.size, self.axis, dtype=jnp.int32)
    if self.spec.symmetric and self.bits < 8:
      c = c - 2 ** (self.bits - 1)
    return c.reshape(self.shape)

  def dequantize(self, dtype=None) -> jax.Array:
    return dequantize(self, dtype)

  @classmethod
  def from_codes(cls, codes, scale, zero_point, spec: QuantSpec, dtype=jnp.float32) -> "QArray":
    """Packs integer codes that a solver computed (GPTQ, AWQ, QAT).

    Args:
      codes: Integers in [spec.qmin, spec.qmax], logical shape.
      scale: Scales shaped like the logical shape with the contraction axis
        (the flattened contraction axes) replaced by the group count.
      zero_point: Integer zero points like ``scale`` (asymmetric), else None.
      spec: The spec the codes follow.
      dtype: The dtype `dequantize` returns.
    """
    codes, spec, axis_shape = merge_contraction(jnp.asarray(codes), spec)
    axis = _normalize_axis(spec.axis, codes.ndim)
    codes = jnp.clip(codes.astype(jnp.int32), spec.qmin, spec.qmax)
    if spec.bits == 8:
      stored = codes.astype(jnp.int8 if spec.symmetric else jnp.uint8)
      payload = stored
    else:
      if spec.symmetric:
        codes = codes + 2 ** (spec.bits - 1)
      payload = packing.pack(codes, spec.bits, axis)
    zp = None
    if not spec.symmetric:
      if zero_point is None:
        raise ValueError("QArray.from_codes: an asymmetric spec needs zero_point, got None.")
      zp = jnp.clip(jnp.round(jnp.asarray(zero_point)), 0, spec.qmax).astype(jnp.uint8)
    return cls(payload, jnp.asarray(scale).astype(spec.jnp_scale_dtype), zp, spec,
               int(codes.shape[axis]), axis - codes.ndim, np.dtype(dtype), axis_shape)

  def __repr__(self):
    return (f"QArray(shape={self.shape}, bits={self.bits}, symmetric={self.spec.symmetric}, "
            f"granularity={self.spec.granularity!r}, group_size={self.spec.group_size}, "
            f"dtype={np.dtype(self.dtype).name})")


def to_matrix(w, k_axes) -> jax.Array:
  """A weight as the ``(K, N)`` matrix that solvers work on.

  The contraction axes ``k_axes`` (ascending, e.g. from
  `jquant.capture.contraction_axes`) are flattened row-major into K, the
  other axes, in order, into N: ``x @ to_matrix(w, k_axes)`` is the layer's
  product for the input ``x`` as `jquant.capture` records it.

  Example:
    >>> to_matrix(jnp.ones((4, 640, 256)), (1,)).shape        # Gemma's query kernel (heads, d, head_dim)
    (640, 1024)
  """
  w = jnp.asarray(w)
  k_axes = tuple(sorted(a % w.ndim for a in k_axes))
  free = tuple(a for a in range(w.ndim) if a not in k_axes)
  k = int(np.prod([w.shape[a] for a in k_axes]))
  return jnp.transpose(w, k_axes + free).reshape(k, -1)


def from_matrix(m, shape, k_axes) -> jax.Array:
  """Inverse of `to_matrix`: a ``(K, N)`` (or ``(G, N)`` per-group) matrix back to the weight's layout.

  With ``m`` of shape ``(G, N)`` (group parameters), the contraction axes
  collapse to one axis of length G at the first contraction axis' position,
  which is how `QArray` and `jquant.compute_scale_zero` lay out scales of a
  weight quantized along ``k_axes``.
  """
  shape = tuple(shape)
  k_axes = tuple(sorted(a % len(shape) for a in k_axes))
  free = tuple(a for a in range(len(shape)) if a not in k_axes)
  free_shape = tuple(shape[a] for a in free)
  k = int(np.prod([shape[a] for a in k_axes]))
  if m.shape[0] == k:  # full weight
    w = jnp.reshape(m, tuple(shape[a] for a in k_axes) + free_shape)
    return jnp.transpose(w, np.argsort(k_axes + free))
  # Group parameters: (G, N) -> (G, free...) -> G placed at the first contraction axis.
  g = jnp.reshape(m, (m.shape[0],) + free_shape)
  pos = sum(1 for a in free if a < k_axes[0])
  return jnp.moveaxis(g, 0, pos)


def _nbytes(a) -> int:
  return int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize


def _normalize_axis(axis: int, ndim: int) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"QuantSpec.axis={axis} is out of range for an array of rank {ndim}; "
                     f"allowed: {-ndim}..{ndim - 1}.")
  return axis % ndim


def merge_contraction(x, spec: QuantSpec):
  """Flattens several adjacent contraction axes of ``x`` into one.

  Returns:
    ``(x_merged, spec_merged, axis_shape)``: with one contraction axis, ``x``
    unchanged, the spec with that (non-negative) axis and None; with several,
    ``x`` reshaped so that they form one axis at the first one's position, the
    spec naming it, and the axes' logical sizes.

  Example:
    >>> xm, sm, shape = merge_contraction(jnp.ones((4, 64, 8)), QuantSpec(axis=(0, 1)))
    >>> xm.shape, sm.axis, shape
    ((256, 8), 0, (4, 64))
  """
  axes = spec.axes(jnp.ndim(x))
  if len(axes) == 1:
    return x, (spec if spec.axis == axes[0] else spec.replace(axis=axes[0])), None
  a0, a1 = axes[0], axes[-1] + 1
  shape = jnp.shape(x)
  axis_shape = tuple(int(d) for d in shape[a0:a1])
  merged = jnp.reshape(x, shape[:a0] + (int(np.prod(axis_shape)),) + shape[a1:])
  return merged, spec.replace(axis=a0), axis_shape


def _check_input(x, spec: QuantSpec, fn: str):
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"{fn}: spec must be a jquant.QuantSpec, got {type(spec).__name__}.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{fn}: x has dtype {x.dtype}; allowed: floating dtypes (float32, bfloat16, "
                    "float16, float64). Integer arrays are already quantized.")
  if x.ndim == 0:
    raise ValueError(f"{fn}: x is a scalar; allowed: arrays of rank >= 1.")
  if not isinstance(x, jax.core.Tracer) and not bool(jnp.isfinite(x).all()):
    bad = int((~jnp.isfinite(x)).sum())
    raise ValueError(f"{fn}: x holds {bad} non-finite values (NaN or inf); allowed: finite values only. "
                     "Clean or clip the tensor before quantizing it.")
  return x


def _grouped(x, spec: QuantSpec, axis: int):
  """Reshapes x to (G, L, rest) groups along ``axis`` (edge-padding a short last group)."""
  xm = jnp.moveaxis(x, axis, 0)
  size, rest = xm.shape[0], xm.shape[1:]
  if spec.granularity == "tensor":
    return xm.reshape(1, -1), size, rest
  length = spec.group_length(size)
  groups = spec.num_groups(size)
  pad = groups * length - size
  if pad:
    # Repeating the last element keeps the short group's min and max unchanged.
    xm = jnp.pad(xm, [(0, pad)] + [(0, 0)] * len(rest), mode="edge")
  return xm.reshape((groups, length) + rest), size, rest


def _ungroup(g, size: int, rest, axis: int, spec: QuantSpec):
  """Inverse of `_grouped` for arrays shaped like the grouped input."""
  if spec.granularity == "tensor":
    return jnp.moveaxis(g.reshape((size,) + rest), 0, axis)
  flat = g.reshape((g.shape[0] * g.shape[1],) + rest)[:size]
  return jnp.moveaxis(flat, 0, axis)


def _range_to_scale_zero(lo, hi, spec: QuantSpec):
  if spec.symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    scale = amax / spec.qmax
    scale = jnp.where(scale > _TINY, scale, 1.0)
    return scale, None
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)  # zero stays exactly representable
  scale = (hi - lo) / spec.qmax
  scale = jnp.where(scale > _TINY, scale, 1.0)
  zero = jnp.clip(jnp.round(-lo / scale), 0, spec.qmax)
  return scale, zero


def _quantize_with(g, scale, zero, spec: QuantSpec, key=None):
  v = g / scale
  if spec.rounding == "stochastic":
    if key is None:
      raise ValueError("quantize: rounding='stochastic' needs key=jax.random.key(...), got key=None.")
    v = jnp.floor(v + jax.random.uniform(key, v.shape, v.dtype))
  else:
    v = jnp.round(v)
  if zero is not None:
    v = v + zero
  return jnp.clip(v, spec.qmin, spec.qmax)


def _dequantize_with(c, scale, zero):
  return (c - zero) * scale if zero is not None else c * scale


def _mse_scale_zero(g, lo, hi, spec: QuantSpec):
  """Per group, the range shrink with the least sum |x - q(x)|^p (GPTQ's grid)."""
  shrinks = 1.0 - spec.mse_max_shrink * jnp.arange(spec.mse_grid, dtype=jnp.float32) / spec.mse_grid

  def err_for(p):
    scale, zero = _range_to_scale_zero(lo * p, hi * p, spec)
    deq = _dequantize_with(_quantize_with(g, scale, zero, spec), scale, zero)
    return jnp.sum(jnp.abs(deq - g) ** spec.mse_norm, axis=1, keepdims=True)

  best_p = grid_search(err_for, shrinks, lo.shape)
  return _range_to_scale_zero(lo * best_p, hi * best_p, spec)


def grid_search(err_fn, grid, shape):
  """Elementwise argmin over a 1-D grid: for each entry of ``shape``, the grid
  value ``p`` with the least ``err_fn(p)`` (the first one on ties; 1.0 if every
  error is infinite). One `lax.scan`, so memory stays at one candidate.

  Example:
    >>> best = grid_search(lambda p: (x - p) ** 2, jnp.linspace(0, 1, 11), x.shape)
  """

  def body(carry, p):
    best_err, best_p = carry
    err = err_fn(p)
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, p, best_p)), None

  init = (jnp.full(shape, jnp.inf, jnp.float32), jnp.ones(shape, jnp.float32))
  (_, best), _ = jax.lax.scan(body, init, grid)
  return best


def _group_scale_zero(g, spec: QuantSpec):
  """Scale and zero point per group of grouped float32 data ``g`` (G, L, rest)."""
  lo = jnp.min(g, axis=1, keepdims=True) * spec.clip_ratio
  hi = jnp.max(g, axis=1, keepdims=True) * spec.clip_ratio
  if spec.clip == "mse":
    return _mse_scale_zero(g, lo, hi, spec)
  return _range_to_scale_zero(lo, hi, spec)


def _stored_shape(s, x_shape, axis, spec):
  """From grouped (G, 1, rest) to the logical shape with axis -> G."""
  s = jnp.moveaxis(s[:, 0], 0, axis)
  if spec.granularity == "tensor":
    s = s.reshape((1,) * len(x_shape))
  return s


def compute_scale_zero(x, spec: QuantSpec):
  """Scales and zero points of ``x`` under ``spec`` (min-max or MSE ranges).

  Returns:
    ``(scale, zero_point)`` shaped like ``x`` with the contraction axis (the
    flattened contraction axes) replaced by the group count (all ones for
    per-tensor). ``zero_point`` is None for symmetric specs and a float array
    of integers otherwise. Scales are float32 here; `QArray` stores them in
    ``spec.scale_dtype``.
  """
  x = _check_input(x, spec, "compute_scale_zero")
  x, spec, _ = merge_contraction(x, spec)
  axis = _normalize_axis(spec.axis, x.ndim)
  g, _, _ = _grouped(x.astype(jnp.float32), spec, axis)
  scale, zero = _group_scale_zero(g, spec)
  return (_stored_shape(scale, x.shape, axis, spec),
          None if zero is None else _stored_shape(zero, x.shape, axis, spec))


def expand_to_groups(s, spec: QuantSpec, size: int):
  """Broadcasts per-group params (axis -> G) back to ``size`` along ``spec.axis``."""
  axis = _normalize_axis(spec.axis, s.ndim)
  if spec.granularity != "group":
    return s
  return jnp.take(s, jnp.arange(size) // spec.group_size, axis=axis)


def quantize_values(x, spec: QuantSpec, *, key=None, scale=None, zero_point=None):
  """The quantizer's math without packing.

  Args:
    x: Float array.
    spec: How to quantize.
    key: PRNG key for ``rounding="stochastic"``.
    scale, zero_point: Use these group parameters instead of computing them
      (e.g. learned step sizes); shaped as `compute_scale_zero` returns.

  Returns:
    ``(codes, scale, zero_point)``: int32 codes in [spec.qmin, spec.qmax] with
    the shape of ``x``, and the parameters used.
  """
  x = _check_input(x, spec, "quantize")
  logical_shape = x.shape
  x, spec, _ = merge_contraction(x, spec)
  axis = _normalize_axis(spec.axis, x.ndim)
  if scale is None:
    scale, zero_point = compute_scale_zero(x, spec)
  # Cast first: the codes must be computed with the scale that will be stored.
  scale = scale.astype(spec.jnp_scale_dtype).astype(jnp.float32)
  s = expand_to_groups(scale, spec, x.shape[axis])
  z = None if zero_point is None else expand_to_groups(zero_point.astype(jnp.float32), spec, x.shape[axis])
  codes = _quantize_with(x.astype(jnp.float32), s, z, spec, key)
  return codes.astype(jnp.int32).reshape(logical_shape), scale, zero_point


def quantize(x, spec: QuantSpec, *, key=None) -> QArray:
  """Quantizes ``x`` into a packed `QArray` (pure, jit-able).

  Example:
    >>> q = jquant.quantize(jnp.ones((64, 8)), jquant.QuantSpec(bits=2))
    >>> q.qvalue.shape, q.qvalue.dtype            # four int2 per byte
    ((16, 8), dtype('uint8'))
  """
  codes, scale, zero = quantize_values(x, spec, key=key)
  return QArray.from_codes(codes, scale, zero, spec, jnp.asarray(x).dtype)


def dequantize(q: QArray, dtype=None) -> jax.Array:
  """The float array a `QArray` stands for (``q.dtype`` unless ``dtype``)."""
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize: expected a jquant.QArray, got {type(q).__name__}.")
  c = q.codes().astype(jnp.float32).reshape(q.qvalue.shape[:q.axis % q.qvalue.ndim] + (q.size,) +
                                              q.qvalue.shape[q.axis % q.qvalue.ndim + 1:])
  spec = dataclasses.replace(q.spec, axis=q.axis)
  s = expand_to_groups(q.scale.astype(jnp.float32), spec, q.size)
  z = None if q.zero_point is None else expand_to_groups(q.zero_point.astype(jnp.float32), spec, q.size)
  return _dequantize_with(c, s, z).astype(dtype or q.dtype).reshape(q.shape)


@jax.custom_vjp
def _ste(x, fq, mask):
  del x, mask
  return fq


def _ste_fwd(x, fq, mask):
  return fq, mask


def _ste_bwd(mask, g):
  return g * mask, None, None


_ste.defvjp(_ste_fwd, _ste_bwd)


def fake_quant(x, spec: QuantSpec, *, key=None) -> jax.Array:
  """``dequantize(quantize(x))`` with a straight-through gradient.

  The backward pass is the identity for elements inside the clipping range
  and zero for elements clipped away (range shrunk by ``clip_ratio`` or the
  MSE search). Scales are treated as constants of the backward pass.

  Example:
    >>> g = jax.grad(lambda w: jquant.fake_quant(w, spec).sum())(w)
  """
  x = _check_input(x, spec, "fake_quant")
  logical_shape = x.shape
  x, spec, _ = merge_contraction(x, spec)
  codes, scale, zero = quantize_values(jax.lax.stop_gradient(x), spec, key=key)
  axis = _normalize_axis(spec.axis, x.ndim)
  s = expand_to_groups(scale.astype(jnp.float32), spec, x.shape[axis])
  z = None if zero is None else expand_to_groups(zero.astype(jnp.float32), spec, x.shape[axis])
  fq = _dequantize_with(codes.astype(jnp.float32), s, z)
  # Inside the range means: the unclipped code would lie within [qmin, qmax].
  raw = x.astype(jnp.float32) / s + (0.0 if z is None else z)
  mask = ((raw >= spec.qmin - 0.5) & (raw <= spec.qmax + 0.5)).astype(x.dtype)
  return _ste(x, fq.astype(x.dtype), jax.lax.stop_gradient(mask)).reshape(logical_shape)
