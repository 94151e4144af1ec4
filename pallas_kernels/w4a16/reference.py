"""Weight-only matmul in plain XLA: unpack, dequantize, ``jnp.dot``.

The payload follows `jquant.packing`: INT4 holds two codes per byte along the
contraction axis K (row j: code 2j in the low nibble, 2j+1 in the high
nibble); 5..8 bits hold one code per byte. Symmetric codes below 8 bits are
stored offset by ``2^(bits-1)``; symmetric 8-bit is stored as int8; asymmetric
codes are unsigned with a uint8 zero point per group. Scales are ``(G, N)``
with ``G = ceil(K / group_size)`` (``G = 1``: per channel).

This is the ground truth of the kernels and the fallback where none applies.

Example:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels.w4a16 import reference
    >>> packed = jnp.full((4, 3), 0x98, jnp.uint8)          # codes 8 (lo), 9 (hi)
    >>> lay = reference.WeightLayout(bits=4, k=8, group_size=8, offset=8)
    >>> reference.dequantize(packed, jnp.ones((1, 3)), None, lay)[:2, 0]
    Array([0., 1.], dtype=float32)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PACKED_BITS = (4, 5, 6, 7, 8)


@dataclasses.dataclass(frozen=True)
class WeightLayout:
  """Static description of a weight-only payload.

  Attributes:
    bits: 4 (two codes per byte) or 5..8 (one code per byte).
    k: Logical contraction size K.
    group_size: Contraction rows per scale (K or more means one group).
    offset: Subtracted from stored codes when there is no zero point
      (``2^(bits-1)`` for offset-binary symmetric codes, 0 for int8).
  """

  bits: int
  k: int
  group_size: int
  offset: int

  def __post_init__(self):
    if self.bits not in PACKED_BITS:
      raise ValueError(f"WeightLayout: bits={self.bits!r}; allowed: {PACKED_BITS}.")
    if self.k < 1 or self.group_size < 1:
      raise ValueError(f"WeightLayout: k={self.k!r} and group_size={self.group_size!r} must be positive.")

  @property
  def num_groups(self) -> int:
    return -(-self.k // self.group_size)

  @property
  def packed_rows(self) -> int:
    return -(-self.k // 2) if self.bits == 4 else self.k


def unpack_codes(packed, layout: WeightLayout):
  """Stored codes as int32 (K, N) (before offset / zero point)."""
  w = packed.astype(jnp.int32)
  if layout.bits == 4:
    w = w & 0xFF  # uint8 payload; keeps the nibbles of any signed view
    codes = jnp.stack([w & 0xF, w >> 4], axis=1).reshape(-1, packed.shape[1])
    return codes[: layout.k]
  return w[: layout.k]


def dequantize(packed, scale, zero_point, layout: WeightLayout):
  """Float32 (K, N) weights: ``(code - zero) * scale`` per group."""
  c = unpack_codes(packed, layout).astype(jnp.float32)
  n = packed.shape[1]
  s = jnp.broadcast_to(scale.astype(jnp.float32), (scale.shape[0], n))
  rows = jnp.arange(layout.k) // layout.group_size
  rows = jnp.minimum(rows, s.shape[0] - 1)
  if zero_point is None:
    z = float(layout.offset)
  else:
    z = jnp.broadcast_to(zero_point.astype(jnp.float32), (zero_point.shape[0], n))[rows]
  return (c - z) * s[rows]


def weight_only_matmul(x, packed, scale, zero_point, layout: WeightLayout, out_dtype=None):
  """``x (M, K) @ dequantize(...)``: dequantized in ``x.dtype``, accumulated in float32."""
  out_dtype = out_dtype or x.dtype
  w = dequantize(packed, scale, zero_point, layout).astype(x.dtype)
  y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return y.astype(out_dtype)
