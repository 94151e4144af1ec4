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

GGUF grids (`jquant.gguf`) use three more spec features: float16 scales,
float mins (``x = scale * q - min``) and two-level scales (integer group
scales under float16 super-group scales, see `jquant.twolevel`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jquant import packing, twolevel
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
      Symmetric scales carry the sign of the group's largest-magnitude value
      under the default ``symmetric_scale="signed"`` (see `jquant.QuantSpec`).
      Two-level specs (``spec.scale_bits``): the group scale *codes*, stored
      unsigned (offset by ``2^(scale_bits-1)`` when signed) and packed
      densely at ``scale_bits`` along ``axis``.
    zero_point: ``None`` (symmetric), uint8 integer zero points like
      ``scale``, float mins in ``scale_dtype`` (``offset="min"``), or the
      packed min codes of two-level specs.
    spec: The `QuantSpec` used.
    size: Logical length of the (flattened) contraction axis.
    axis: Contraction axis of the payload as a negative index (valid under
      added batch dims).
    dtype: The dtype `dequantize` returns.
    axis_shape: None for one contraction axis; for several adjacent ones
      (``QuantSpec(axis=(0, 1))``), their logical sizes. The payload holds
      them flattened into one axis (``prod(axis_shape) == size``); `shape`,
      `codes` and `dequantize` give the logical layout back.
    super_scale: Two-level specs only: super-group scales ``d`` in
      ``scale_dtype``, the logical shape with the contraction axis replaced
      by the super-group count. None otherwise.
    super_min: Two-level specs with mins only: super-group mins ``dmin``
      like ``super_scale``. None otherwise.
  """

  qvalue: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array]
  spec: QuantSpec
  size: int
  axis: int
  dtype: np.dtype
  axis_shape: Optional[tuple] = None
  super_scale: Optional[jax.Array] = None
  super_min: Optional[jax.Array] = None

  def tree_flatten(self):
    children = (self.qvalue, self.scale, self.zero_point)
    if self.spec.two_level:  # one-level QArrays keep their three children (same tree structure as before)
      children += (self.super_scale, self.super_min)
    return children, (self.spec, self.size, self.axis, self.dtype, self.axis_shape)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children[:3], *aux, *children[3:])

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
    """Exact bytes held: payload + scales + zero points (+ super-group scales and mins)."""
    total = _nbytes(self.qvalue) + _nbytes(self.scale)
    return total + sum(_nbytes(a) for a in (self.zero_point, self.super_scale, self.super_min) if a is not None)

  @property
  def sharding(self):
    return getattr(self.qvalue, "sharding", None)

  def codes(self) -> jax.Array:
    """The signed-or-unsigned integer codes (int32), unpacked, logical shape."""
    c = packing.unpack(self.qvalue, self.bits, self.size, self.axis, dtype=jnp.int32, dense=self.spec.dense_pack)
    if self.spec.symmetric and self.bits < 8:
      c = c - 2 ** (self.bits - 1)
    return c.reshape(self.shape)

  def dequantize(self, dtype=None) -> jax.Array:
    return dequantize(self, dtype)

  @property
  def num_groups(self) -> int:
    """Groups along the (flattened) contraction axis."""
    return self.spec.num_groups(self.size)

  def scale_codes(self) -> tuple[jax.Array, Optional[jax.Array]]:
    """Two-level specs: the int32 group scale codes and min codes (None without mins), group layout."""
    if not self.spec.two_level:
      raise ValueError("QArray.scale_codes: this QArray has one-level scales (spec.scale_bits=None).")
    sc = twolevel.unpack_codes(self.scale, self.spec, self.num_groups, self.axis, signed=self.spec.symmetric)
    m = None if self.zero_point is None else twolevel.unpack_codes(self.zero_point, self.spec, self.num_groups,
                                                                   self.axis, signed=False)
    return sc, m

  def group_params(self) -> tuple[jax.Array, Optional[jax.Array]]:
    """Float32 ``(scale, zero_point_or_min)`` per group as `jquant.compute_scale_zero` lays them out.

    One-level: the stored values in float32. Two-level: the effective
    ``d * sc`` and ``dmin * m``, exactly as GGML computes them.
    """
    if not self.spec.two_level:
      return (self.scale.astype(jnp.float32),
              None if self.zero_point is None else self.zero_point.astype(jnp.float32))
    sc, m = self.scale_codes()
    a = self.axis % self.scale.ndim

    def eff(codes, sup):
      out = twolevel.combine(jnp.moveaxis(codes, a, 0), jnp.moveaxis(sup, a, 0), self.spec)
      return jnp.moveaxis(out, 0, a)

    return eff(sc, self.super_scale), None if m is None else eff(m, self.super_min)

  @classmethod
  def from_codes(cls, codes, scale, zero_point, spec: QuantSpec, dtype=jnp.float32) -> "QArray":
    """Packs integer codes that a solver computed (GPTQ, AWQ, QAT).

    Args:
      codes: Integers in [spec.qmin, spec.qmax], logical shape.
      scale: Scales shaped like the logical shape with the contraction axis
        (the flattened contraction axes) replaced by the group count. For
        two-level specs the effective scales ``d * sc`` (float32), as
        `jquant.compute_scale_zero` returns them.
      zero_point: Integer zero points like ``scale`` (asymmetric), float mins
        (``offset="min"``; two-level: effective ``dmin * m``), else None.
      spec: The spec the codes follow.
      dtype: The dtype `dequantize` returns.

    Raises:
      ValueError: two-level effective scales (or mins) that are not on the
        spec's grid (no float16 ``d`` and integer codes reproduce them).
        Under ``jit`` this cannot raise: such super-groups get a NaN scale.
    """
    codes, spec, axis_shape = merge_contraction(jnp.asarray(codes), spec)
    axis = _normalize_axis(spec.axis, codes.ndim)
    if not spec.symmetric and zero_point is None:
      raise ValueError("QArray.from_codes: an asymmetric spec needs zero_point, got None.")
    if spec.two_level:
      parts = [_decomposed(scale, spec, axis, spec.symmetric, "scale")]
      parts.append(None if spec.symmetric else _decomposed(zero_point, spec, axis, False, "zero_point (mins)"))
      sc, d = parts[0]
      m, dmin = parts[1] if parts[1] is not None else (None, None)
      return cls.from_two_level(codes, sc, d, m, dmin, spec, dtype, axis_shape=axis_shape)
    payload = _pack_codes(codes, spec, axis)
    zp = None
    if spec.float_min:
      zp = _as_stored(jnp.asarray(zero_point, jnp.float32), spec).astype(spec.jnp_scale_dtype)
    elif not spec.symmetric:
      zp = jnp.clip(jnp.round(jnp.asarray(zero_point)), 0, spec.qmax).astype(jnp.uint8)
    scale = _as_stored(jnp.asarray(scale, jnp.float32), spec).astype(spec.jnp_scale_dtype)
    return cls(payload, scale, zp, spec,
               int(codes.shape[axis]), axis - codes.ndim, np.dtype(dtype), axis_shape)

  @classmethod
  def from_two_level(cls, codes, scale_codes, super_scale, min_codes, super_min, spec: QuantSpec,
                     dtype=jnp.float32, *, axis_shape=None) -> "QArray":
    """Packs a two-level quantization given by its parts (what a GGUF k-quant block holds).

    Args:
      codes: Integers in [spec.qmin, spec.qmax], logical shape (or the
        contraction axes already merged, with ``axis_shape`` their sizes).
      scale_codes: Integer group scale codes in `QuantSpec.scale_code_range`,
        shaped like the logical shape with the contraction axes replaced by
        the group count.
      super_scale: Super-group scales (values of ``scale_dtype``), contraction
        axes replaced by the super-group count.
      min_codes: Integer min codes in ``[0, 2^scale_bits - 1]`` like
        ``scale_codes`` (``offset="min"``), else None.
      super_min: Super-group mins like ``super_scale``, else None.
      spec: A two-level spec.
      dtype: The dtype `dequantize` returns.

    Example:
      >>> q = QArray.from_two_level(codes, sc, d, m, dmin, jquant.gguf.spec_for("Q4_K"))
    """
    if not spec.two_level:
      raise ValueError("QArray.from_two_level: spec has scale_bits=None; allowed: a two-level spec.")
    if spec.float_min != (min_codes is not None) or (min_codes is None) != (super_min is None):
      raise ValueError(f"QArray.from_two_level: min_codes/super_min must be given exactly when the spec has "
                       f"float mins (offset='min'); got offset={spec.offset!r}, min_codes "
                       f"{'given' if min_codes is not None else 'None'}, super_min "
                       f"{'given' if super_min is not None else 'None'}.")
    codes = jnp.asarray(codes)
    if axis_shape is None:
      codes, spec, axis_shape = merge_contraction(codes, spec)
    axis = _normalize_axis(spec.axis, codes.ndim)
    spec.num_super_groups(codes.shape[axis])  # raises on sizes the spec cannot take
    lo, hi = spec.scale_code_range
    sc = jnp.clip(jnp.asarray(scale_codes).astype(jnp.int32), lo, hi)
    scale = twolevel.pack_codes(sc, spec, axis, signed=spec.symmetric)
    zp = None if min_codes is None else twolevel.pack_codes(
        jnp.clip(jnp.asarray(min_codes).astype(jnp.int32), 0, 2**spec.scale_bits - 1), spec, axis, signed=False)
    sdt = jnp.dtype(spec.scale_dtype)
    return cls(_pack_codes(codes, spec, axis), scale, zp, spec, int(codes.shape[axis]), axis - codes.ndim,
               np.dtype(dtype), axis_shape, jnp.asarray(super_scale).astype(sdt),
               None if super_min is None else jnp.asarray(super_min).astype(sdt))

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


def _pack_codes(codes, spec: QuantSpec, axis: int):
  """The payload of int codes along ``axis`` (merged contraction): int8/uint8 at 8 bits, else packed."""
  codes = jnp.clip(codes.astype(jnp.int32), spec.qmin, spec.qmax)
  if spec.bits == 8:
    return codes.astype(jnp.int8 if spec.symmetric else jnp.uint8)
  if spec.symmetric:
    codes = codes + 2 ** (spec.bits - 1)
  return packing.pack(codes, spec.bits, axis, dense=spec.dense_pack)


def _decomposed(eff, spec: QuantSpec, axis: int, signed: bool, what: str):
  """Effective two-level group parameters (axis -> G) as (codes, super values) in the same layout."""
  e = jnp.moveaxis(jnp.asarray(eff).astype(jnp.float32), axis, 0)
  codes, sup, ok = twolevel.decompose(e, spec, signed=signed)
  if not isinstance(ok, jax.core.Tracer) and not bool(ok.all()):
    bad = int((~ok).sum())
    raise ValueError(
        f"QArray.from_codes: {what} of {bad} super-groups are not on the two-level grid of this spec "
        f"(scale_bits={spec.scale_bits}, {spec.scale_dtype} super-group values); allowed: effective values "
        "d * code as jquant.compute_scale_zero returns them. Compute group parameters with that function.")
  return jnp.moveaxis(codes, 0, axis), jnp.moveaxis(sup, 0, axis)


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


def _range_to_scale_zero(lo, hi, spec: QuantSpec, guard: bool = True):
  """Scale and zero point (or float min) of the range [lo, hi]; ``guard``: a zero range gets scale 1
  (two-level specs keep 0 there, so that it cannot dominate its super-group). Finite for every finite
  range, ``[-3e38, 3e38]`` included."""
  if spec.symmetric and spec.symmetric_scale == "signed":  # the largest magnitude -> qmin; signed scale
    extreme = jnp.where(jnp.abs(hi) >= jnp.abs(lo), hi, lo)
    scale = extreme / spec.qmin
    return jnp.where(jnp.abs(scale) > _TINY, scale, 1.0 if guard else 0.0), None
  if spec.symmetric:  # "max": amax / (2^(b-1) - 1); "half": amax / (2^(b-1) - 1/2)
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    scale = amax / (spec.qmax if spec.symmetric_scale == "max" else spec.scale_divisor)
    scale = jnp.where(scale > _TINY, scale, 1.0 if guard else 0.0)
    return scale, None
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)  # zero stays exactly representable
  span = hi - lo  # overflows only beyond float32's range: then the two ends are divided first
  scale = jnp.where(jnp.isfinite(span), span / spec.qmax, hi / spec.qmax - lo / spec.qmax)
  if spec.float_min:  # x = scale * q - min: the range's lower end is -min
    return jnp.where(scale > _TINY, scale, 1.0 if guard else 0.0), -lo
  scale = jnp.where(scale > _TINY, scale, 1.0)
  zero = jnp.clip(jnp.round(-lo / scale), 0, spec.qmax)
  return scale, zero


def _quantize_with(g, scale, zero, spec: QuantSpec, key=None):
  if spec.float_min or spec.two_level:
    safe = jnp.where(scale == 0, 1.0, scale)  # a zero (two-level) scale: codes 0
    if spec.float_min:  # GGML's (x + min) / d, or, where x + min overflows, x / d + min / d
      shifted = g + zero
      v = jnp.where(jnp.isfinite(shifted), _divide(shifted, safe), _divide(g, safe) + _divide(zero, safe))
    else:
      v = _divide(g, safe)
  else:
    v = _divide(g, scale)
  if spec.rounding == "stochastic":
    if key is None:
      raise ValueError("quantize: rounding='stochastic' needs key=jax.random.key(...), got key=None.")
    v = jnp.floor(v + jax.random.uniform(key, v.shape, v.dtype))
  else:
    v = jnp.round(v)
  if spec.float_min or spec.two_level:
    v = jnp.where(scale == 0, 0.0, v)
  elif zero is not None:
    v = v + zero
  return jnp.clip(v, spec.qmin, spec.qmax)


_HUGE = 2.0**64  # scales above this are divided through by it first (1 / scale would be subnormal)


def _divide(x, scale):
  """``x / scale``. XLA compiles a division by a broadcast array into a multiplication by its reciprocal,
  which flushes to zero for ``|scale| > 2^126`` (ranges near float32's largest value): such scales and
  their values are first divided by 2^64, exactly."""
  big = jnp.abs(scale) > _HUGE
  return jnp.where(big, x * (1 / _HUGE), x) / jnp.where(big, scale * (1 / _HUGE), scale)


def _dequantize_with(c, scale, zero, float_min: bool = False):
  """Float32 values of codes ``c``, saturated to float32's finite range (a code half a step beyond a
  range ending near float32's largest value would otherwise become inf)."""
  if float_min:
    # GGML's ``d * q - m`` rounds the product before subtracting: keep XLA from fusing an FMA.
    prod, m = jax.lax.optimization_barrier((c * scale, zero))
    # Where d * q alone overflows (a range spanning more than float32's largest value), halve both terms.
    out = jnp.where(jnp.isfinite(prod), prod - m, (c * (scale * 0.5) - m * 0.5) * 2.0)
  else:
    out = (c - zero) * scale if zero is not None else c * scale
  return saturate(out, jnp.float32)


def saturate(x, dtype):
  """``x`` clipped to the finite range of float ``dtype`` (still in ``x``'s dtype; NaN stays NaN).

  Quantized values are cast to their output dtype after this, so that a value
  half a step beyond ``dtype``'s largest finite number lands on it instead of
  becoming inf: the error only shrinks, as every finite input lies inside.

  Example:
    >>> saturate(jnp.array([-7e4, 1.0]), jnp.float16).astype(jnp.float16).tolist()
    [-65504.0, 1.0]
  """
  info = jnp.finfo(dtype)
  return jnp.clip(x, jnp.asarray(info.min, x.dtype), jnp.asarray(info.max, x.dtype))


def dequantize_values(codes, scale, zero_point, spec: QuantSpec):
  """The float values of integer ``codes`` under group parameters already broadcast to their shape.

  The exact arithmetic of `dequantize`: ``(q - z) * scale``, ``q * scale``, or
  with float mins ``scale * q - min`` (the product rounded first, as GGML
  does). Scales (and float mins) are first rounded to ``spec.jnp_scale_dtype``
  as `quantize_values` does. For solvers' error feedback (GPTQ).

  Example:
    >>> c, s, z = jquant.quantize_values(w, spec)
    >>> w_hat = dequantize_values(c, expand(s), expand(z), spec)
  """
  s = _as_stored(jnp.asarray(scale, jnp.float32), spec)
  z = None if zero_point is None else jnp.asarray(zero_point).astype(jnp.float32)
  if z is not None and spec.float_min:
    z = _as_stored(z, spec)
  return _dequantize_with(jnp.asarray(codes).astype(jnp.float32), s, z, spec.float_min)


def _mse_scale_zero(g, lo, hi, spec: QuantSpec, guard: bool = True, weights=None):
  """Per group, the range shrink with the least sum w |x - q(x)|^p (GPTQ's grid)."""
  shrinks = 1.0 - spec.mse_max_shrink * jnp.arange(spec.mse_grid, dtype=jnp.float32) / spec.mse_grid

  # Errors of groups far from 1 in magnitude are measured in units of a power of two near their largest
  # value (exact, and the same for every candidate of a group): |e|^p neither overflows nor underflows.
  amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  unit = jnp.where((amax > 2.0**20) | ((amax < 2.0**-20) & (amax > 0)),
                   jnp.exp2(jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0)))), 1.0)

  def err_for(p):
    scale, zero = _range_to_scale_zero(lo * p, hi * p, spec)
    deq = _dequantize_with(_quantize_with(g, scale, zero, spec), scale, zero, spec.float_min)
    e = (jnp.abs(deq - g) / unit) ** spec.mse_norm
    return jnp.sum(e if weights is None else weights * e, axis=1, keepdims=True)

  best_p = grid_search(err_for, shrinks, lo.shape)
  return _range_to_scale_zero(lo * best_p, hi * best_p, spec, guard)


_FIT_STEPS = jnp.linspace(-1.0, 1.0, 21)  # trial steps per range: the code count +- 1 in tenths (llama.cpp's)


def _fit_scale_zero(g, lo, hi, spec: QuantSpec, guard: bool = True, weights=None):
  """Per group, least-squares scale (and lower end) refitted to the codes of trial scales (``clip="fit"``).

  For each trial ``n + t`` steps over the min-max range (``t`` in -1..1 by 0.1), codes are assigned by
  rounding, then the (importance-weighted) least-squares scale, and for asymmetric specs offset, of those
  codes is solved in closed form; the candidate with the least weighted squared error after re-quantizing
  is kept, the min-max parameters included. llama.cpp's k-quant searches (``make_qx_quants``,
  ``make_qkx2_quants``) work this way. The fits run in units of each group's largest magnitude, so
  ranges near float32's largest value neither overflow nor lose the search.
  """
  w = jnp.ones_like(g) if weights is None else jnp.broadcast_to(weights, g.shape)
  base_scale, base_zero = _range_to_scale_zero(lo, hi, spec, guard)
  amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  ok = amax > _TINY
  unit = jnp.where(ok, amax, 1.0)
  gn, lo_n, hi_n = g / unit, lo / unit, hi / unit  # |.| <= 1
  ssum = lambda a: jnp.sum(a, axis=1, keepdims=True)  # noqa: E731

  def err(scale, zero):
    deq = _dequantize_with(_quantize_with(g, scale, zero, spec), scale, zero, spec.float_min)
    return ssum(w * jnp.square(deq / unit - gn))

  if spec.symmetric:
    if spec.symmetric_scale == "signed":
      ref, n = jnp.where(jnp.abs(hi_n) >= jnp.abs(lo_n), hi_n, lo_n), float(spec.qmin)
    else:
      ref, n = jnp.ones_like(lo_n), float(spec.qmax)
  else:
    lo0 = jnp.minimum(lo_n, 0.0)
    ref, n = jnp.maximum(hi_n, 0.0) - lo0, float(spec.qmax)
  ref = jnp.where(ok, ref, 1.0)

  def candidate(t):
    iscale = (n + t * np.sign(n)) / ref
    if spec.symmetric:
      codes = jnp.clip(jnp.round(gn * iscale), spec.qmin, spec.qmax)
      sl2 = ssum(w * codes * codes)
      scale_n = ssum(w * gn * codes) / jnp.where(sl2 > 0, sl2, 1.0)
      good = ok & (sl2 > 0) & (jnp.abs(scale_n) > 1e-30)
      return jnp.where(good, scale_n * unit, base_scale), base_zero
    codes = jnp.clip(jnp.round((gn - lo0) * iscale), 0, spec.qmax)
    sw, sl, sl2 = ssum(w), ssum(w * codes), ssum(w * codes * codes)
    sx, sxl = ssum(w * gn), ssum(w * gn * codes)
    det = sw * sl2 - sl * sl
    safe_det = jnp.where(det > 0, det, 1.0)
    scale_n = (sw * sxl - sx * sl) / safe_det
    low_n = (sl2 * sx - sl * sxl) / safe_det
    positive = low_n > 0  # the range must hold 0: refit the scale alone
    scale_n = jnp.where(positive, sxl / jnp.where(sl2 > 0, sl2, 1.0), scale_n)
    low_n = jnp.where(positive, 0.0, low_n)
    good = ok & (det > 0) & (scale_n > 1e-30)
    scale = jnp.where(good, scale_n * unit, base_scale)
    if spec.float_min:
      return scale, jnp.where(good, -low_n * unit, base_zero)
    zero = jnp.clip(jnp.round(-low_n / jnp.where(good, scale_n, 1.0)), 0, spec.qmax)
    return scale, jnp.where(good, zero, base_zero)

  def body(carry, t):
    best_err, best_scale, best_zero = carry
    scale, zero = candidate(t)
    e = err(scale, zero)
    better = e < best_err
    return (jnp.where(better, e, best_err), jnp.where(better, scale, best_scale),
            None if zero is None else jnp.where(better, zero, best_zero)), None

  init = (err(base_scale, base_zero), base_scale, base_zero)
  (_, scale, zero), _ = jax.lax.scan(body, init, _FIT_STEPS)
  return scale, zero


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


def _group_scale_zero(g, spec: QuantSpec, guard: bool = True, weights=None):
  """Scale and zero point per group of grouped float32 data ``g`` (G, L, rest); ``weights`` grouped alike."""
  lo = jnp.min(g, axis=1, keepdims=True) * spec.clip_ratio
  hi = jnp.max(g, axis=1, keepdims=True) * spec.clip_ratio
  if spec.clip == "mse":
    return _mse_scale_zero(g, lo, hi, spec, guard, weights)
  if spec.clip == "fit":
    return _fit_scale_zero(g, lo, hi, spec, guard, weights)
  return _range_to_scale_zero(lo, hi, spec, guard)


def _two_level_parts(x, spec: QuantSpec, weights=None):
  """RTN onto a two-level grid: ``(scale codes, d, min codes or None, dmin or None)`` for merged ``x``,
  group parameters with axis -> G, super-group ones with axis -> S."""
  axis = _normalize_axis(spec.axis, x.ndim)
  spec.num_super_groups(x.shape[axis])  # raises on sizes the spec cannot take
  g, _, _ = _grouped(x.astype(jnp.float32), spec, axis)
  scale, zero = _group_scale_zero(g, spec, guard=False, weights=_grouped_weights(weights, spec, axis))
  sc, d = twolevel.split(scale[:, 0], spec, signed=spec.symmetric)
  out = [sc, d] + (list(twolevel.split(zero[:, 0], spec, signed=False)) if spec.float_min else [None, None])
  return tuple(None if a is None else jnp.moveaxis(a, 0, axis) for a in out)


def _effective(sc, d, spec: QuantSpec, axis: int):
  return jnp.moveaxis(twolevel.combine(jnp.moveaxis(sc, axis, 0), jnp.moveaxis(d, axis, 0), spec), 0, axis)


def _stored_shape(s, x_shape, axis, spec):
  """From grouped (G, 1, rest) to the logical shape with axis -> G."""
  s = jnp.moveaxis(s[:, 0], 0, axis)
  if spec.granularity == "tensor":
    s = s.reshape((1,) * len(x_shape))
  return s


def _grouped_weights(weights, spec: QuantSpec, axis: int):
  return None if weights is None else _grouped(weights, spec, axis)[0]


def _merged_importance(importance, x, spec: QuantSpec, fn: str):
  """``importance`` broadcast to ``x`` and merged like it; checked finite and non-negative."""
  if importance is None:
    return None
  imp = jnp.asarray(importance, jnp.float32)
  try:
    imp = jnp.broadcast_to(imp, jnp.shape(x))
  except ValueError:
    raise ValueError(f"{fn}: importance has shape {tuple(imp.shape)}, which does not broadcast to x's "
                     f"{tuple(jnp.shape(x))}; allowed: per-element weights broadcastable to x (e.g. (K, 1) for a "
                     "(K, N) kernel contracting axis 0).") from None
  if not isinstance(imp, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(imp) & (imp >= 0))):
    raise ValueError(f"{fn}: importance has negative or non-finite entries; allowed: finite weights >= 0 "
                     "(e.g. the diagonal of a calibration Hessian, the mean square of the inputs).")
  return merge_contraction(imp, spec)[0]


def compute_scale_zero(x, spec: QuantSpec, importance=None):
  """Scales and zero points of ``x`` under ``spec`` (min-max, MSE or least-squares ranges).

  Args:
    x: Float array.
    spec: The `QuantSpec` (its ``clip`` chooses min-max, ``"mse"`` or ``"fit"``).
    importance: Optional non-negative float weights broadcastable to ``x``
      (e.g. ``(K, 1)`` for a ``(K, N)`` kernel: the diagonal of its input
      Hessian, llama.cpp's importance matrix), weighting each element's error
      in the ``"mse"`` and ``"fit"`` searches; ignored by min-max ranges.

  Returns:
    ``(scale, zero_point)`` shaped like ``x`` with the contraction axis (the
    flattened contraction axes) replaced by the group count (all ones for
    per-tensor). ``zero_point`` is None for symmetric specs and a float array
    of integers otherwise (float mins ``-lo`` for ``offset="min"``). Scales
    are float32 here (negative where ``symmetric_scale="signed"`` maps a
    positive largest value to ``qmin``), finite for every finite input;
    `QArray` stores them in ``spec.scale_dtype``. Two-level specs: the
    effective ``d * sc`` (and ``dmin * m``), already on the grid.
  """
  x = _check_input(x, spec, "compute_scale_zero")
  weights = _merged_importance(importance, x, spec, "compute_scale_zero")
  x, spec, _ = merge_contraction(x, spec)
  axis = _normalize_axis(spec.axis, x.ndim)
  if spec.two_level:
    sc, d, m, dmin = _two_level_parts(x, spec, weights)
    return _effective(sc, d, spec, axis), None if m is None else _effective(m, dmin, spec, axis)
  g, _, _ = _grouped(x.astype(jnp.float32), spec, axis)
  scale, zero = _group_scale_zero(g, spec, weights=_grouped_weights(weights, spec, axis))
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
  scale = _stored_value(scale, spec, "scale")
  if spec.float_min:
    zero_point = _stored_value(zero_point, spec, "zero_point (min)")
  s = expand_to_groups(scale, spec, x.shape[axis])
  z = None if zero_point is None else expand_to_groups(zero_point.astype(jnp.float32), spec, x.shape[axis])
  codes = _quantize_with(x.astype(jnp.float32), s, z, spec, key)
  return codes.astype(jnp.int32).reshape(logical_shape), scale, zero_point


def _stored_value(a, spec: QuantSpec, what: str):
  """``a`` rounded to the dtype it is stored in, as float32; float16 overflow raises (eagerly)."""
  a = jnp.asarray(a).astype(jnp.float32)
  dt = spec.jnp_scale_dtype
  if dt == jnp.float16 and not isinstance(a, jax.core.Tracer) and not bool(jnp.isfinite(a.astype(dt)).all()):
    raise ValueError(f"quantize: a group {what} overflows float16 (|value| > 65504); allowed: weights whose "
                     "group ranges fit float16 scales. Rescale the weights or use scale_dtype='float32'.")
  return _as_stored(a, spec)


def _as_stored(a, spec: QuantSpec):
  """Float32 ``a`` rounded to ``spec.jnp_scale_dtype`` (saturating: bfloat16 rounds float32's largest
  values up to inf), back in float32."""
  return saturate(a, spec.jnp_scale_dtype).astype(spec.jnp_scale_dtype).astype(jnp.float32)


def quantize(x, spec: QuantSpec, *, key=None, importance=None) -> QArray:
  """Quantizes ``x`` into a packed `QArray` (pure, jit-able).

  ``importance`` (optional, non-negative, broadcastable to ``x``) weights each
  element's error in the ``clip="mse"`` / ``"fit"`` searches of the group
  parameters: with per-input-channel weights (the mean square of the
  calibration inputs, the Hessian's diagonal) this is llama.cpp's
  importance-matrix quantization (see `compute_scale_zero`).

  Example:
    >>> q = jquant.quantize(jnp.ones((64, 8)), jquant.QuantSpec(bits=2))
    >>> q.qvalue.shape, q.qvalue.dtype            # four int2 per byte
    ((16, 8), dtype('uint8'))

  Raises:
    ValueError: see `compute_scale_zero`; ``importance`` with ``clip="minmax"``
      (min-max ranges would ignore it).
  """
  if importance is not None and spec.clip == "minmax":
    raise ValueError(f"quantize: importance weights the clip='mse' / 'fit' searches, but spec.clip={spec.clip!r} "
                     "takes min-max ranges and would ignore it; use spec.replace(clip='fit') (llama.cpp's "
                     "importance-matrix search) or drop importance.")
  if spec.two_level:  # the parts are known here: no search for a decomposition
    x = _check_input(x, spec, "quantize")
    weights = _merged_importance(importance, x, spec, "quantize")
    xm, mspec, axis_shape = merge_contraction(x, spec)
    axis = _normalize_axis(mspec.axis, xm.ndim)
    sc, d, m, dmin = _two_level_parts(xm, mspec, weights)
    for sup in (d, dmin):
      if sup is not None and not isinstance(sup, jax.core.Tracer) and not bool(jnp.isfinite(sup).all()):
        raise ValueError("quantize: a super-group scale overflows float16 (|value| > 65504); allowed: weights "
                         "whose ranges fit float16 super-group scales.")
    eff_s = _effective(sc, d, mspec, axis)
    eff_m = None if m is None else _effective(m, dmin, mspec, axis)
    codes, _, _ = quantize_values(xm, mspec, key=key, scale=eff_s, zero_point=eff_m)
    return QArray.from_two_level(codes, sc, d, m, dmin, mspec, x.dtype, axis_shape=axis_shape)
  scale = zero = None
  if importance is not None:
    scale, zero = compute_scale_zero(x, spec, importance=importance)
  codes, scale, zero = quantize_values(x, spec, key=key, scale=scale, zero_point=zero)
  return QArray.from_codes(codes, scale, zero, spec, jnp.asarray(x).dtype)


def dequantize(q: QArray, dtype=None) -> jax.Array:
  """The float array a `QArray` stands for (``q.dtype`` unless ``dtype``), saturated to that dtype's finite
  range (a value half a step beyond float16's 65504 becomes 65504, not inf)."""
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize: expected a jquant.QArray, got {type(q).__name__}.")
  c = q.codes().astype(jnp.float32).reshape(q.qvalue.shape[:q.axis % q.qvalue.ndim] + (q.size,) +
                                              q.qvalue.shape[q.axis % q.qvalue.ndim + 1:])
  spec = dataclasses.replace(q.spec, axis=q.axis)
  scale, zero = q.group_params()
  s = expand_to_groups(scale, spec, q.size)
  z = None if zero is None else expand_to_groups(zero, spec, q.size)
  dtype = dtype or q.dtype
  out = saturate(_dequantize_with(c, s, z, spec.float_min), dtype).astype(dtype).reshape(q.shape)
  if not spec.standard_layout:
    # GGUF grids: materialize the weights as an input would be, so that a consumer (a transposed
    # product) computes exactly what it computes on the float weights of the dequantized path.
    out = jax.lax.optimization_barrier(out)
  return out


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
  if spec.float_min:
    z = _as_stored(z, spec)
  fq = saturate(_dequantize_with(codes.astype(jnp.float32), s, z, spec.float_min), x.dtype)
  # Inside the range means: the unclipped code would lie within [qmin, qmax].
  if spec.float_min:
    xf, safe = x.astype(jnp.float32), jnp.where(s == 0, 1.0, s)
    shifted = xf + z
    raw = jnp.where(jnp.isfinite(shifted), _divide(shifted, safe), _divide(xf, safe) + _divide(z, safe))
  else:
    raw = _divide(x.astype(jnp.float32), s) + (0.0 if z is None else z)
  mask = ((raw >= spec.qmin - 0.5) & (raw <= spec.qmax + 0.5)).astype(x.dtype)
  return _ste(x, fq.astype(x.dtype), jax.lax.stop_gradient(mask)).reshape(logical_shape)
