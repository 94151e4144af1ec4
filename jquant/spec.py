"""How to quantize one array: `QuantSpec`; what to quantize in a tree: `Rule`.

The two are kept apart on purpose: a `QuantSpec` says *how* (bits, symmetry,
granularity, rounding, clipping) and knows nothing about parameter names; a
`Rule` pairs a path pattern with a spec (or with ``None`` for "leave in float").

Example:
    >>> import jquant
    >>> spec = jquant.QuantSpec(bits=4, granularity="group", group_size=128)
    >>> rules = [jquant.Rule(r"embed", None), jquant.Rule(r"kernel$", spec)]
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "stochastic")
CLIPS = ("minmax", "mse", "fit")
SCALE_DTYPES = ("float32", "bfloat16", "float16")
OFFSETS = ("zero_point", "min")
SYMMETRIC_SCALES = ("signed", "max", "half")
DEFAULT_SYMMETRIC_SCALE = "signed"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one array is quantized.

  Attributes:
    bits: Integer width, 2..8.
    symmetric: Symmetric codes in [-2^(b-1), 2^(b-1)-1], ``x = scale * q``,
      the scale (of either sign) chosen by ``symmetric_scale``; otherwise unsigned codes in
      [0, 2^b-1] with an integer zero point per group.
    granularity: ``"tensor"`` (one scale), ``"channel"`` (one scale per slice
      along every non-contraction position) or ``"group"`` (one scale per
      ``group_size`` consecutive elements along the contraction axis).
    group_size: Group length along ``axis`` (granularity ``"group"`` only).
    axis: The contraction axis, or a tuple of adjacent contraction axes. A
      Flax ``Dense`` kernel is ``(in, out)``, so 0; a ``DenseGeneral`` output
      projection ``(heads, head_dim, d)`` contracts ``(0, 1)``. Several axes
      are flattened (row-major) into one contraction of their product's
      length, along which groups run and codes are packed.
    scale_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (GGUF's
      block scales). With two-level scales: the dtype of the super-group
      scales (and mins).
    rounding: ``"nearest"`` or ``"stochastic"`` (needs a PRNG key; for training).
    clip: ``"minmax"`` ranges; ``"mse"``: per group, the shrink of the range
      (over a grid, as in GPTQ's reference quantizer) with the least error;
      ``"fit"``: per group, codes assigned at 21 trial scales (the min-max
      step count +-1 in tenths), the least-squares scale (and float min or
      zero point) of each refitted in closed form, the best kept, min-max
      included (llama.cpp's k-quant searches, ``make_qkx2_quants``). Both
      searches weight each element by an ``importance`` when one is given
      (`jquant.compute_scale_zero`, GPTQ's static groups).
    clip_ratio: Fixed shrink of the range in (0, 1]; values outside are clipped.
    pad_groups: Allow a ``group_size`` that does not divide the contraction
      size; the last group is then shorter.
    mse_grid: Number of shrink candidates for ``clip="mse"``.
    mse_max_shrink: Largest shrink tried by ``clip="mse"`` (0.8 -> ranges down
      to 20% of min-max).
    mse_norm: The error norm p of ``clip="mse"`` (``sum |x - q|^p``).
    offset: Asymmetric specs only. ``"zero_point"``: an integer zero point
      per group, ``x = scale * (q - z)``; ``"min"``: a float min per group
      (stored in ``scale_dtype``), ``x = scale * q - min`` with ``min = -lo``
      the negated lower end of the group's range (llama.cpp's Q4_1/Q5_1
      ``x = d * q + m`` with ``m = -min``).
    super_group_size: Two-level scales (llama.cpp's k-quants): groups of
      ``group_size`` form super-groups of this many elements along the
      contraction axis (a multiple of ``group_size``; the contraction size a
      multiple of it unless ``pad_groups``). Each group's scale is an integer
      of ``scale_bits`` bits times its super-group's float scale (stored in
      ``scale_dtype``); with ``offset="min"`` its min likewise under a float
      super-group min: ``x = (d * sc) * q - (dmin * m)``. Needs ``scale_bits``
      and ``granularity="group"`` for quantizing.
    scale_bits: Width (2..8) of the per-group scale (and min) codes of
      two-level scales: signed ``[-2^(b-1), 2^(b-1)-1]`` for symmetric specs
      (Q3_K, Q6_K), unsigned ``[0, 2^b-1]`` for ``offset="min"`` (Q2_K, Q4_K,
      Q5_K). None: one-level scales.
    dense_pack: Pack 5..7-bit codes densely (``bits`` bytes per 8 codes)
      rather than one per byte (2..4 and 8 bits are dense either way).
    symmetric_scale: How a symmetric spec picks each group's scale from
      its (clipped) range; the grid, the storage and `dequantize` are the
      same for all three, only the quantizer differs:

      * ``"signed"`` (default): the group's largest-magnitude value
        ``x_max`` maps to ``qmin = -2^(b-1)`` exactly and the scale carries
        its sign (``scale = -x_max / 2^(b-1)``, negative for a positive
        ``x_max``; llama.cpp's Q4_0/Q5_0/Q3_K/Q6_K quantizers): all ``2^b``
        levels are used and the step is ``amax / 2^(b-1)``. Values of the
        other sign beyond ``2^(b-1) - 1/2`` steps clip (by at most half a
        step more). The best of the three on SmolLM2-135M RTN
        (``experiments/results/sym_grid.md``: W4 g128 Wikipedia perplexity
        32.8 vs 38.5 for ``"max"``, 34.0 for ``"half"``, 31.3 asymmetric).
      * ``"max"``: ``scale = amax / (2^(b-1) - 1)``, positive; the code
        ``-2^(b-1)`` is never used (jquant's rule before; GGUF's Q8_0 and
        the int8 activation quantizers of `jquant.ops`).
      * ``"half"``: ``scale = amax / (2^(b-1) - 1/2)``, positive (Qwix's
        rule): ``+-amax`` land half a step beyond the codes ``+-(2^(b-1) - 1)``
        (``-amax`` is a rounding tie to ``-2^(b-1)``), an implicit clip to
        ``(2^(b-1) - 1) / (2^(b-1) - 1/2)`` of the range (14/15 at 4 bits).

      Asymmetric specs ignore it (any value is replaced by the default, so
      that they compare equal).
    full_range: Constructor (and `replace`) keyword kept for existing code:
      ``True`` is ``symmetric_scale="signed"``, ``False`` the rule it meant
      before, ``"max"``. Read back as a property (``spec.full_range ==
      (spec.symmetric_scale == "signed")``); not a stored field, so
      checkpoints and equality see ``symmetric_scale`` only.

  Two-level specs exchange *effective* group scales ``d * sc`` (and mins
  ``dmin * m``) as float32 with the solvers (`jquant.compute_scale_zero`,
  ``quantize_values(scale=...)``, `jquant.QArray.from_codes`); those values
  are exact in float32 and `QArray` stores them as integer codes plus float
  super-group parameters.

  Example:
    >>> QuantSpec(bits=3, symmetric=False, granularity="group", group_size=64)
    QuantSpec(bits=3, symmetric=False, granularity='group', group_size=64, ...)
    >>> q4_k = QuantSpec(bits=4, symmetric=False, offset="min", granularity="group", group_size=32,
    ...                  super_group_size=256, scale_bits=6, scale_dtype="float16")
    >>> QuantSpec(bits=4, symmetric_scale="max").scale_divisor      # amax / 7 (jquant's old rule)
    7.0
  """

  bits: int = 8
  symmetric: bool = True
  granularity: str = "channel"
  group_size: Optional[int] = None
  axis: Any = 0
  scale_dtype: str = "float32"
  rounding: str = "nearest"
  clip: str = "minmax"
  clip_ratio: float = 1.0
  pad_groups: bool = False
  mse_grid: int = 100
  mse_max_shrink: float = 0.8
  mse_norm: float = 2.4
  offset: str = "zero_point"
  super_group_size: Optional[int] = None
  scale_bits: Optional[int] = None
  dense_pack: bool = False
  symmetric_scale: str = DEFAULT_SYMMETRIC_SCALE

  def __post_init__(self):
    # Numpy scalars (np.int64, np.float32, np.bool_) become Python values: equal, same hash, JSON-able.
    self._set("bits", _int(self.bits, "bits", "an int in 2..8", lo=2, hi=8))
    self._set("symmetric", _bool(self.symmetric, "symmetric"))
    _choice(self.granularity, "granularity", GRANULARITIES)
    if self.granularity == "group":
      self._set("group_size", _int(self.group_size, "group_size",
                                   "a positive int (granularity='group' needs one)", lo=1))
    elif self.group_size is not None:
      raise ValueError(
          f"QuantSpec: group_size={self.group_size!r} is only meaningful with granularity='group' "
          f"(got granularity={self.granularity!r}); allowed: None, or set granularity='group'.")
    axes = self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)
    if (not axes or any(isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)) for a in axes)
        or len(set(int(a) for a in axes)) != len(axes)):
      raise ValueError(f"QuantSpec: axis={self.axis!r}; allowed: an int, or a tuple of distinct ints "
                       "(adjacent contraction axes).")
    axes = tuple(int(a) for a in axes)
    self._set("axis", axes[0] if len(axes) == 1 and not isinstance(self.axis, (tuple, list)) else axes)
    try:
      dtype_name = self.scale_dtype if isinstance(self.scale_dtype, str) else jnp.dtype(self.scale_dtype).name
    except TypeError:
      dtype_name = None
    if dtype_name not in SCALE_DTYPES:
      raise ValueError(f"QuantSpec: scale_dtype={self.scale_dtype!r}; allowed: {SCALE_DTYPES}.")
    self._set("scale_dtype", dtype_name)
    _choice(self.rounding, "rounding", ROUNDINGS)
    _choice(self.clip, "clip", CLIPS)
    ratio = _float(self.clip_ratio, "clip_ratio", "a float in (0, 1]")
    if not 0.0 < ratio <= 1.0:
      raise ValueError(f"QuantSpec: clip_ratio={self.clip_ratio!r}; allowed: a float in (0, 1].")
    self._set("clip_ratio", ratio)
    self._set("pad_groups", _bool(self.pad_groups, "pad_groups"))
    self._set("mse_grid", _int(self.mse_grid, "mse_grid", "a positive int (shrink candidates of clip='mse')",
                               lo=1))
    shrink = _float(self.mse_max_shrink, "mse_max_shrink", "a float in [0, 1)")
    if not 0.0 <= shrink < 1.0:
      raise ValueError(f"QuantSpec: mse_max_shrink={self.mse_max_shrink!r}; allowed: a float in [0, 1) "
                       "(0.8: clip='mse' tries ranges down to 20% of min-max).")
    self._set("mse_max_shrink", shrink)
    norm = _float(self.mse_norm, "mse_norm", "a float > 0")
    if not 0.0 < norm < float("inf"):
      raise ValueError(f"QuantSpec: mse_norm={self.mse_norm!r}; allowed: a finite float > 0 (the p of "
                       "sum |x - q|^p; 2.4 as GPTQ's reference, 2.0 for squared error).")
    self._set("mse_norm", norm)
    self._check_grid_fields()

  def _set(self, name, value):
    object.__setattr__(self, name, value)

  def _apply_full_range(self, full_range, explicit_rule: bool) -> None:
    """The constructor alias: ``full_range=True`` is ``symmetric_scale="signed"``, False is ``"max"``."""
    full_range = _bool(full_range, "full_range")
    if full_range and not self.symmetric:
      raise ValueError(f"QuantSpec: full_range={full_range!r} with symmetric=False; allowed: True (symmetric "
                       "specs only) or False.")
    rule = "signed" if full_range else "max"
    if explicit_rule and (self.symmetric_scale == "signed") != full_range:
      raise ValueError(f"QuantSpec: full_range={full_range} (symmetric_scale={rule!r}) contradicts "
                       f"symmetric_scale={self.symmetric_scale!r}; allowed: give only symmetric_scale.")
    if not explicit_rule:
      self._set("symmetric_scale", rule)

  def _check_grid_fields(self):
    _choice(self.offset, "offset", OFFSETS)
    if self.offset == "min" and self.symmetric:
      raise ValueError("QuantSpec: offset='min' needs symmetric=False (a symmetric grid has no offset).")
    self._set("dense_pack", _bool(self.dense_pack, "dense_pack"))
    _choice(self.symmetric_scale, "symmetric_scale", SYMMETRIC_SCALES)
    if not self.symmetric:  # the rule is symmetric-only: asymmetric specs all carry the default (equal, hash)
      self._set("symmetric_scale", DEFAULT_SYMMETRIC_SCALE)
    if self.super_group_size is not None:
      self._set("super_group_size", _int(self.super_group_size, "super_group_size", "a positive int", lo=1))
    if self.scale_bits is not None:
      self._set("scale_bits", _int(self.scale_bits, "scale_bits", "integers 2..8", lo=2, hi=8))
    if (self.super_group_size is None) != (self.scale_bits is None):
      raise ValueError(
          f"QuantSpec: super_group_size={self.super_group_size!r} and scale_bits={self.scale_bits!r} go "
          "together; allowed: both None (one-level scales) or both set (two-level scales).")
    if self.scale_bits is None:
      return
    sg = self.super_group_size
    if not self.symmetric and self.offset != "min":
      raise ValueError("QuantSpec: two-level scales of an asymmetric spec need offset='min' (float mins "
                       "under a super-group min); integer zero points are not supported there.")
    if self.granularity == "group" and sg % self.group_size:
      raise ValueError(f"QuantSpec: super_group_size={sg} is not a multiple of group_size={self.group_size}; "
                       "allowed: a multiple (k-quants: 256 = 16 x 16 or 8 x 32).")

  @property
  def qmin(self) -> int:
    """The lowest code: ``-2^(b-1)`` (symmetric) or 0."""
    return -(2 ** (self.bits - 1)) if self.symmetric else 0

  @property
  def qmax(self) -> int:
    """The highest code: ``2^(b-1) - 1`` (symmetric) or ``2^b - 1``."""
    return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

  @property
  def scale_divisor(self) -> float:
    """``amax / scale`` of the one-level symmetric rules: ``2^(b-1) - 1/2`` ("half"), ``2^(b-1) - 1``
    ("max"), ``2^(b-1)`` ("signed", whose scale also carries the sign of the largest-magnitude value)."""
    half = 2 ** (self.bits - 1)
    return {"half": half - 0.5, "max": half - 1.0, "signed": float(half)}[self.symmetric_scale]

  @property
  def jnp_scale_dtype(self):
    """The dtype of the group scales solvers exchange: ``scale_dtype``, or float32 for
    two-level scales (their effective scales ``d * sc`` are exact in float32)."""
    return jnp.dtype("float32" if self.two_level else self.scale_dtype)

  @property
  def two_level(self) -> bool:
    """Whether group scales are integer codes under float super-group scales."""
    return self.scale_bits is not None

  @property
  def float_min(self) -> bool:
    """Whether groups carry a float min (``x = scale * q - min``) instead of an integer zero point."""
    return not self.symmetric and self.offset == "min"

  @property
  def scale_code_range(self) -> tuple[int, int]:
    """(lowest, highest) integer of two-level group scale codes (mins: ``(0, 2^b - 1)``)."""
    if self.scale_bits is None:
      raise ValueError("QuantSpec.scale_code_range: this spec has one-level scales (scale_bits=None).")
    if self.symmetric:
      return -(2 ** (self.scale_bits - 1)), 2 ** (self.scale_bits - 1) - 1
    return 0, 2**self.scale_bits - 1

  @property
  def standard_layout(self) -> bool:
    """True for the layouts the Pallas kernels read: integer zero points (or none), one-level float32 or
    bfloat16 scales (of either sign: ``symmetric_scale="signed"`` too), byte-aligned 5..8-bit codes."""
    return (self.offset == "zero_point" and not self.two_level and not self.dense_pack
            and self.scale_dtype in ("float32", "bfloat16"))

  def replace(self, **changes) -> "QuantSpec":
    """A copy with some fields changed (``dataclasses.replace``; ``full_range`` as in the constructor)."""
    if "full_range" in changes:
      full_range = changes.pop("full_range")
      spec = dataclasses.replace(self, **changes)
      spec._apply_full_range(full_range, "symmetric_scale" in changes)
      return spec
    return dataclasses.replace(self, **changes)

  def num_groups(self, size: int) -> int:
    """Scale count along the contraction axis for a contraction size ``size``."""
    if self.granularity != "group":
      return 1
    if size % self.group_size and not self.pad_groups:
      raise ValueError(
          f"QuantSpec: group_size={self.group_size} does not divide the contraction size {size} "
          f"(axis={self.axis}); allowed: a divisor of {size}, or pass pad_groups=True to let the last "
          "group be shorter.")
    return -(-size // self.group_size)

  def axes(self, ndim: int) -> tuple[int, ...]:
    """The contraction axes for an array of rank ``ndim``: non-negative, ascending, adjacent.

    Raises:
      ValueError: an axis is out of range, or the axes are not adjacent.
    """
    raw = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    for a in raw:
      if not -ndim <= a < ndim:
        raise ValueError(f"QuantSpec: axis={self.axis!r} is out of range for an array of rank {ndim}; "
                         f"allowed: axes in {-ndim}..{ndim - 1}.")
    axes = tuple(sorted(a % ndim for a in raw))
    if len(set(axes)) != len(axes) or axes != tuple(range(axes[0], axes[0] + len(axes))):
      raise ValueError(f"QuantSpec: axis={self.axis!r} names contraction axes {axes} of a rank-{ndim} array "
                       "that are not adjacent; allowed: adjacent axes (transpose the weight first).")
    return axes

  def num_super_groups(self, size: int) -> int:
    """Super-group count along the contraction axis (two-level specs)."""
    if not self.two_level:
      raise ValueError("QuantSpec.num_super_groups: this spec has one-level scales (scale_bits=None).")
    if self.granularity != "group":
      raise ValueError(f"QuantSpec: two-level scales need granularity='group' (their super-groups span several "
                       f"groups; for GPTQ pass static_groups=True), got granularity={self.granularity!r}.")
    if size % self.super_group_size and not self.pad_groups:
      raise ValueError(
          f"QuantSpec: super_group_size={self.super_group_size} does not divide the contraction size {size} "
          f"(axis={self.axis}); allowed: a multiple of {self.super_group_size} (llama.cpp falls back to "
          "another type for such tensors: jquant.gguf.spec_for(type, k)), or pad_groups=True.")
    return -(-size // self.super_group_size)

  def group_length(self, size: int) -> int:
    """Elements per scale along the contraction axis."""
    return self.group_size if self.granularity == "group" else size


def _full_range(self) -> bool:
  """Whether every group's largest magnitude maps to ``qmin`` (``symmetric_scale == "signed"``)."""
  return self.symmetric_scale == "signed"


def _init_with_alias(init):
  @functools.wraps(init)
  def __init__(self, *args, full_range=None, **kwargs):
    init(self, *args, **kwargs)
    if full_range is not None:
      self._apply_full_range(full_range, "symmetric_scale" in kwargs)
  return __init__


# `full_range` is a constructor keyword and a property, not a field: one stored truth (symmetric_scale) for
# equality, hashing, checkpoints and `dataclasses.replace`; subclasses (W8A8Spec) keep their own __init__.
QuantSpec.__init__ = _init_with_alias(QuantSpec.__init__)
QuantSpec.full_range = property(_full_range)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Pairs a regex on the ``/``-joined parameter path with a `QuantSpec`.

  The pattern is matched with ``re.search``; in a rule list the first rule that
  matches a leaf decides. A spec of ``None`` leaves the leaf in float.

  Example:
    >>> Rule(r"layers_\\d+/(attn|mlp)/\\w+/kernel", QuantSpec(bits=4, granularity="group", group_size=128))
  """

  pattern: str
  spec: Optional[QuantSpec]

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise TypeError(f"Rule: pattern={self.pattern!r} ({type(self.pattern).__name__}); allowed: a str regex "
                      "searched in the '/'-joined parameter path.")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule: pattern={self.pattern!r} is not a valid regex: {e}.") from None
    if self.spec is not None and not isinstance(self.spec, QuantSpec):
      raise TypeError(f"Rule: spec={self.spec!r} ({type(self.spec).__name__}); allowed: a jquant.QuantSpec, or "
                      "None to leave matching leaves in float.")

  def matches(self, path: str) -> bool:
    return re.search(self.pattern, path) is not None


def _int(v, name: str, allowed: str, lo=None, hi=None) -> int:
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
    raise ValueError(f"QuantSpec: {name}={v!r} ({type(v).__name__}); allowed: {allowed}.")
  v = int(v)
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    raise ValueError(f"QuantSpec: {name}={v!r} is out of range; allowed: {allowed}.")
  return v


def _float(v, name: str, allowed: str) -> float:
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
    raise ValueError(f"QuantSpec: {name}={v!r} ({type(v).__name__}); allowed: {allowed}.")
  v = float(v)
  if v != v:
    raise ValueError(f"QuantSpec: {name}=nan; allowed: {allowed}.")
  return v


def _bool(v, name: str) -> bool:
  if not isinstance(v, (bool, np.bool_)):
    raise ValueError(f"QuantSpec: {name}={v!r} ({type(v).__name__}); allowed: True or False.")
  return bool(v)


def _choice(v, name: str, allowed: tuple) -> None:
  if not isinstance(v, str) or v not in allowed:
    raise ValueError(f"QuantSpec: {name}={v!r}; allowed: one of {allowed}.")


def first_match(rules, path: str) -> tuple[bool, Any]:
  """Returns (matched, spec) for the first rule matching ``path``."""
  for rule in rules:
    if rule.matches(path):
      return True, rule.spec
  return False, None
