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
import re
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "stochastic")
CLIPS = ("minmax", "mse")
SCALE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one array is quantized.

  Attributes:
    bits: Integer width, 2..8.
    symmetric: Symmetric codes in [-2^(b-1), 2^(b-1)-1] with scale
      ``amax / (2^(b-1)-1)``; otherwise unsigned codes in [0, 2^b-1] with an
      integer zero point per group.
    granularity: ``"tensor"`` (one scale), ``"channel"`` (one scale per slice
      along every non-contraction position) or ``"group"`` (one scale per
      ``group_size`` consecutive elements along the contraction axis).
    group_size: Group length along ``axis`` (granularity ``"group"`` only).
    axis: The contraction axis, or a tuple of adjacent contraction axes. A
      Flax ``Dense`` kernel is ``(in, out)``, so 0; a ``DenseGeneral`` output
      projection ``(heads, head_dim, d)`` contracts ``(0, 1)``. Several axes
      are flattened (row-major) into one contraction of their product's
      length, along which groups run and codes are packed.
    scale_dtype: ``"float32"`` or ``"bfloat16"``.
    rounding: ``"nearest"`` or ``"stochastic"`` (needs a PRNG key; for training).
    clip: ``"minmax"`` ranges, or ``"mse"``: per group, the shrink of the range
      (over a grid, as in GPTQ's reference quantizer) with the least error.
    clip_ratio: Fixed shrink of the range in (0, 1]; values outside are clipped.
    pad_groups: Allow a ``group_size`` that does not divide the contraction
      size; the last group is then shorter.
    mse_grid: Number of shrink candidates for ``clip="mse"``.
    mse_max_shrink: Largest shrink tried by ``clip="mse"`` (0.8 -> ranges down
      to 20% of min-max).
    mse_norm: The error norm p of ``clip="mse"`` (``sum |x - q|^p``).

  Example:
    >>> QuantSpec(bits=3, symmetric=False, granularity="group", group_size=64)
    QuantSpec(bits=3, symmetric=False, granularity='group', group_size=64, ...)
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

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not 2 <= self.bits <= 8:
      raise ValueError(f"QuantSpec: bits={self.bits!r} is not supported; allowed: integers 2..8.")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"QuantSpec: granularity={self.granularity!r}; allowed: {GRANULARITIES}.")
    if self.granularity == "group":
      if not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
        raise ValueError(
            f"QuantSpec: granularity='group' needs group_size a positive int, got {self.group_size!r}.")
    elif self.group_size is not None:
      raise ValueError(
          f"QuantSpec: group_size={self.group_size!r} is only meaningful with granularity='group' "
          f"(got granularity={self.granularity!r}).")
    dtype_name = jnp.dtype(self.scale_dtype).name if not isinstance(self.scale_dtype, str) else self.scale_dtype
    if dtype_name not in SCALE_DTYPES:
      raise ValueError(f"QuantSpec: scale_dtype={self.scale_dtype!r}; allowed: {SCALE_DTYPES}.")
    object.__setattr__(self, "scale_dtype", dtype_name)
    if self.rounding not in ROUNDINGS:
      raise ValueError(f"QuantSpec: rounding={self.rounding!r}; allowed: {ROUNDINGS}.")
    if self.clip not in CLIPS:
      raise ValueError(f"QuantSpec: clip={self.clip!r}; allowed: {CLIPS}.")
    if not 0.0 < float(self.clip_ratio) <= 1.0:
      raise ValueError(f"QuantSpec: clip_ratio={self.clip_ratio!r}; allowed: a float in (0, 1].")
    axes = self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)
    if (not axes or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in axes)
        or len(set(axes)) != len(axes)):
      raise ValueError(f"QuantSpec: axis={self.axis!r}; allowed: an int, or a tuple of distinct ints "
                       "(adjacent contraction axes).")
    axes = tuple(int(a) for a in axes)
    object.__setattr__(self, "axis", axes[0] if len(axes) == 1 and not isinstance(self.axis, (tuple, list))
                       else axes)

  @property
  def qmin(self) -> int:
    return -(2 ** (self.bits - 1)) if self.symmetric else 0

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

  @property
  def jnp_scale_dtype(self):
    return jnp.dtype(self.scale_dtype)

  def replace(self, **changes) -> "QuantSpec":
    """A copy with some fields changed (``dataclasses.replace``)."""
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

  def group_length(self, size: int) -> int:
    """Elements per scale along the contraction axis."""
    return self.group_size if self.granularity == "group" else size


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
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule: pattern={self.pattern!r} is not a valid regex: {e}.") from None
    if self.spec is not None and not isinstance(self.spec, QuantSpec):
      raise TypeError(f"Rule: spec must be a QuantSpec or None, got {type(self.spec).__name__}.")

  def matches(self, path: str) -> bool:
    return re.search(self.pattern, path) is not None


def first_match(rules, path: str) -> tuple[bool, Any]:
  """Returns (matched, spec) for the first rule matching ``path``."""
  for rule in rules:
    if rule.matches(path):
      return True, rule.spec
  return False, None
