"""`qdot`: the one matmul the models call, whatever their weights hold; the one int8 activation quantizer.

``qdot(x, w)`` contracts the last axis of ``x`` with the first axis of ``w``:

* ``w`` a float array: a plain ``jnp.dot``.
* ``w`` a `QArray` (weight-only quantization): dequantized inside the compiled
  function and multiplied in ``x``'s dtype. Weights stay packed in memory.
* ``w`` an object with a ``__qdot__(x)`` method: it computes the product
  itself (`W8A8Weight` below; `IntMatmulWeight`: W4A8 / W4A4 with exact
  integer products per weight group; QAT's fake-quantized weights).

When lowering for TPU or CUDA, 4..8-bit `QArray` weights and `W8A8Weight`
run the Pallas kernels of `pallas_kernels` (chosen per lowering platform with
``jax.lax.platform_dependent``); `force_xla()` keeps everything on XLA.

The activation quantizer. W8A8 serving (`W8A8Weight`, and through it the
Pallas kernels, which take already-quantized activations), the SmoothQuant
alpha search and QAT's activation fake quantization all call the functions
below, so a search scores exactly the arithmetic that is served:

* `quantize_activations_per_token(x)`: dynamic, symmetric, one scale per row
  of the last axis (per token);
* `quantize_activations_static(x, scale)`: a calibrated per-tensor scale
  (`static_activation_scale` turns an observed ``max|x|`` into it);
* `fake_quant_activations_per_token` / `fake_quant_activations_static`:
  ``codes * scale`` with a straight-through gradient, for training and
  searches.

The arithmetic, in float32 (the same on every backend and in a NumPy
reference): ``scale = amax * fl(1/qmax)`` (1.0 for an all-zero row, so its
codes are 0), ``codes = clip(round_half_even(x * fl(1/scale)), -qmax, qmax)``
with ``qmax = 2^(bits-1) - 1`` (127 for int8: the code -128 is never used,
so the grid is symmetric). Division is written as multiplication by a
reciprocal because that is what XLA compiles ``x / s`` into whenever ``s``
is broadcast; spelling it out keeps eager, jitted, constant-folded (static
scales closed over) and NumPy results bit for bit equal.

Example:
    >>> q = jquant.quantize(w, jquant.QuantSpec(bits=8))
    >>> y = jquant.ops.qdot(x, jquant.ops.W8A8Weight(q))   # int8 x int8 -> int32
    >>> xq, xs = jquant.ops.quantize_activations_per_token(x)   # the codes and scales it used
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jquant.qarray import QArray, dequantize
# The kernels are imported with jquant, not on the first traced qdot: an import inside a trace changes the
# trace context that is part of jit's cache key, so the first compilation of a quantized model would be repeated.
# pallas_kernels imports no jquant at load time, so there is no cycle.
from pallas_kernels import w4a16, w8a8

_MIN_AMAX = 1e-8  # a static layer whose calibration input was all zeros still gets a finite, positive scale


def _qmax(bits, fn: str) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
    raise ValueError(f"{fn}: bits={bits!r}; allowed: an int in 2..8 (symmetric codes in "
                     "[-(2^(bits-1) - 1), 2^(bits-1) - 1], stored as int8).")
  return 2 ** (int(bits) - 1) - 1


def _codes(xf, scale, qmax: int):
  """``clip(round(xf * (1 / scale)), -qmax, qmax)`` as int8 (the module docstring's arithmetic)."""
  inv = jnp.float32(1.0) / scale
  return jnp.clip(jnp.round(xf * inv), -qmax, qmax).astype(jnp.int8)


def _check_float(x, fn: str):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{fn}: x has dtype {x.dtype}; allowed: a floating dtype (float32, bfloat16, float16).")
  if x.ndim < 1:
    raise ValueError(f"{fn}: x is a scalar; allowed: activations of shape (..., K).")
  return x


def quantize_activations_per_token(x, bits: int = 8):
  """Dynamic symmetric quantization, one scale per token (per row of the last axis).

  Args:
    x: Float activations (..., K), any float dtype (computed in float32).
    bits: Code width, 2..8; 8 is W8A8's int8 (codes in [-127, 127]).

  Returns:
    ``(codes, scale)``: int8 codes shaped like ``x``, and float32 scales
    shaped ``x.shape[:-1] + (1,)``; ``x ~= codes * scale``. A row of zeros
    gets scale 1 and codes 0; a row holding NaN or inf gets a NaN or inf
    scale, so whatever is computed from it is non-finite. Arithmetic: see the
    module docstring.

  Raises:
    ValueError: ``bits`` out of range; TypeError: integer ``x``.

  Example:
    >>> xq, xs = quantize_activations_per_token(jnp.array([[1.0, -2.0], [0.0, 0.0]]))
    >>> xq.tolist(), xs.ravel().tolist()
    ([[64, -127], [0, 0]], [0.015748031437397003, 1.0])
  """
  qmax = _qmax(bits, "quantize_activations_per_token")
  xf = _check_float(x, "quantize_activations_per_token").astype(jnp.float32)
  amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
  # A row of zeros gets scale 1; a row holding NaN or inf keeps a non-finite scale, so the product's row is
  # non-finite too (never a silent finite answer).
  scale = jnp.where(amax > 0, amax * np.float32(1.0 / qmax), jnp.where(amax == 0, jnp.float32(1.0), amax))
  return _codes(xf, scale, qmax), scale


def quantize_activations_static(x, scale, bits: int = 8):
  """Static symmetric quantization with a calibrated scale (a constant of the serving program).

  Args:
    x: Float activations (..., K).
    scale: Positive float32 scale: a scalar (per tensor) or an array
      broadcastable to ``x``; `static_activation_scale` derives it from an
      observed ``max|x|``.
    bits: Code width, 2..8.

  Returns:
    int8 codes shaped like ``x``, clipped to ``[-qmax, qmax]``.

  Example:
    >>> quantize_activations_static(jnp.array([0.5, 3.0]), jnp.float32(1 / 127)).tolist()
    [64, 127]
  """
  qmax = _qmax(bits, "quantize_activations_static")
  xf = _check_float(x, "quantize_activations_static").astype(jnp.float32)
  return _codes(xf, jnp.asarray(scale, jnp.float32), qmax)


def static_activation_scale(amax, bits: int = 8) -> jax.Array:
  """The per-tensor static scale ``max(amax, 1e-8) * fl(1/qmax)`` (float32 scalar).

  Args:
    amax: Observed clipping value(s) ``max|x|``; several (per channel) are
      reduced to their maximum.
    bits: Code width, 2..8.

  Example:
    >>> float(static_activation_scale(jnp.array([1.0, 12.7])))   # 12.7 / 127
    0.10000000149011612
  """
  qmax = _qmax(bits, "static_activation_scale")
  a = jnp.max(jnp.asarray(amax, jnp.float32))
  return jnp.maximum(a, jnp.float32(_MIN_AMAX)) * np.float32(1.0 / qmax)


def dequantize_activations(codes, scale, dtype=jnp.float32):
  """``codes * scale`` in float32, cast to ``dtype``: the value a fake quantizer returns."""
  return (codes.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(dtype)


@jax.custom_vjp
def _ste(x, fq, mask):
  del x, mask
  return fq


_ste.defvjp(lambda x, fq, mask: (fq, mask), lambda mask, t: (t if mask is None else t * mask, None, None))


def fake_quant_activations_per_token(x, bits: int = 8):
  """`quantize_activations_per_token` then ``codes * scale``, in ``x``'s dtype, with an identity gradient.

  Per-token scales never clip (each row's ``max|x|`` maps to ``qmax``), so the
  straight-through gradient is the identity everywhere.

  Returns:
    ``(x_fq, scale)``: the fake-quantized activations and the per-token scales.

  Example:
    >>> g = jax.grad(lambda x: fake_quant_activations_per_token(x)[0].sum())(x)   # all ones
  """
  codes, scale = quantize_activations_per_token(jax.lax.stop_gradient(x), bits)
  return _ste(x, dequantize_activations(codes, scale, x.dtype), None), scale


def fake_quant_activations_static(x, scale, bits: int = 8):
  """`quantize_activations_static` then ``codes * scale``, in ``x``'s dtype, straight-through gradient.

  The gradient passes where the code was not clipped (``|round(x / scale)| <= qmax``)
  and is zero where it was; ``scale`` gets no gradient.

  Returns:
    The fake-quantized activations, shaped like ``x``, in ``x``'s dtype (the
    scale is the caller's).

  Example:
    >>> s = static_activation_scale(jnp.max(jnp.abs(x_calib)))
    >>> y = fake_quant_activations_static(x, s)
  """
  qmax = _qmax(bits, "fake_quant_activations_static")
  scale = jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32))
  xs = jax.lax.stop_gradient(x)
  codes = quantize_activations_static(xs, scale, bits)
  inside = jnp.abs(jnp.round(xs.astype(jnp.float32) * (jnp.float32(1.0) / scale))) <= qmax
  fq = jnp.where(jnp.isfinite(xs), dequantize_activations(codes, scale, x.dtype), xs)  # NaN/inf stay as they are
  return _ste(x, fq, inside.astype(x.dtype))


def weight_property(name: str):
  """A read-only property forwarding ``name`` of a wrapper's ``weight`` (``shape``, ``dtype``)."""
  return property(lambda self: getattr(self.weight, name), doc=f"The wrapped weight's {name}.")


def int8_matmul(x_int8, w_int8):
  """int8 (..., K) x int8 (K, N) -> int32 (..., N), exact."""
  return jax.lax.dot_general(x_int8, w_int8, (((x_int8.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.int32)


def w8a8_epilogue(acc, x_scale, w_scale, out_dtype):
  """``acc * x_scale * w_scale`` in float32 (in that order), cast to ``out_dtype``.

  Args:
    acc: int32 accumulators (..., N).
    x_scale: float32 activation scales, (..., 1) per token or a scalar.
    w_scale: float32 per-output-channel weight scales (N,) (or a scalar).
  """
  return (acc.astype(jnp.float32) * x_scale * jnp.asarray(w_scale, jnp.float32).reshape(-1)).astype(out_dtype)


@jax.tree_util.register_pytree_node_class
class W8A8Weight(NamedTuple):
  """An int8 per-channel weight whose matmul also quantizes the activations.

  ``qdot(x, W8A8Weight(q, s))`` quantizes ``x`` to int8 (`quantize_input`),
  runs the int8 x int8 -> int32 product (the Pallas W8A8 kernel on TPU/CUDA,
  XLA elsewhere) and scales the accumulators by the activation and the
  per-output-channel weight scales (`w8a8_epilogue`). Inside
  `jquant.quantized`, an N-D weight (``DenseGeneral``, ``Einsum``) quantized
  along its contraction axes is viewed as its (K, N) matrix first.

  Attributes:
    weight: A symmetric 8-bit, per-channel (or per-tensor) `QArray`, (K, N)
      contracting axis 0 (or N-D, quantized along its contraction axes, run
      through `jquant.quantized`).
    act_scale: Static activation scale (scalar, from
      `static_activation_scale`), or None for dynamic per-token scales computed
      at run time.

  Example:
    >>> wq = W8A8Weight(jquant.quantize(w, jquant.QuantSpec(bits=8)))
    >>> y = qdot(x, wq)
    >>> xq, xs = wq.quantize_input(x)     # the int8 activations that product used
  """

  weight: QArray
  act_scale: Optional[jax.Array] = None

  def tree_flatten(self):
    return (self.weight, self.act_scale), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children)

  shape = weight_property("shape")
  dtype = weight_property("dtype")

  def quantize_input(self, x):
    """``(x_int8, x_scale)`` as the product quantizes ``x``: static (scalar scale) or per token ((..., 1))."""
    if self.act_scale is None:
      return quantize_activations_per_token(x)
    xs = jnp.asarray(self.act_scale, jnp.float32)
    return quantize_activations_static(x, xs), xs

  def __qdot__(self, x):
    w = self.weight
    if w.bits != 8 or not w.spec.symmetric or w.spec.granularity == "group" or w.axis != -w.ndim:
      raise ValueError(f"W8A8Weight: weight must be symmetric int8, per-channel or per-tensor, contracting "
                       f"axis 0 of a (K, N) matrix; got {w!r} with axis {w.axis}. An N-D weight runs through "
                       "jquant.quantized(apply), which views it as its (K, N) matrix.")
    xq, xs = self.quantize_input(x)

    def xla_w8a8(xq2, xs2, wq, ws):
      return w8a8_epilogue(int8_matmul(xq2, wq), xs2, ws, x.dtype)

    if not kernels_enabled():
      y = xla_w8a8(xq, xs, w.qvalue, w.scale)
    else:
      # Pallas on TPU/CUDA (chosen at lowering), this XLA code elsewhere.
      y = w8a8.w8a8_matmul(xq, xs, w.qvalue, w.scale, out_dtype=x.dtype, fallback=xla_w8a8)
    if self.act_scale is not None:  # static: a row with NaN/inf has no meaningful codes; its output row is NaN
      y = jnp.where(jnp.all(jnp.isfinite(x), axis=-1, keepdims=True), y, jnp.asarray(jnp.nan, y.dtype))
    return y


def _xla_weight_only(x, w: QArray):
  if w.axis != -w.ndim or w.ndim != 2:
    raise ValueError(f"qdot: a QArray weight must be 2-D (K, N) contracting axis 0; got shape {w.shape}, "
                     f"axis {w.axis}.")
  return jnp.dot(x, dequantize(w, x.dtype))


# Kernel dispatch. Read at trace time and part of the jit cache key, so a
# function traced under `force_xla()` is retraced outside it.
_FORCE_XLA = jax.make_user_context(default_value=False)


@contextlib.contextmanager
def force_xla(enabled: bool = True):
  """Within this context `qdot` uses plain XLA even where a Pallas kernel applies.

  Example:
      >>> with jquant.ops.force_xla():
      ...   y_xla = jax.jit(jquant.ops.qdot)(x, q)
  """
  with _FORCE_XLA(bool(enabled)):
    yield


def kernels_enabled() -> bool:
  """False inside `force_xla()`; then `qdot` never emits Pallas kernels."""
  return not _FORCE_XLA.value


def _weight_only(x, w: QArray):
  """Packed weights: the Pallas kernel on TPU/CUDA where it reads the layout, XLA elsewhere."""
  if not kernels_enabled():
    return _xla_weight_only(x, w)
  if not w4a16.supports(w):
    return _xla_weight_only(x, w)
  return w4a16.qarray_matmul(x, w, out_dtype=x.dtype, fallback=lambda x2: _xla_weight_only(x2, w))


def qdot(x, w):
  """``x @ w`` for float, packed (`QArray`) or wrapped weights.

  Args:
    x: Float activations (..., K).
    w: (K, N) float array, `QArray`, or an object implementing ``__qdot__``.

  Returns:
    (..., N) in ``x.dtype``.
  """
  qdot_method = getattr(type(w), "__qdot__", None)
  if qdot_method is not None:
    return qdot_method(w, x)
  if isinstance(w, QArray):
    return _weight_only(x, w)
  return jnp.dot(x, w.astype(x.dtype) if hasattr(w, "astype") else w)


# ---------------------------------------------------------------------------
# Low-bit integer products: W4A8 and W4A4 (QuaRot), the int4 x int4 -> int32 XLA reference path.


def int4_matmul(x_codes, w_codes):
  """int4 (..., K) x int4 (K, N) -> int32 (..., N), exact: the XLA reference path of W4A4.

  Codes are held in int8 containers (values in [-8, 7]; XLA on CPU has no
  int4 dot), multiplied as int8 and accumulated in int32, which is exact for
  ``K < 2^31 / 64``. A Pallas kernel would read them packed two per byte.

  Raises:
    TypeError: codes that are not integers; ValueError: concrete codes outside
      [-8, 7], or ranks/sizes that do not fit.

  Example:
    >>> int4_matmul(jnp.array([[7, -8]], jnp.int8), jnp.array([[1], [1]], jnp.int8)).tolist()
    [[-1]]
  """
  for name, a in (("x_codes", x_codes), ("w_codes", w_codes)):
    if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
      raise TypeError(f"int4_matmul: {name} has dtype {jnp.result_type(a)}; allowed: integer codes in [-8, 7].")
    if not isinstance(a, jax.core.Tracer):
      v = np.asarray(a)
      if v.size and (v.min() < -8 or v.max() > 7):
        raise ValueError(f"int4_matmul: {name} holds codes in [{v.min()}, {v.max()}]; allowed: [-8, 7] (int4).")
  if jnp.ndim(w_codes) != 2 or jnp.ndim(x_codes) < 1 or jnp.shape(x_codes)[-1] != jnp.shape(w_codes)[0]:
    raise ValueError(f"int4_matmul: shapes {jnp.shape(x_codes)} x {jnp.shape(w_codes)}; allowed: (..., K) x (K, N).")
  return int8_matmul(jnp.asarray(x_codes).astype(jnp.int8), jnp.asarray(w_codes).astype(jnp.int8))


def grouped_int_matmul(x_codes, w_codes, group_size: Optional[int] = None):
  """Integer codes (..., K) x (K, N) -> int32 (..., G, N): one exact partial product per group of K.

  Args:
    x_codes: int8 codes (..., K).
    w_codes: int8 codes (K, N).
    group_size: Rows of ``w`` per group (the last group may be shorter: it
      is zero-padded); None: one group (per-channel weights).

  Returns:
    int32 ``(..., G, N)``, ``G = ceil(K / group_size)``.
  """
  k, n = w_codes.shape
  if group_size is None or group_size >= k:
    return int8_matmul(x_codes, w_codes)[..., None, :]
  g = -(-k // group_size)
  pad = g * group_size - k
  xc = jnp.pad(x_codes, [(0, 0)] * (x_codes.ndim - 1) + [(0, pad)]).astype(jnp.int8)
  wc = jnp.pad(w_codes, [(0, pad), (0, 0)]).astype(jnp.int8)
  xg = xc.reshape(xc.shape[:-1] + (g, group_size))
  wg = wc.reshape(g, group_size, n)
  nb = xg.ndim - 2
  out = jax.lax.dot_general(xg, wg, (((xg.ndim - 1,), (1,)), ((nb,), (0,))), preferred_element_type=jnp.int32)
  return jnp.moveaxis(out, 0, -2) if nb == 0 else jnp.moveaxis(out, 0, nb)  # (..., G, N)


class _IntMatmulFields(NamedTuple):
  weight: QArray
  act_bits: int = 8


def _check_int_matmul_fields(weight, act_bits) -> None:
  """What `IntMatmulWeight` needs of its fields whatever the layout: static, so tracers inside are fine."""
  _qmax(act_bits, "IntMatmulWeight(act_bits)")
  if not isinstance(weight, QArray):
    raise ValueError(f"IntMatmulWeight: weight is a {type(weight).__name__}; allowed: a QArray (quantize it with "
                     "jquant.quantize(w, QuantSpec(symmetric=True, ...)) first).")
  spec = weight.spec
  if not spec.symmetric or spec.two_level or spec.granularity not in ("channel", "group", "tensor"):
    raise ValueError(f"IntMatmulWeight: weight must be a symmetric one-level QArray (per-channel, per-tensor or "
                     f"group-wise); got a QArray with {spec!r}. Quantize with QuantSpec(symmetric=True) and no "
                     "super-groups.")
  if spec.granularity == "tensor" and np.size(weight.scale) != 1 and weight.scale.shape[0] != 1:
    raise ValueError(f"IntMatmulWeight: per-tensor weight with several scales (scale shape "
                     f"{tuple(weight.scale.shape)}); allowed: one scale.")


@jax.tree_util.register_pytree_node_class
class IntMatmulWeight(_IntMatmulFields):
  """A symmetric low-bit weight whose product quantizes the activations per token: W4A8, W4A4.

  ``qdot(x, IntMatmulWeight(q, act_bits))`` quantizes ``x`` per token to
  ``act_bits`` (`quantize_activations_per_token`: codes in
  ``[-(2^(a-1) - 1), 2^(a-1) - 1]``), takes the integer codes of ``q``
  (``[-2^(b-1), 2^(b-1) - 1]``), runs one exact int32 product per weight
  group (`grouped_int_matmul`; `int4_matmul` is its W4A4 case) and scales:
  ``y = x_scale * sum_g acc_g * w_scale_g`` in float32. This is the XLA
  reference path (QuaRot's W4A4, QServe-style W4A8 with group scales); with
  rotations (`jquant.rotation`) the activations have no outlier channels.

  Attributes:
    weight: A symmetric `QArray`, 2..8 bits, per-channel or group-wise, (K, N)
      contracting axis 0 (N-D weights run through `jquant.quantized`).
    act_bits: Activation bits, 2..8 (static).

  Raises:
    ValueError: at construction, ``act_bits`` outside 2..8, a weight that is
      not a `QArray`, or one that is asymmetric, two-level or per-tensor with
      several scales; at ``qdot``, a weight that is not (K, N) contracting
      axis 0 (an N-D weight must run through `jquant.quantized`).

  Example:
    >>> q = jquant.quantize(w, jquant.QuantSpec(bits=4, granularity="group", group_size=128))
    >>> y = jquant.ops.qdot(x, IntMatmulWeight(q, act_bits=8))    # W4A8
  """

  __slots__ = ()

  def __new__(cls, weight: QArray, act_bits: int = 8):
    _check_int_matmul_fields(weight, act_bits)
    return super().__new__(cls, weight, act_bits)

  def tree_flatten(self):
    return (self.weight,), self.act_bits

  @classmethod
  def tree_unflatten(cls, aux, children):
    # No checks: under jit/vmap/tree_map the children are tracers or placeholders (None, object()); the tree
    # was checked when it was built.
    return cls._make((children[0], aux))

  shape = weight_property("shape")
  dtype = weight_property("dtype")

  def check(self):
    """Raises ValueError unless the weight is a symmetric one-level QArray, (K, N) contracting axis 0."""
    w = self.weight
    _check_int_matmul_fields(w, self.act_bits)  # again: `_replace` / `_make` build without checks
    if w.axis != -w.ndim or w.ndim != 2:
      raise ValueError(f"IntMatmulWeight: weight must be (K, N) contracting axis 0 for qdot; got shape {w.shape} "
                       f"with axis {w.axis}. An N-D weight runs through jquant.quantized(apply), which views it "
                       "as its (K, N) matrix.")

  def quantize_input(self, x):
    """``(codes, scale)`` of ``x`` at ``act_bits``, per token."""
    return quantize_activations_per_token(x, self.act_bits)

  def __qdot__(self, x):
    self.check()
    w = self.weight
    xq, xs = self.quantize_input(x)
    wc = w.codes().astype(jnp.int8)
    gs = w.spec.group_length(w.size) if w.spec.granularity == "group" else None
    acc = grouped_int_matmul(xq, wc, gs)  # (..., G, N)
    ws = jnp.broadcast_to(w.scale.astype(jnp.float32), (acc.shape[-2], acc.shape[-1]))
    y = jnp.sum(acc.astype(jnp.float32) * ws, axis=-2) * xs
    return y.astype(x.dtype)
