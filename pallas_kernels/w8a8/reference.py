"""W8A8 in plain XLA: int8 x int8 -> int32, scales in the epilogue.

This is the ground truth of the Pallas kernels and the fallback wherever no
kernel applies (CPU, other GPUs, odd dtypes).

Example:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels.w8a8 import reference
    >>> x = jnp.ones((2, 4), jnp.int8); w = jnp.full((4, 3), 2, jnp.int8)
    >>> reference.int8_matmul(x, w)[0]
    Array([8, 8, 8], dtype=int32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def int8_matmul(x_q, w_q):
  """Exact int8 (M, K) x int8 (K, N) -> int32 (M, N)."""
  return jax.lax.dot_general(x_q, w_q, (((x_q.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.int32)


def epilogue(acc, x_scale, w_scale, out_dtype):
  """``acc * x_scale (M,1) * w_scale (1,N)`` in float32, cast to ``out_dtype``."""
  y = acc.astype(jnp.float32)
  if x_scale is not None:
    y = y * x_scale.astype(jnp.float32)
  if w_scale is not None:
    y = y * w_scale.astype(jnp.float32)
  return y.astype(out_dtype)


def w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.bfloat16):
  """The W8A8 product; returns the raw int32 accumulators when both scales are None.

  Args:
    x_q: int8 (M, K) activations.
    x_scale: float (M, 1) per-token scales, or None.
    w_q: int8 (K, N) weights.
    w_scale: float (1, N) per-channel scales, or None.
    out_dtype: Output dtype when scales are given.
  """
  acc = int8_matmul(x_q, w_q)
  if x_scale is None and w_scale is None:
    return acc
  return epilogue(acc, x_scale, w_scale, out_dtype)


def quantize_per_token(x):
  """Dynamic symmetric INT8 per row: ``(x_int8, scale (M,1) float32)``, ``x ~= x_int8 * scale``.

  This is `jquant.ops.quantize_activations_per_token`, the one activation
  quantizer of W8A8 serving, SmoothQuant's search and QAT (see that function
  for the arithmetic); the kernels take its codes and scales.
  """
  from jquant.ops import quantize_activations_per_token  # late: pallas_kernels imports no jquant at load time
  return quantize_activations_per_token(x)
