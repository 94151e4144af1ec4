"""Dense bit packing of unsigned integer codes along one axis.

Layouts (``values`` consecutive codes along ``axis`` share ``nbytes`` bytes):

========  ======  =====  ====================================================
bits      values  bytes  layout
========  ======  =====  ====================================================
2         4       1      code i of a unit at bits 2i..2i+1 of the byte
3         8       3      a little-endian 24-bit word, code i at bits 3i..3i+2
4         2       1      code 0 in the low nibble, code 1 in the high nibble
5..8      1       1      one code per byte (uint8)
========  ======  =====  ====================================================

The axis is zero-padded up to a multiple of ``values``; `unpack` takes the
logical size back. Everything is pure ``jax.numpy`` and jit-able.

Example:
    >>> import jax.numpy as jnp
    >>> codes = jnp.arange(16, dtype=jnp.uint8).reshape(16, 1)
    >>> packed = pack(codes, bits=4, axis=0)      # (8, 1) uint8
    >>> bool((unpack(packed, bits=4, size=16, axis=0) == codes).all())
    True
"""

from __future__ import annotations

import jax.numpy as jnp


def pack_unit(bits: int) -> tuple[int, int]:
  """(values per unit, bytes per unit) of the layout for ``bits``."""
  if not 2 <= bits <= 8:
    raise ValueError(f"pack_unit: bits={bits!r}; allowed: 2..8.")
  return {2: (4, 1), 3: (8, 3), 4: (2, 1)}.get(bits, (1, 1))


def packed_size(size: int, bits: int) -> int:
  """Bytes along the packed axis for ``size`` logical values."""
  values, nbytes = pack_unit(bits)
  return -(-size // values) * nbytes


def pack(codes, bits: int, axis: int = 0):
  """Packs unsigned codes (values in [0, 2^bits)) densely along ``axis``.

  Args:
    codes: Integer array; values must lie in [0, 2**bits).
    bits: Code width, 2..8.
    axis: The axis to pack along.

  Returns:
    A uint8 array whose ``axis`` has ``packed_size(codes.shape[axis], bits)``
    entries; the other axes are unchanged.
  """
  values, nbytes = pack_unit(bits)
  codes = jnp.moveaxis(jnp.asarray(codes), axis, 0)
  size, rest = codes.shape[0], codes.shape[1:]
  if values == 1:
    return jnp.moveaxis(codes.astype(jnp.uint8), 0, axis)
  pad = -size % values
  c = jnp.pad(codes.astype(jnp.uint32), [(0, pad)] + [(0, 0)] * len(rest))
  c = c.reshape((c.shape[0] // values, values) + rest)
  shifts = (jnp.arange(values, dtype=jnp.uint32) * bits).reshape((1, values) + (1,) * len(rest))
  word = jnp.bitwise_or.reduce(c << shifts, axis=1)  # disjoint bit fields: or == sum
  if nbytes == 1:
    out = word.astype(jnp.uint8)
  else:
    byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8).reshape((1, nbytes) + (1,) * len(rest))
    out = ((word[:, None] >> byte_shifts) & 0xFF).astype(jnp.uint8)
    out = out.reshape((out.shape[0] * nbytes,) + rest)
  return jnp.moveaxis(out, 0, axis)


def unpack(packed, bits: int, size: int, axis: int = 0, dtype=jnp.uint8):
  """Inverse of `pack`: returns ``size`` codes along ``axis`` as ``dtype``."""
  values, nbytes = pack_unit(bits)
  p = jnp.moveaxis(jnp.asarray(packed), axis, 0)
  rest = p.shape[1:]
  if values == 1:
    return jnp.moveaxis(p[:size].astype(dtype), 0, axis)
  units = p.shape[0] // nbytes
  p = p.astype(jnp.uint32).reshape((units, nbytes) + rest)
  if nbytes == 1:
    word = p[:, 0]
  else:
    byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8).reshape((1, nbytes) + (1,) * len(rest))
    word = jnp.bitwise_or.reduce(p << byte_shifts, axis=1)
  shifts = (jnp.arange(values, dtype=jnp.uint32) * bits).reshape((1, values) + (1,) * len(rest))
  c = (word[:, None] >> shifts) & jnp.uint32(2**bits - 1)
  c = c.reshape((units * values,) + rest)[:size]
  return jnp.moveaxis(c.astype(dtype), 0, axis)
