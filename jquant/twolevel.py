"""Two-level group scales: integer group scales (and mins) under float super-group scales.

llama.cpp's k-quants (Q2_K .. Q6_K) store, per super-group of 256 values,
one float16 scale ``d`` (and, with mins, ``dmin``) and per group of 16 or 32
values an integer scale code ``sc`` of 4, 6 or 8 bits (and a min code ``m``).
A value is ``x = (d * sc) * q - (dmin * m)``. The *effective* group scale
``d * sc`` (a float16 times an integer of at most 8 bits) is exact in
float32, so solvers can work with effective scales and `decompose` recovers
codes and super-group scales from them exactly.

All functions here take group parameters with the group axis first,
``(G, *rest)``, and super-group parameters ``(S, *rest)``; `jquant.qarray`
moves axes. Specs are `jquant.QuantSpec` s with ``scale_bits`` set.

Example:
    >>> import jax.numpy as jnp, jquant
    >>> spec = jquant.QuantSpec(bits=6, granularity="group", group_size=16, super_group_size=256,
    ...                         scale_bits=8, scale_dtype="float16")                     # Q6_K
    >>> raw = jnp.linspace(0.01, 0.02, 16)[:, None]          # 16 group scales, one column
    >>> codes, sup = split(raw, spec, signed=True)
    >>> eff = combine(codes, sup, spec)                       # exact float32 products d * sc
    >>> c2, s2, ok = decompose(eff, spec, signed=True)
    >>> bool(ok.all()), bool((combine(c2, s2, spec) == eff).all())
    (True, True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jquant import packing


def per_super(spec) -> int:
  """Groups per super-group (``super_group_size // group_size``)."""
  return spec.super_group_size // spec.group_size


def code_range(spec, signed: bool) -> tuple[int, int]:
  """(lowest, highest) integer scale code: signed for symmetric scales, unsigned for mins."""
  b = spec.scale_bits
  return (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if signed else (0, 2**b - 1)


def _by_super(a, spec):
  """(G, *rest) -> (S, R, *rest), zero-padding a short last super-group."""
  r = per_super(spec)
  g = a.shape[0]
  pad = -g % r
  if pad:
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
  return a.reshape((a.shape[0] // r, r) + a.shape[1:])


def expand(sup, spec, n_groups: int):
  """Super-group parameters (S, *rest) repeated over their groups: (G, *rest)."""
  return jnp.take(sup, jnp.arange(n_groups) // per_super(spec), axis=0)


def combine(codes, sup, spec):
  """Effective group parameters ``sup * codes`` (G, *rest) float32, exactly as GGML computes them."""
  return expand(sup.astype(jnp.float32), spec, codes.shape[0]) * codes.astype(jnp.float32)


def split(raw, spec, *, signed: bool):
  """Quantizes raw group scales (or mins) ``raw`` (G, *rest) onto the two-level grid (RTN).

  Per super-group, ``d = max |raw| / highest code``, rounded to ``scale_dtype``;
  each code is ``round(raw / d)`` clipped to the code range (llama.cpp's
  ``make_qkx`` second level).

  Returns:
    ``(codes, sup)``: int32 codes (G, *rest) and the super-group values (S,
    *rest) as float32 holding ``scale_dtype`` values (0 for an all-zero
    super-group, whose codes are 0).
  """
  lo, hi = code_range(spec, signed)
  raw = raw.astype(jnp.float32)
  amax = jnp.max(jnp.abs(_by_super(raw, spec)), axis=1)
  sup = (amax / hi).astype(spec.scale_dtype).astype(jnp.float32)
  d = expand(sup, spec, raw.shape[0])
  codes = jnp.where(d > 0, jnp.clip(jnp.round(raw / jnp.where(d > 0, d, 1.0)), lo, hi), 0.0)
  return codes.astype(jnp.int32), sup


def decompose(eff, spec, *, signed: bool):
  """Codes and super-group values with ``combine(codes, sup) == eff`` exactly, where they exist.

  For each super-group, the candidates ``d = max |eff| / k`` for ``k`` from
  the largest code magnitude down to 1 are tried (a valid ``d`` must be one
  of them); the first that is a ``scale_dtype`` value and gives integer codes
  in range reproducing every ``eff`` bit for bit is taken.

  Returns:
    ``(codes, sup, ok)``: int32 codes (G, *rest), float32 super values (S,
    *rest) and a bool (S, *rest) that is False where ``eff`` is not on the grid
    (there ``sup`` is NaN).
  """
  lo, hi = code_range(spec, signed)
  eff = eff.astype(jnp.float32)
  e = _by_super(eff, spec)
  amax = jnp.max(jnp.abs(e), axis=1)
  kmax = max(-lo, hi)

  def try_k(i, carry):
    sup, found = carry
    k = jnp.float32(kmax - i)
    d = (amax / k).astype(spec.scale_dtype).astype(jnp.float32)
    safe = jnp.where(d > 0, d, 1.0)[:, None]
    c = jnp.round(e / safe)
    ok = (d > 0) & jnp.all((c >= lo) & (c <= hi) & (safe * c == e), axis=1)
    take = ok & ~found
    return jnp.where(take, d, sup), found | ok

  zero = amax == 0
  sup, found = jax.lax.fori_loop(0, kmax, try_k, (jnp.zeros_like(amax), zero))
  sup = jnp.where(found, sup, jnp.nan)
  d = expand(sup, spec, eff.shape[0])
  codes = jnp.where(d > 0, jnp.round(eff / jnp.where(d > 0, d, 1.0)), 0.0)
  return codes.astype(jnp.int32), sup, found


def pack_codes(codes, spec, axis: int, *, signed: bool):
  """Scale codes (group axis at ``axis``) stored unsigned (offset by ``2^(b-1)`` when signed), packed
  densely at ``scale_bits`` along ``axis`` (a uint8 array)."""
  lo, _ = code_range(spec, signed)
  return packing.pack(jnp.asarray(codes).astype(jnp.int32) - lo, spec.scale_bits, axis, dense=True)


def unpack_codes(packed, spec, n_groups: int, axis: int, *, signed: bool):
  """Inverse of `pack_codes`: int32 codes with ``n_groups`` entries along ``axis``."""
  lo, _ = code_range(spec, signed)
  return packing.unpack(packed, spec.scale_bits, n_groups, axis, dtype=jnp.int32, dense=True) + lo


def bits_per_group(spec) -> float:
  """Storage bits per group of the scale (and min) codes and the share of super-group values."""
  n = 2 if spec.float_min else 1
  return n * (spec.scale_bits + np.dtype(jnp.dtype(spec.scale_dtype)).itemsize * 8 / per_super(spec))
