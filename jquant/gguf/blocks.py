"""GGML block bytes from jquant's codes and scales, and back.

`encode` writes the blocks of one quantized GGML type from a `Blocks` (the
integer codes and scales a `QArray` holds, laid out as GGUF rows) and `decode`
reads them back; `to_qarray` / `from_qarray` convert between `Blocks` and
packed `QArray` s. The layouts are llama.cpp's ``block_q*`` structs
(``ggml-common.h``), read by the ``gguf`` package's ``quants.dequantize``.

Rows are GGUF's: a ``(rows, k)`` array whose blocks run along ``k`` (the
contraction axis). Group parameters are ``(rows, k / group_size)``, super-group
ones ``(rows, k / 256)``.

Example:
    >>> import numpy as np, gguf, jquant
    >>> q = jquant.quantize(w, jquant.gguf.spec_for("Q4_K"))          # w: (512, 7) kernel (in, out)
    >>> b = from_qarray(q)                                             # rows = outputs: (7, 512)
    >>> raw = encode("Q4_K", b)                                        # (7, 2 * 144) uint8
    >>> back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K)
    >>> bool((back == np.asarray(jquant.dequantize(q)).T).all())
    True
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from jquant.gguf import types
from jquant.qarray import QArray


class Blocks(NamedTuple):
  """A quantized tensor's parts in GGUF row layout (numpy).

  Attributes:
    codes: (rows, k) int32 codes, signed for symmetric types (Q4_0: -8..7).
    scale: One-level types: (rows, G) float16 block scales ``d``. Two-level
      (k-quants): (rows, G) int32 group scale codes.
    min: Q4_1/Q5_1: (rows, G) float16 mins in jquant's sign (``x = d*q - min``,
      GGUF's ``m`` is ``-min``); Q2_K/Q4_K/Q5_K: (rows, G) int32 min codes;
      else None.
    super_scale: k-quants: (rows, S) float16 ``d``; else None.
    super_min: Q2_K/Q4_K/Q5_K: (rows, S) float16 ``dmin``; else None.
  """

  codes: np.ndarray
  scale: np.ndarray
  min: Optional[np.ndarray] = None
  super_scale: Optional[np.ndarray] = None
  super_min: Optional[np.ndarray] = None

  def take_rows(self, idx) -> "Blocks":
    """The same tensor with rows reordered (``idx`` as for ``np.take``)."""
    return Blocks(*(None if a is None else np.take(a, idx, axis=0) for a in self))


def _f16_bytes(a):
  return np.ascontiguousarray(a.astype(np.float16).reshape(-1, 1)).view(np.uint8)


def _bits_or(parts, shift):
  """OR of ``parts[i] << (shift * i)`` along axis -2 (uint8)."""
  out = np.zeros(parts.shape[:-2] + parts.shape[-1:], np.uint8)
  for i in range(parts.shape[-2]):
    out |= (parts[..., i, :].astype(np.uint8) << np.uint8(shift * i))
  return out


def _nibbles(u, n_blocks, halves):
  """Low/high nibble pairs: ``u`` (nb, halves*2*L) -> (nb, halves*L): byte = u[first] | u[second] << 4."""
  u = u.reshape(n_blocks, halves, 2, -1)
  return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n_blocks, -1)


def _high_plane(bits, n_blocks):
  """Bit b of byte j = bits[b*32 + j] (Q5_*'s qh and the k-quants' high bits)."""
  return _bits_or(bits.reshape(n_blocks, -1, 32), 1)


def _k_scales(sc, m):
  """Q4_K/Q5_K's 12 bytes holding eight 6-bit scales and eight 6-bit mins."""
  sc, m = sc.astype(np.uint8), m.astype(np.uint8)
  lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
  mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
  hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
  return np.concatenate([lo, mid, hi], axis=1)


def _k_scales_back(b):
  d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
  sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 0x30)], axis=1)
  mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
  return sc.astype(np.int32), mn.astype(np.int32)


def encode(name, b: Blocks) -> np.ndarray:
  """GGML blocks of type ``name`` holding ``b``: a ``(rows, k / block * block_bytes)`` uint8 array.

  Raises:
    ValueError: a float or unknown type; ``k`` not a multiple of the block.
  """
  name = _quant_type(name, "encode")
  values, nbytes = types.BLOCK[name]
  rows, k = b.codes.shape
  if k % values:
    raise ValueError(f"encode: rows of {k} values are not a multiple of {name}'s {values}-value blocks.")
  nb = rows * k // values
  spec = types.spec_for(name)
  g = values // spec.group_size if not spec.two_level else None
  u = (b.codes.astype(np.int32) - spec.qmin).astype(np.uint8).reshape(nb, values)
  if not spec.two_level:
    d = _f16_bytes(b.scale.reshape(nb, -1))
    assert g == 1
    if name == "Q8_0":
      parts = [d, (u.astype(np.int32) + spec.qmin).astype(np.int8).view(np.uint8)]
    else:
      ql = _nibbles(u & 15, nb, 1)
      parts = [d] + ([_f16_bytes(-b.min.reshape(nb, -1).astype(np.float16))] if spec.float_min else [])
      parts += ([np.packbits(u >> 4, axis=1, bitorder="little")] if spec.bits == 5 else []) + [ql]
  else:
    sc = (b.scale.reshape(nb, -1).astype(np.int32) - spec.scale_code_range[0]).astype(np.uint8)
    d = _f16_bytes(b.super_scale.reshape(nb))
    if name == "Q2_K":
      mn = b.min.reshape(nb, -1).astype(np.uint8)
      qs = _bits_or(u.reshape(nb, 2, 4, 32), 2).reshape(nb, 64)
      parts = [sc | (mn << 4), qs, d, _f16_bytes(b.super_min.reshape(nb))]
    elif name == "Q3_K":
      qs = _bits_or((u & 3).reshape(nb, 2, 4, 32), 2).reshape(nb, 64)
      scales = np.concatenate([(sc[:, :8] & 15) | ((sc[:, 8:] & 15) << 4),
                               _bits_or((sc >> 4).reshape(nb, 4, 4), 2)], axis=1)
      parts = [_high_plane(u >> 2, nb), qs, scales, d]
    elif name in ("Q4_K", "Q5_K"):
      parts = [d, _f16_bytes(b.super_min.reshape(nb)), _k_scales(sc, b.min.reshape(nb, -1))]
      parts += ([_high_plane(u >> 4, nb)] if name == "Q5_K" else []) + [_nibbles(u & 15, nb, 4)]
    else:  # Q6_K
      ql = _nibbles(u & 15, nb, 2)
      qh = _bits_or((u >> 4).reshape(nb, 2, 4, 32), 2).reshape(nb, 64)
      signed = b.scale.reshape(nb, -1).astype(np.int8).view(np.uint8)
      parts = [ql, qh, signed, d]
  out = np.concatenate(parts, axis=1)
  assert out.shape == (nb, nbytes), (name, out.shape)
  return out.reshape(rows, k // values * nbytes)


def decode(name, data) -> Blocks:
  """Inverse of `encode`: ``data`` (rows, row bytes) uint8 -> `Blocks`."""
  name = _quant_type(name, "decode")
  values, nbytes = types.BLOCK[name]
  data = np.ascontiguousarray(np.asarray(data).view(np.uint8))
  rows = data.shape[0]
  if data.ndim != 2 or data.shape[1] % nbytes:
    raise ValueError(f"decode: data of shape {data.shape} is not (rows, n * {nbytes}) {name} blocks.")
  nbpr = data.shape[1] // nbytes
  k = nbpr * values
  nb = rows * nbpr
  blk = data.reshape(nb, nbytes)
  spec = types.spec_for(name)

  def f16(a):
    return np.ascontiguousarray(a).view(np.float16).reshape(nb)

  def unnib(b, halves):
    b = b.reshape(nb, halves, 1, -1)
    return np.concatenate([b & 15, b >> 4], axis=2).reshape(nb, -1)

  def plane(b):
    return ((b.reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(nb, -1)

  def crumbs(b, n):
    return ((b.reshape(nb, -1, 1, n) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3).reshape(nb, -1)

  mn = sup = supm = None
  if not spec.two_level:
    d = f16(blk[:, 0:2])
    if name == "Q8_0":
      q = blk[:, 2:].view(np.int8).astype(np.int32)
    else:
      off = 2
      if spec.float_min:
        mn = -f16(blk[:, 2:4])
        off = 4
      if spec.bits == 5:
        hb = np.unpackbits(blk[:, off:off + 4], axis=1, bitorder="little")
        u = unnib(blk[:, off + 4:], 1) | (hb << 4)
      else:
        u = unnib(blk[:, off:], 1)
      q = u.astype(np.int32) + spec.qmin
    scale = d.reshape(rows, -1)
    mn = None if mn is None else mn.reshape(rows, -1)
  else:
    lo = spec.scale_code_range[0]
    if name == "Q2_K":
      s = blk[:, :16]
      sc, m = (s & 15).astype(np.int32), (s >> 4).astype(np.int32)
      q = crumbs(blk[:, 16:80], 32).astype(np.int32)
      sup, supm = f16(blk[:, 80:82]), f16(blk[:, 82:84])
    elif name == "Q3_K":
      hb = plane(blk[:, :32])
      ql = crumbs(blk[:, 32:96], 32)
      s = blk[:, 96:108]
      low = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=1)
      high = crumbs(s[:, 8:12], 4)
      sc = (low | (high << 4)).astype(np.int32) + lo
      q = (ql | (hb << 2)).astype(np.int32) - 4
      sup, m = f16(blk[:, 108:110]), None
    elif name in ("Q4_K", "Q5_K"):
      sup, supm = f16(blk[:, 0:2]), f16(blk[:, 2:4])
      sc, m = _k_scales_back(blk[:, 4:16])
      if name == "Q5_K":
        q = (unnib(blk[:, 48:], 4) | (plane(blk[:, 16:48]) << 4)).astype(np.int32)
      else:
        q = unnib(blk[:, 16:], 4).astype(np.int32)
    else:  # Q6_K
      low = unnib(blk[:, :128], 2)
      high = crumbs(blk[:, 128:192], 32)
      q = (low | (high << 4)).astype(np.int32) - 32
      sc = blk[:, 192:208].view(np.int8).astype(np.int32)
      sup, m = f16(blk[:, 208:210]), None
    scale = sc.reshape(rows, -1)
    mn = None if m is None else m.reshape(rows, -1)
    sup = sup.reshape(rows, -1)
    supm = None if supm is None else supm.reshape(rows, -1)
  return Blocks(q.reshape(rows, k), scale, mn, sup, supm)


def _quant_type(name, fn):
  key = types.check_type(name, fn)
  if key in types.FLOAT_TYPES:
    raise ValueError(f"{fn}: {key} is a float type (no blocks); allowed: {', '.join(types.QUANT_TYPES)}.")
  return key


def to_qarray(name, b: Blocks, *, axis: int = 0, dtype=jnp.float32) -> QArray:
  """A packed `QArray` of GGML type ``name`` from `Blocks` (rows = the non-contraction axis).

  Args:
    name: The quantized type.
    b: The parts, GGUF row layout ``(rows, k)``.
    axis: 0: a jquant kernel ``(k, rows)`` (``(in, out)``); 1 or -1: an
      embedding-like ``(rows, k)`` array quantized along its last axis.
    dtype: What the QArray dequantizes to.
  """
  name = _quant_type(name, "to_qarray")
  if axis not in (0, 1, -1):
    raise ValueError(f"to_qarray: axis={axis!r}; allowed: 0 (a (k, rows) kernel) or 1/-1 (a (rows, k) table).")
  spec = types.spec_for(name, axis=axis)
  t = (lambda a: None if a is None else np.ascontiguousarray(a.T)) if axis == 0 else (lambda a: a)
  if spec.two_level:
    return QArray.from_two_level(t(b.codes), t(b.scale), t(b.super_scale), t(b.min), t(b.super_min), spec, dtype)
  return QArray.from_codes(t(b.codes), t(b.scale.astype(np.float32)),
                           None if b.min is None else t(b.min.astype(np.float32)), spec, dtype)


def from_qarray(q: QArray) -> Blocks:
  """The `Blocks` (GGUF rows: the non-contraction axis) of a 2-D `QArray` on a GGML grid.

  Raises:
    ValueError: ``q`` is not 2-D, or its spec is no GGML type's grid.
  """
  name = types.type_of(q)
  if name is None:
    raise ValueError(f"from_qarray: the QArray's spec is no GGML type's grid ({q.spec}); allowed: the specs of "
                     f"jquant.gguf.spec_for(type) for type in {types.QUANT_TYPES}.")
  if q.ndim != 2 or q.axis_shape is not None:
    raise ValueError(f"from_qarray: need a 2-D QArray with one contraction axis, got shape {q.shape}.")
  a = q.axis % 2
  rows = (lambda x: None if x is None else np.ascontiguousarray(np.asarray(x).T)) if a == 0 else np.asarray
  codes = rows(q.codes())
  if q.spec.two_level:
    sc, m = q.scale_codes()
    return Blocks(codes, rows(sc), None if m is None else rows(m), rows(q.super_scale).astype(np.float16),
                  None if q.super_min is None else rows(q.super_min).astype(np.float16))
  return Blocks(codes, rows(q.scale).astype(np.float16),
                None if q.zero_point is None else rows(q.zero_point).astype(np.float16))


__all__ = ["Blocks", "encode", "decode", "to_qarray", "from_qarray"]
