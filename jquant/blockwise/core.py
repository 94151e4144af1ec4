"""The learnable quantizer of block-wise reconstruction: scales, zero points, a rounding offset.

One weight ``w`` (any shape, quantized along its contraction axes by a
`jquant.QuantSpec`) is fake-quantized as

    w' = w + V * s0                          (V: rounding offset / weight update, in steps of the start scale s0)
    s  = s0 * exp(a)                         (a: log scale factor, per group; sign kept for signed scales)
    z  = z0 + dz                             (asymmetric specs: zero point, rounded in the forward pass)
    q  = lsq_fake_quant(w', s, z)            (= (clip(round(w'/s) + round(z), qmin, qmax) - round(z)) * s)

so that ``round(w'/s) = round(w/s + V s0/s)``: AutoRound's learned rounding
(Cheng et al., 2023, "Optimize Weight Rounding via Signed Gradient Descent",
``V`` in ``[-0.5, 0.5]``) when ``"round"`` is learned, EfficientQAT's
block-wise training of the weights themselves (Chen et al., 2024, Block-AP;
``V`` unbounded) when ``"weight"`` is, and OmniQuant / EfficientQAT's learned
step sizes and zero points (Shao et al., 2023) through ``a`` and ``dz``. The
fake quantizer is `jquant.qat.lsq_fake_quant` (straight-through rounding,
LSQ gradients for the scale); its forward value is bit for bit the
dequantized packed weight `pack` returns, so what the loss saw is what is
stored.

The scale is learned as a factor ``exp(a)`` of the start scale so that one
learning rate serves every layer (scales differ by orders of magnitude
between layers); ``V`` is measured in steps of ``s0`` for the same reason.

Example:
    >>> import jax, jax.numpy as jnp, jquant
    >>> from jquant.blockwise import core
    >>> w = jax.random.normal(jax.random.key(0), (256, 64))
    >>> spec = jquant.QuantSpec(bits=4, granularity="group", group_size=64)
    >>> init = core.init_quantizer(w, spec)
    >>> theta = core.init_params(init, ("scale", "zero", "round"))
    >>> wq = core.fake_quant(w, init, theta)
    >>> q = core.pack(w, init, theta)
    >>> bool(jnp.all(jquant.dequantize(q) == wq))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jquant.qarray import QArray, compute_scale_zero, expand_to_groups, merge_contraction
from jquant.qat import _pack, lsq_fake_quant
from jquant.spec import QuantSpec

LEARNABLE = ("scale", "zero", "round", "weight")
ROUND_RANGE = 0.5  # AutoRound's bound on the rounding offset V, in steps


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantInit:
  """The fixed start of one weight's quantizer (a pytree: ``spec`` is static, the arrays are leaves).

  Attributes:
    spec: The `QuantSpec`, its ``axis`` the weight's contraction axes.
    scale: float32 start scales ``s0``, laid out as `jquant.compute_scale_zero`
      returns them (contraction axes -> groups).
    zero_point: float32 start zero points like ``scale`` (asymmetric), or None.
    step: float32 ``s0`` broadcast to the weight's logical shape (the unit of V).
  """

  spec: QuantSpec
  scale: Any
  zero_point: Any
  step: Any

  def tree_flatten(self):
    return (self.scale, self.zero_point, self.step), self.spec

  @classmethod
  def tree_unflatten(cls, spec, children):
    return cls(spec, *children)


def check_spec(spec: QuantSpec, path: str = "weight"):
  """Raises ValueError for specs block-wise reconstruction cannot learn (two-level, float mins, stochastic)."""
  bad = []
  if spec.two_level:
    bad.append(f"scale_bits={spec.scale_bits} (two-level scales)")
  if spec.float_min:
    bad.append("offset='min' (float mins)")
  if spec.rounding != "nearest":
    bad.append(f"rounding={spec.rounding!r}")
  if bad:
    raise ValueError(f"blockwise: the spec of {path!r} has {', '.join(bad)}; allowed: one-level specs with integer "
                     "zero points and rounding='nearest'. Quantize this weight with RTN or GPTQ instead (a rule "
                     "with spec None keeps it out of the reconstruction).")


def _step(scale, spec: QuantSpec, shape) -> jax.Array:
  """Group scales -> the logical weight shape."""
  merged = merge_contraction(jnp.zeros(shape, jnp.float32), spec)
  m, espec = merged[0], merged[1]
  s = expand_to_groups(scale.astype(jnp.float32), espec, m.shape[espec.axis])
  return jnp.broadcast_to(s, m.shape).reshape(shape)


def init_quantizer(w, spec: QuantSpec, given: Optional[QArray] = None) -> QuantInit:
  """The start of one weight's quantizer: round-to-nearest, or a given quantization's scales.

  Args:
    w: Float weight, logical shape.
    spec: Its `QuantSpec`, ``axis`` set to the weight's contraction axes.
    given: Optional `QArray` of the same weight (a GPTQ or AWQ result); its
      scales and zero points are the start (`QArray.group_params`).

  Raises:
    ValueError: a spec `check_spec` refuses; a ``given`` QArray whose spec or
      shape differs from ``spec`` / ``w``.
  """
  check_spec(spec)
  if given is None:
    scale, zero = compute_scale_zero(w, spec)
  else:
    same = ("bits", "symmetric", "granularity", "group_size")
    diff = [f"{k}={getattr(given.spec, k)!r} vs {getattr(spec, k)!r}" for k in same
            if getattr(given.spec, k) != getattr(spec, k)]
    if diff or tuple(given.shape) != tuple(np.shape(w)):
      raise ValueError(f"blockwise: the given QArray does not match the rule's spec/shape "
                       f"({', '.join(diff) or f'shape {given.shape} vs {tuple(np.shape(w))}'}); pass the "
                       "quantized tree made with the same rules.")
    scale, zero = given.group_params()
  scale = jnp.asarray(scale, jnp.float32)
  zero = None if zero is None else jnp.asarray(zero, jnp.float32)
  return QuantInit(spec, scale, zero, _step(scale, spec, tuple(np.shape(w))))


def init_params(init: QuantInit, learn: tuple) -> dict:
  """The learnable parameters of one weight at their start (identity): ``{"scale", "zero", "offset"}``.

  ``scale``: log factor ``a`` like ``init.scale`` (zeros); ``zero``: ``dz``
  like ``init.zero_point`` (asymmetric specs only); ``offset``: ``V`` shaped
  like the weight. Only the learned ones are present.
  """
  theta = {}
  if "scale" in learn:
    theta["scale"] = jnp.zeros_like(init.scale)
  if "zero" in learn and init.zero_point is not None:
    theta["zero"] = jnp.zeros_like(init.zero_point)
  if "round" in learn or "weight" in learn:
    theta["offset"] = jnp.zeros_like(init.step)
  return theta


def _effective(w, init: QuantInit, theta: dict):
  """``(w', s, z)`` of the formula in the module docstring."""
  w = w.astype(jnp.float32)
  if "offset" in theta:
    w = w + theta["offset"] * init.step
  s = init.scale if "scale" not in theta else init.scale * jnp.exp(theta["scale"])
  z = init.zero_point
  if z is not None and "zero" in theta:
    z = z + theta["zero"]
  return w, s, z


def fake_quant(w, init: QuantInit, theta: dict) -> jax.Array:
  """The fake-quantized weight (float32, logical shape); differentiable in ``theta`` (STE, LSQ)."""
  wq, s, z = _effective(w, init, theta)
  return lsq_fake_quant(wq, s, z, init.spec)


def pack(w, init: QuantInit, theta: dict, dtype=None) -> QArray:
  """The packed `QArray` whose dequantized value is `fake_quant` bit for bit (codes in the spec's range)."""
  wq, s, z = _effective(w, init, theta)
  q = _pack(wq, s, z, init.spec)
  return q if dtype is None else QArray(q.qvalue, q.scale, q.zero_point, q.spec, q.size, q.axis, np.dtype(dtype),
                                        q.axis_shape)


def project(theta: dict, learn: tuple) -> dict:
  """``theta`` after an update: AutoRound's bound ``|V| <= 0.5`` when only the rounding is learned."""
  if "offset" in theta and "weight" not in learn:
    theta = dict(theta)
    theta["offset"] = jnp.clip(theta["offset"], -ROUND_RANGE, ROUND_RANGE)
  return theta


def output_error(outs, refs, skip_positions: int = 0) -> jax.Array:
  """Mean squared error of a block's float outputs against the float block's, summed over outputs.

  Args:
    outs, refs: Lists of arrays (the block's outputs; non-float ones, such
      as positions passed through, are ignored).
    skip_positions: Leave the first positions (axis 1 of ``(B, T, ...)``
      outputs) out of the mean (attention sinks).

  Returns:
    float32 scalar: ``sum_k mean((outs_k - refs_k)^2)``.
  """
  err = jnp.float32(0.0)
  for o, r in zip(outs, refs):
    if not jnp.issubdtype(jnp.result_type(r), jnp.floating):
      continue
    d = jnp.square(o.astype(jnp.float32) - r.astype(jnp.float32))
    if skip_positions and d.ndim >= 3:
      d = d[:, skip_positions:]
    err = err + jnp.mean(d)
  return err


__all__ = ["QuantInit", "LEARNABLE", "ROUND_RANGE", "check_spec", "init_quantizer", "init_params", "fake_quant",
           "pack", "project", "output_error"]
