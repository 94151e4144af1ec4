"""GGML tensor types as jquant grids: one `QuantSpec` preset per block type.

Each quantized type's spec has exactly the type's values (llama.cpp,
``ggml-quants.c``; the ``gguf`` package's ``quants.dequantize``):

=====  =====================================================  ============
type   value of code q in a block                             jquant spec
=====  =====================================================  ============
Q8_0   ``d * q``, q in [-128, 127], 32 per f16 d              8-bit symmetric, group 32
Q4_0   ``d * q``, q in [-8, 7]                                4-bit symmetric, group 32
Q5_0   ``d * q``, q in [-16, 15]                              5-bit symmetric, group 32
Q4_1   ``d * q + m``, q in [0, 15], f16 d and m               4-bit, float min, group 32
Q5_1   ``d * q + m``, q in [0, 31]                            5-bit, float min, group 32
Q2_K   ``d*sc*q - dmin*m``, 16 x 16 per 256, 4-bit sc, m      2-bit, min, two-level 4-bit
Q3_K   ``d*sc*q``, q in [-4, 3], sc in [-32, 31]              3-bit symmetric, two-level 6-bit
Q4_K   ``d*sc*q - dmin*m``, 8 x 32 per 256, 6-bit sc, m       4-bit, min, two-level 6-bit
Q5_K   as Q4_K with q in [0, 31]                              5-bit, min, two-level 6-bit
Q6_K   ``d*sc*q``, q in [-32, 31], 16 x 16, int8 sc           6-bit symmetric, two-level 8-bit
=====  =====================================================  ============

F32, F16 and BF16 are float types (no spec): their grid is the dtype.
Every block runs along a tensor's rows, i.e. the contraction (input) axis of
a weight, so specs quantize along ``axis`` (0 for a jquant ``(in, out)``
kernel, -1 for an embedding table).

Example:
    >>> import jquant
    >>> spec = jquant.gguf.spec_for("Q4_K")                 # axis 0: a Dense kernel (in, out)
    >>> q = jquant.quantize(w, spec)                        # RTN onto Q4_K's grid
    >>> jquant.gguf.type_of(q)
    'Q4_K'
    >>> jquant.gguf.fallback_type("Q4_K", 576)              # 576 inputs: no 256-blocks
    ('Q5_0', "576 inputs are not a multiple of Q4_K's 256-value blocks; llama.cpp's fallback is Q5_0")
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jquant.spec import QuantSpec

FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
TYPES = FLOAT_TYPES + QUANT_TYPES

# (block values, block bytes), as gguf.GGML_QUANT_SIZES.
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
         "Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
         "Q5_K": (256, 176), "Q6_K": (256, 210)}

_F16 = dict(granularity="group", scale_dtype="float16")
_PRESETS = {
    "Q8_0": QuantSpec(bits=8, group_size=32, symmetric_scale="max", **_F16),
    "Q4_0": QuantSpec(bits=4, group_size=32, full_range=True, **_F16),
    "Q5_0": QuantSpec(bits=5, group_size=32, dense_pack=True, full_range=True, **_F16),
    "Q4_1": QuantSpec(bits=4, symmetric=False, offset="min", group_size=32, **_F16),
    "Q5_1": QuantSpec(bits=5, symmetric=False, offset="min", group_size=32, dense_pack=True, **_F16),
    "Q2_K": QuantSpec(bits=2, symmetric=False, offset="min", group_size=16, super_group_size=256, scale_bits=4,
                      **_F16),
    "Q3_K": QuantSpec(bits=3, group_size=16, super_group_size=256, scale_bits=6, full_range=True, **_F16),
    "Q4_K": QuantSpec(bits=4, symmetric=False, offset="min", group_size=32, super_group_size=256, scale_bits=6,
                      **_F16),
    "Q5_K": QuantSpec(bits=5, symmetric=False, offset="min", group_size=32, super_group_size=256, scale_bits=6,
                      dense_pack=True, **_F16),
    "Q6_K": QuantSpec(bits=6, group_size=16, super_group_size=256, scale_bits=8, dense_pack=True, full_range=True,
                      **_F16),
}

# Q4_0, Q5_0, Q3_K and Q6_K pick scales as llama.cpp's quantizers do (full_range: the largest magnitude
# maps to the lowest code); Q8_0 uses amax / 127 as llama.cpp's does.

# llama.cpp (llama-quant.cpp) replaces a k-quant whose rows are not a multiple of 256 by these; its
# Q2_K/Q3_K fallback is IQ4_NL, a non-uniform grid jquant does not model, so jquant uses Q4_0 (same
# 4.5 bits per weight). A fallback whose block does not divide the row either becomes F16.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# Fields that define a grid (the values); the rest (clipping, rounding, axis, packing) do not.
_GRID_FIELDS = ("bits", "symmetric", "granularity", "group_size", "scale_dtype", "offset", "super_group_size",
                "scale_bits")


def check_type(name, fn: str = "jquant.gguf") -> str:
  """``name`` as a canonical type name ("q4_k" -> "Q4_K").

  Raises:
    ValueError: not a supported type (the message lists them).
  """
  key = str(getattr(name, "name", name)).upper()
  if key not in TYPES:
    raise ValueError(f"{fn}: GGML type {name!r} is not supported; supported: {', '.join(TYPES)}.")
  return key


def spec_for(name, axis=0, **overrides) -> QuantSpec:
  """The `QuantSpec` whose values are exactly GGML type ``name``'s.

  Args:
    name: A quantized type of `QUANT_TYPES` (case-insensitive).
    axis: The contraction axis of the weight (0 for an ``(in, out)`` kernel).
    **overrides: Solver settings that keep the grid (``clip="mse"``,
      ``clip_ratio``, ``rounding``, ``mse_*``, ``pad_groups``).

  Raises:
    ValueError: a float or unknown type, or an override that changes the grid.

  Example:
    >>> spec_for("Q6_K").scale_bits, spec_for("q4_0", axis=-1).axis
    (8, -1)
  """
  key = check_type(name, "spec_for")
  if key in FLOAT_TYPES:
    raise ValueError(f"spec_for: {key} is a float type (no quantization grid); allowed: {', '.join(QUANT_TYPES)}.")
  bad = sorted(set(overrides) & set(_GRID_FIELDS + ("dense_pack", "axis")))
  if bad:
    raise ValueError(f"spec_for: overrides {bad} would change {key}'s grid; allowed: solver settings such as "
                     "clip, clip_ratio, rounding, mse_grid, mse_max_shrink, mse_norm, pad_groups.")
  return _PRESETS[key].replace(axis=axis, **overrides)


def type_of(spec_or_qarray) -> Optional[str]:
  """The GGML type whose grid a spec (or a `QArray`'s spec) is, or None.

  Example:
    >>> type_of(jquant.QuantSpec(bits=8, granularity="group", group_size=32, scale_dtype="float16"))
    'Q8_0'
  """
  spec = getattr(spec_or_qarray, "spec", spec_or_qarray)
  for name, preset in _PRESETS.items():
    if all(getattr(spec, f) == getattr(preset, f) for f in _GRID_FIELDS):
      return name
  return None


def fallback_type(name, k: int, *, fallback: bool = True) -> tuple[str, Optional[str]]:
  """The type a tensor with rows of ``k`` values gets when ``name`` is asked for, as llama.cpp picks it.

  Returns:
    ``(type, reason)``: ``name`` itself and None when ``k`` is a multiple of
    its block size; otherwise the fallback type and why.

  Raises:
    ValueError: ``fallback=False`` and the block size does not divide ``k``.
  """
  key = check_type(name, "fallback_type")
  block = BLOCK[key][0]
  if k % block == 0:
    return key, None
  if not fallback:
    raise ValueError(f"jquant.gguf: {k} inputs are not a multiple of {key}'s {block}-value blocks and "
                     "fallback=False; allowed: pass fallback=True (llama.cpp's fallback types) or choose a type "
                     f"whose block divides {k}.")
  alt = FALLBACK.get(key)
  if alt is None or k % BLOCK[alt][0]:
    alt = "F16"
  return alt, (f"{k} inputs are not a multiple of {key}'s {block}-value blocks; llama.cpp's fallback is {alt}"
               + (" (llama.cpp: IQ4_NL, not a jquant grid)" if key in ("Q2_K", "Q3_K") and alt == "Q4_0" else ""))


def bits_per_weight(name) -> float:
  """Storage bits per weight of GGML type ``name`` (Q4_K: 4.5)."""
  values, nbytes = BLOCK[check_type(name, "bits_per_weight")]
  return nbytes * 8 / values


def float_dtype(name) -> np.dtype:
  """The numpy dtype of a float type (BF16 as ml_dtypes' bfloat16)."""
  key = check_type(name, "float_dtype")
  if key == "BF16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16)}[key]


__all__ = ["TYPES", "FLOAT_TYPES", "QUANT_TYPES", "BLOCK", "FALLBACK", "check_type", "spec_for", "type_of",
           "fallback_type", "bits_per_weight", "float_dtype"]
