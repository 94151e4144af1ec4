"""`qdot`: the one matmul the models call, whatever their weights hold.

``qdot(x, w)`` contracts the last axis of ``x`` with the first axis of ``w``:

* ``w`` a float array: a plain ``jnp.dot``.
* ``w`` a `QArray` (weight-only quantization): dequantized inside the compiled
  function and multiplied in ``x``'s dtype. Weights stay packed in memory.
* ``w`` an object with a ``__qdot__(x)`` method: it computes the product
  itself (`W8A8Weight` below; QAT's fake-quantized weights).

Example:
    >>> q = jquant.quantize(w, jquant.QuantSpec(bits=8))
    >>> y = jquant.ops.qdot(x, jquant.ops.W8A8Weight(q))   # int8 x int8 -> int32
"""

from __future__ import annotations

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
    acc = int8_matmul(xq, w.qvalue)
    return (acc.astype(jnp.float32) * xs * w.scale.astype(jnp.float32).reshape(-1)).astype(x.dtype)


def _xla_weight_only(x, w: QArray):
  if w.axis != -w.ndim or w.ndim != 2:
    raise ValueError(f"qdot: a QArray weight must be 2-D (K, N) contracting axis 0; got shape {w.shape}, "
                     f"axis {w.axis}.")
  return jnp.dot(x, dequantize(w, x.dtype))


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
    return _xla_weight_only(x, w)
  return jnp.dot(x, w.astype(x.dtype) if hasattr(w, "astype") else w)
