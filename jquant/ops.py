"""`qdot`: the one matmul the models call, whatever their weights hold.

``qdot(x, w)`` contracts the last axis of ``x`` with the first axis of ``w``:

* ``w`` a float array: a plain ``jnp.dot``.
* ``w`` a `QArray` (weight-only quantization): dequantized inside the compiled
  function and multiplied in ``x``'s dtype. Weights stay packed in memory.
* ``w`` an object with a ``__qdot__(x)`` method: it computes the product
  itself (`W8A8Weight` below; QAT's fake-quantized weights).

When lowering for TPU or CUDA, 4..8-bit `QArray` weights and `W8A8Weight`
run the Pallas kernels of `pallas_kernels` (chosen per lowering platform with
``jax.lax.platform_dependent``); `force_xla()` keeps everything on XLA.

Example:
    >>> q = jquant.quantize(w, jquant.QuantSpec(bits=8))
    >>> y = jquant.ops.qdot(x, jquant.ops.W8A8Weight(q))   # int8 x int8 -> int32
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jquant.qarray import QArray, dequantize


def quantize_activations_per_token(x):
  """Dynamic symmetric INT8 per token (per row of the last axis).

  Returns:
    ``(x_int8, scale)`` with ``scale`` shaped ``x.shape[:-1] + (1,)`` (float32).
  """
  xf = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  return jnp.clip(jnp.round(xf / scale), -127, 127).astype(jnp.int8), scale


def quantize_activations_static(x, scale):
  """Static symmetric INT8 with a calibrated scale (a constant of the program)."""
  return jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)


def int8_matmul(x_int8, w_int8):
  """int8 (..., K) x int8 (K, N) -> int32 (..., N), exact."""
  return jax.lax.dot_general(x_int8, w_int8, (((x_int8.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.int32)


@jax.tree_util.register_pytree_node_class
class W8A8Weight(NamedTuple):
  """An int8 per-channel weight whose matmul also quantizes the activations.

  Attributes:
    weight: A symmetric 8-bit, per-channel (or per-tensor) `QArray` (K, N).
    act_scale: Static activation scale (scalar or broadcastable to x), or
      None for dynamic per-token scales computed at run time.
  """

  weight: QArray
  act_scale: Optional[jax.Array] = None

  def tree_flatten(self):
    return (self.weight, self.act_scale), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children)

  def __qdot__(self, x):
    w = self.weight
    if w.bits != 8 or not w.spec.symmetric or w.spec.granularity == "group" or w.axis != -w.ndim:
      raise ValueError(f"W8A8Weight: weight must be symmetric int8, per-channel or per-tensor, contracting "
                       f"axis 0; got {w!r} with axis {w.axis}.")
    if self.act_scale is None:
      xq, xs = quantize_activations_per_token(x)
    else:
      xs = jnp.asarray(self.act_scale, jnp.float32)
      xq = quantize_activations_static(x, xs)

    def xla_w8a8(xq2, xs2, wq, ws):
      acc = int8_matmul(xq2, wq)
      return (acc.astype(jnp.float32) * xs2 * ws.astype(jnp.float32).reshape(-1)).astype(x.dtype)

    if not kernels_enabled():
      return xla_w8a8(xq, xs, w.qvalue, w.scale)
    from pallas_kernels import w8a8  # Pallas on TPU/CUDA (chosen at lowering), this XLA code elsewhere.
    return w8a8.w8a8_matmul(xq, xs, w.qvalue, w.scale, out_dtype=x.dtype, fallback=xla_w8a8)


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
  from pallas_kernels import w4a16  # late: keeps `import jquant` light and free of cycles
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
