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

With ``dense=True`` (`jquant.QuantSpec.dense_pack`) 5..7-bit codes are packed
densely too: ``values = 8 / gcd(bits, 8)`` codes share ``bits * values / 8``
bytes as one little-endian bit string, code i at bits ``bits*i ..`` (the
2..4-bit layouts above are this same rule; 8 bits stays one per byte).

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

import math

import jax.numpy as jnp


def pack_unit(bits: int, dense: bool = False) -> tuple[int, int]:
  """(values per unit, bytes per unit) of the layout for ``bits`` (``dense``: 5..7 bits packed too)."""
  if not 2 <= bits <= 8:
    raise ValueError(f"pack_unit: bits={bits!r}; allowed: 2..8.")
  if dense and bits in (5, 6, 7):
    g = math.gcd(bits, 8)
    return 8 // g, bits // g
  return {2: (4, 1), 3: (8, 3), 4: (2, 1)}.get(bits, (1, 1))


def packed_size(size: int, bits: int, dense: bool = False) -> int:
  """Bytes along the packed axis for ``size`` logical values."""
  values, nbytes = pack_unit(bits, dense)
  return -(-size // values) * nbytes


def _pack_dense(c, bits: int, values: int, nbytes: int, rest):
  """(units, values, *rest) uint32 codes -> (units * nbytes, *rest) uint8: one bit string per unit."""
  out = []
  for j in range(nbytes):  # byte j holds bits 8j..8j+7 of the unit's bit string
    byte = jnp.zeros(c.shape[:1] + rest, jnp.uint32)
    for i in range(values):
      lo = bits * i - 8 * j  # where code i starts relative to byte j
      if lo >= 8 or lo + bits <= 0:
        continue
      byte = byte | ((c[:, i] << lo) if lo >= 0 else (c[:, i] >> -lo))
    out.append(byte & 0xFF)
  return jnp.stack(out, axis=1).astype(jnp.uint8).reshape((c.shape[0] * nbytes,) + rest)


def _unpack_dense(p, bits: int, values: int, nbytes: int, rest):
  """(units, nbytes, *rest) uint32 bytes -> (units, values, *rest) uint32 codes."""
  codes = []
  for i in range(values):
    b0 = bits * i // 8
    word = p[:, b0] | ((p[:, b0 + 1] << 8) if b0 + 1 < nbytes else 0)  # a code spans at most 2 bytes
    codes.append((word >> (bits * i - 8 * b0)) & jnp.uint32(2**bits - 1))
  return jnp.stack(codes, axis=1)


def pack(codes, bits: int, axis: int = 0, dense: bool = False):
  """Packs unsigned codes (values in [0, 2^bits)) densely along ``axis``.

  Args:
    codes: Integer array; values must lie in [0, 2**bits).
    bits: Code width, 2..8.
    axis: The axis to pack along.
    dense: Pack 5..7-bit codes densely (see the module docstring).

  Returns:
    A uint8 array whose ``axis`` has ``packed_size(codes.shape[axis], bits, dense)``
    entries; the other axes are unchanged.
  """
  values, nbytes = pack_unit(bits, dense)
  codes = jnp.moveaxis(jnp.asarray(codes), axis, 0)
  size, rest = codes.shape[0], codes.shape[1:]
  if values == 1:
    return jnp.moveaxis(codes.astype(jnp.uint8), 0, axis)
  pad = -size % values
  c = jnp.pad(codes.astype(jnp.uint32), [(0, pad)] + [(0, 0)] * len(rest))
  c = c.reshape((c.shape[0] // values, values) + rest)
  if bits * values > 32:
    return jnp.moveaxis(_pack_dense(c, bits, values, nbytes, rest), 0, axis)
  shifts = (jnp.arange(values, dtype=jnp.uint32) * bits).reshape((1, values) + (1,) * len(rest))
  # Disjoint bit fields: or == sum. A sum, because a sharded axis may split a unit over devices, and XLA's
  # CPU collectives have no OR all-reduce (3-bit codes of a 32-row weight on 8 devices failed to compile).
  word = jnp.sum(c << shifts, axis=1, dtype=jnp.uint32)
  if nbytes == 1:
    out = word.astype(jnp.uint8)
  else:
    byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8).reshape((1, nbytes) + (1,) * len(rest))
    out = ((word[:, None] >> byte_shifts) & 0xFF).astype(jnp.uint8)
    out = out.reshape((out.shape[0] * nbytes,) + rest)
  return jnp.moveaxis(out, 0, axis)


def unpack(packed, bits: int, size: int, axis: int = 0, dtype=jnp.uint8, dense: bool = False):
  """Inverse of `pack`: returns ``size`` codes along ``axis`` as ``dtype``."""
  values, nbytes = pack_unit(bits, dense)
  p = jnp.moveaxis(jnp.asarray(packed), axis, 0)
  rest = p.shape[1:]
  if values == 1:
    return jnp.moveaxis(p[:size].astype(dtype), 0, axis)
  units = p.shape[0] // nbytes
  p = p.astype(jnp.uint32).reshape((units, nbytes) + rest)
  if bits * values > 32:
    c = _unpack_dense(p, bits, values, nbytes, rest).reshape((units * values,) + rest)[:size]
    return jnp.moveaxis(c.astype(dtype), 0, axis)
  if nbytes == 1:
    word = p[:, 0]
  else:
    byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8).reshape((1, nbytes) + (1,) * len(rest))
    word = jnp.sum(p << byte_shifts, axis=1, dtype=jnp.uint32)  # disjoint bytes: or == sum (see pack)
  shifts = (jnp.arange(values, dtype=jnp.uint32) * bits).reshape((1, values) + (1,) * len(rest))
  c = (word[:, None] >> shifts) & jnp.uint32(2**bits - 1)
  c = c.reshape((units * values,) + rest)[:size]
  return jnp.moveaxis(c.astype(dtype), 0, axis)
