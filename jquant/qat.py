"""Quantization-aware training of any model: fake-quantized weights, learned step sizes, packed export.

QAT fine-tunes a model while its forward pass sees the quantized weights (and,
optionally, quantized activations), so that the weights learn to live on the
grid. This module is a handful of pure functions around an ordinary optax loop,
for any model (a Linen module's params, an NNX state, any apply function) with
no edit to the model:

* `init` picks the leaves that `jquant.Rule` s select and returns a `QATState`
  (a NamedTuple) holding one `Quantizer` per leaf: its scale (and zero point
  for asymmetric specs), laid out as `jquant.compute_scale_zero` returns them,
  initialised from round-to-nearest ranges or from a finished post-training
  result (a tree of `QArray` s, e.g. GPTQ's), whose scales and zero points are
  taken. ``axes=jquant.capture.contraction_axes(apply, params, x)`` quantizes
  each kernel along the axes its own matmul contracts (``DenseGeneral``,
  ``Einsum``: several axes are flattened into one contraction, along which
  groups run), so one rule serves a whole model.
* `fake_quantize` (used inside the loss) replaces every selected weight by its
  fake-quantized value. Rounding passes the gradient straight through (STE);
  weights clipped away get none. With ``lsq=True`` the scale is trainable as in
  LSQ (Esser et al., 2020, "Learned Step Size Quantization"): for ``v = w/s``,
  ``d out/d s = round(v) - v`` inside the range and ``qmin``/``qmax`` where
  clipped, scaled by ``g = 1/sqrt(N * Qp)`` with ``N`` the elements that share
  the scale and ``Qp = spec.qmax``.
* ``act_bits=8`` also fake-quantizes the inputs of the selected weights' matmuls
  (symmetric, per token, dynamic, with `jquant.ops.quantize_activations_per_token`,
  the quantizer W8A8 serving uses; STE). The weight becomes an `ActFakeQuant`
  leaf with a ``__qdot__`` product; `make_train_step` runs the loss through
  `jquant.quantized`, which routes every matmul against such a leaf (any
  layer type, N-D kernels viewed as (K, N) matrices) to it.
* `optimizer` builds an ``optax.multi_transform`` with separate optimizers for
  quantized weights, other parameters and scales; `make_train_step` returns a
  jit-compiled step over a `TrainState`; `train` runs the loop with a tqdm bar,
  a loss log and `jquant.save` checkpoints.
* `convert` returns the tree with packed `QArray` s built from the learned
  scales (`jquant.QArray.from_codes`); the dequantized weights equal the
  fake-quantized ones bit for bit. W8A8 weights become
  `jquant.ops.W8A8Weight` (int8 x int8 matmuls); their training forward
  already runs that integer product, so training and export agree exactly.
  Run the converted tree with ``jax.jit(jquant.quantized(apply))``.
* Parameters sharded over a mesh (`jquant.sharding.shard_params`: FSDP /
  tensor parallel) train where they live: `init` lays each quantizer's scale
  (and zero point) out like the packed weight's scales
  (`jquant.sharding.qarray_shardings`), the compiled step runs SPMD and keeps
  every leaf's sharding, and `convert` lays the `QArray` s out as
  `jquant.quantize_params` lays out a sharded leaf.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, jquant, jquant.qat as qat
    >>> model = nn.Dense(8)
    >>> x = jax.random.normal(jax.random.key(1), (16, 64))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> y = x @ jax.random.normal(jax.random.key(2), (64, 8))
    >>> state = qat.init(params, [jquant.Rule(r"kernel$", jquant.QuantSpec(bits=8))], act_bits=8)   # W8A8
    >>> loss_fn = lambda p, b: jnp.mean((model.apply({"params": p}, b[0]) - b[1]) ** 2)   # float params
    >>> opt = qat.optimizer(weights=optax.adam(1e-3), scales=optax.adam(1e-4))
    >>> step = qat.make_train_step(loss_fn, opt)
    >>> ts, loss = step(qat.init_train_state(params, state, opt), (x, y))
    >>> packed = qat.convert(ts.params, ts.qat)          # int8 W8A8Weight with the learned scales
    >>> y_int8 = jax.jit(jquant.quantized(model.apply))({"params": packed}, x)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jquant.checkpoint import atomic_directory
from jquant.checkpoint import load as _load
from jquant.checkpoint import save as _save
from jquant import ops
from jquant.intercept import quantized
from jquant.ops import W8A8Weight, int8_matmul, qdot, weight_property
from jquant.qarray import QArray, compute_scale_zero, expand_to_groups, merge_contraction
from jquant.spec import QuantSpec, Rule, first_match
from jquant.sharding import qarray_shardings
from jquant.tree import is_qarray, shard_like
from jquant.utils import check_finite, path_str

_MIN_SCALE = 1e-8  # learned scales are kept above this after every update
_FIX_WEIGHTS = "Fix these weights, or keep them in float (a rule with spec None before the others)."

__all__ = [
    "Quantizer", "QATState", "TrainState", "ActFakeQuant", "ActQuantWeight", "init", "fake_quantize",
    "lsq_fake_quant", "fake_quant_activations", "convert", "param_labels", "optimizer", "init_train_state",
    "make_train_step", "train", "save_state", "load_state", "save_train_state", "load_train_state",
]


# ---------------------------------------------------------------------------
# State.


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class Quantizer:
  """The quantizer of one weight: its scale, zero point, and static settings.

  Attributes:
    scale: float32 scales, shaped like the weight with the contraction axis
      replaced by the group count (as `jquant.compute_scale_zero` returns).
      Trainable when ``lsq``.
    zero_point: float32 zero points like ``scale`` (asymmetric specs; rounded
      in the forward pass, trained through a straight-through estimator when
      ``lsq``), or None for symmetric specs.
    spec: The weight's `QuantSpec` (static).
    lsq: Whether ``scale`` (and ``zero_point``) are learned (static).
    act_bits: None, or the bit width of the per-token dynamic fake
      quantization of this Dense weight's input (static).
  """

  scale: Any
  zero_point: Any
  spec: QuantSpec
  lsq: bool = True
  act_bits: Optional[int] = None

  def tree_flatten(self):
    return (self.scale, self.zero_point), (self.spec, self.lsq, self.act_bits)

  @classmethod
  def tree_unflatten(cls, aux, children):
    # Children may be labels or updates, not arrays (optax maps over this node).
    return cls(*children, *aux)


class QATState(NamedTuple):
  """Everything QAT adds to a model: one `Quantizer` per selected weight.

  Attributes:
    quantizers: ``{path: Quantizer}``, keyed by the ``/``-joined parameter
      path (`jquant.utils.path_str`).
  """

  quantizers: dict


class TrainState(NamedTuple):
  """What `make_train_step` carries from step to step.

  Attributes:
    params: The float (latent) weights.
    qat: The `QATState`.
    opt_state: The optax state of the optimizer over ``(params, qat)``.
    step: int32 step counter.
  """

  params: Any
  qat: QATState
  opt_state: Any
  step: jax.Array


def _group_count(spec: QuantSpec, shape, axis: int) -> int:
  """Elements that share one scale (N in LSQ's gradient scale)."""
  if spec.granularity == "tensor":
    return int(np.prod(shape))
  if spec.granularity == "channel":
    return int(shape[axis])
  return int(min(spec.group_size, shape[axis]))


def _check_spec(spec: QuantSpec, path: str):
  if spec.rounding != "nearest":
    raise ValueError(f"qat.init: leaf {path!r}: spec.rounding={spec.rounding!r}; QAT trains and exports "
                     "with round-to-nearest, allowed: 'nearest'.")


def _check_act(path: str, leaf, spec: QuantSpec, act_bits, axes_known: bool):
  if act_bits is None:
    return
  if isinstance(act_bits, bool) or not isinstance(act_bits, (int, np.integer)) or not 2 <= act_bits <= 8:
    raise ValueError(f"qat.init: act_bits={act_bits!r}; allowed: None or an int in 2..8.")
  if leaf.ndim < 2:
    raise ValueError(f"qat.init: act_bits quantizes the inputs of matmul weights; leaf {path!r} has shape "
                     f"{tuple(leaf.shape)}. Restrict the rules to kernels (rank >= 2).")
  if leaf.ndim > 2 and not axes_known:
    raise ValueError(f"qat.init: act_bits with the N-D weight {path!r} (shape {tuple(leaf.shape)}) needs its "
                     "contraction axes: pass axes=jquant.capture.contraction_axes(apply, params, *example_inputs) "
                     "(read from the model's own matmuls).")


# Jitted per (shape, spec): eager group statistics over a whole model are slow.
_rtn_scale_zero = jax.jit(compute_scale_zero, static_argnums=1)


def init(params, rules: Sequence[Rule], *, lsq: bool = True, act_bits: Optional[int] = None,
         init_from=None, axes: Optional[Mapping[str, Any]] = None) -> QATState:
  """Builds the QAT state for the leaves of ``params`` that ``rules`` select.

  Args:
    params: A pytree of float arrays (Linen params, ``nnx.State``, dicts).
    rules: `jquant.Rule` list; the first rule whose pattern ``re.search``-es a
      leaf's path decides (spec None: keep float, not fake-quantized).
    lsq: Learn the scales (and asymmetric zero points) with LSQ. With False
      they stay at their initial values and only the weights train.
    act_bits: Also fake-quantize the inputs of the selected Dense kernels to
      this many bits (symmetric, per token, dynamic). 8 gives W8A8 QAT.
    init_from: Optional tree holding `QArray` s at (some of) the selected
      paths, e.g. a GPTQ result; their scales and zero points are the initial
      ones (start the latent weights from ``jquant.dequantize_params`` of the
      same tree to reproduce it exactly at step 0). Others get RTN ranges.
    axes: Optional ``{path: contraction axes}`` read from the model's own
      matmuls (`jquant.capture.contraction_axes`); a leaf found there is
      quantized along those axes whatever its spec's ``axis``, so one rule
      serves ``Dense``, ``DenseGeneral`` and ``Einsum`` kernels (groups run
      along the flattened contraction). Needed for ``act_bits`` on N-D
      kernels. Paths may carry a leading ``params/``.

  Returns:
    A `QATState`.

  Raises:
    ValueError: if no leaf is selected, or a spec cannot be trained; a
      selected weight, or an ``init_from`` QArray's scale / zero point,
      holding NaN or inf (the message names the leaf path).

  Example:
    >>> state = qat.init(params, [jquant.Rule(r"kernel$", jquant.QuantSpec(bits=4, granularity="group",
    ...                                                                   group_size=128))])
  """
  rules = list(rules)
  for r in rules:
    if not isinstance(r, Rule):
      raise TypeError(f"qat.init: rules must be jquant.Rule objects, got {type(r).__name__}.")
  given = {}
  if init_from is not None:
    for kp, leaf in jax.tree_util.tree_flatten_with_path(init_from, is_leaf=is_qarray)[0]:
      if is_qarray(leaf):
        given[path_str(kp)] = leaf
  quantizers, seen = {}, []
  axes_by_path = {str(k).removeprefix("params/"): tuple(v) for k, v in (axes or {}).items()}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
    if is_qarray(leaf) or not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)):
      continue
    path = path_str(kp)
    seen.append(path)
    matched, spec = first_match(rules, path)
    if not matched or spec is None:
      continue
    _check_spec(spec, path)
    found = axes_by_path.get(path.removeprefix("params/"))
    if found is not None:
      spec = spec.replace(axis=tuple(found) if len(found) > 1 else found[0])
    _check_act(path, leaf, spec, act_bits, found is not None or leaf.ndim == 2)
    check_finite({path: leaf}, "qat.init", "the selected weights", _FIX_WEIGHTS)
    if path in given:
      scale, zero = _from_qarray(given[path], spec, leaf, path)
    else:
      try:
        scale, zero = _rtn_scale_zero(leaf, spec)
      except (ValueError, TypeError) as e:
        raise type(e)(f"qat.init: leaf {path!r} (shape {tuple(leaf.shape)}): {e}") from None
    scale, zero = _laid_out_like_packed(leaf, spec, jnp.asarray(scale, jnp.float32),
                                        None if zero is None else jnp.asarray(zero, jnp.float32))
    quantizers[path] = Quantizer(scale, zero, spec, bool(lsq), None if act_bits is None else int(act_bits))
  if not quantizers:
    raise ValueError(f"qat.init: rules {[r.pattern for r in rules]} select no float leaf; paths seen: "
                     f"{seen[:8]}{' ...' if len(seen) > 8 else ''}. Patterns are re.search-ed on '/'-joined paths.")
  unused = sorted(set(given) - set(quantizers))
  if unused:
    raise ValueError(f"qat.init: init_from holds QArrays at {unused[:4]} that the rules do not select; "
                     "allowed: init_from QArrays only at selected paths.")
  return QATState(quantizers)


def _mesh_sharding(leaf) -> Optional[NamedSharding]:
  """The multi-device `NamedSharding` of a concrete ``leaf`` (None for tracers and single-device arrays)."""
  s = None if isinstance(leaf, jax.core.Tracer) else getattr(leaf, "sharding", None)
  return s if isinstance(s, NamedSharding) and len(s.device_set) > 1 else None


def _laid_out_like_packed(leaf, spec: QuantSpec, scale, zero):
  """A sharded weight's scale and zero point on the layout of the packed `QArray` 's (`convert`'s), so that
  each device trains the quantizers of its own slice (`jquant.sharding.qarray_shardings`)."""
  s = _mesh_sharding(leaf)
  if s is None:
    return scale, zero
  lay = qarray_shardings(jax.eval_shape(functools.partial(_pack, spec=spec), leaf, scale, zero), s)
  return jax.device_put(scale, lay.scale), (None if zero is None else jax.device_put(zero, lay.zero_point))


def _from_qarray(q: QArray, spec: QuantSpec, leaf, path: str):
  same = ("bits", "symmetric", "granularity", "group_size")
  diff = [f"{k}={getattr(q.spec, k)!r} vs {getattr(spec, k)!r}" for k in same
          if getattr(q.spec, k) != getattr(spec, k)]
  if diff or tuple(q.shape) != tuple(leaf.shape):
    raise ValueError(f"qat.init: init_from QArray at {path!r} does not match the rule's spec/shape "
                     f"({', '.join(diff) or f'shape {q.shape} vs {tuple(leaf.shape)}'}).")
  zero = None if q.zero_point is None else q.zero_point.astype(jnp.float32)
  check_finite({f"{path}/scale": q.scale, f"{path}/zero_point": zero}, "qat.init", "init_from's QArrays",
               "Start from a finite post-training result.")
  return q.scale.astype(jnp.float32), zero


# ---------------------------------------------------------------------------
# Fake quantization with LSQ gradients.


def _codes(w, s, z, qmin, qmax):
  """Integer-valued float codes: exactly the arithmetic of jquant.quantize_values."""
  c = jnp.round(w / s)
  if z is not None:
    c = c + z
  return jnp.clip(c, qmin, qmax)


def _dequant(c, s, z):
  """Exactly the arithmetic of jquant.dequantize."""
  return (c - z) * s if z is not None else c * s


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lsq_core(w, s, z, qmin, qmax, g):
  """Elementwise fake quantization; ``s`` and ``z`` already expanded to w's shape."""
  return _dequant(_codes(w, s, z, qmin, qmax), s, z)


def _lsq_fwd(w, s, z, qmin, qmax, g):
  return _lsq_core(w, s, z, qmin, qmax, g), (w, s, z)


def _lsq_bwd(qmin, qmax, g, res, t):
  w, s, z = res
  v = w / s
  u = v if z is None else v + z                 # the unrounded code
  inside = (u > qmin) & (u < qmax)
  c = _codes(w, s, z, qmin, qmax)
  zz = 0.0 if z is None else z
  # out = (c - z) s; inside, round() passes the gradient through: d/ds = round(v) - v.
  ds = jnp.where(inside, jnp.round(v) - v, c - zz)
  dw = jnp.where(inside, t, 0.0).astype(w.dtype)
  ds = (t * ds * g).astype(s.dtype)
  dz = None if z is None else (t * jnp.where(inside, 0.0, -s) * g).astype(z.dtype)
  return dw, ds, dz


_lsq_core.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_fake_quant(w, scale, zero_point, spec: QuantSpec, *, learn_scale: bool = True):
  """Fake-quantizes ``w`` with given group scales, LSQ gradients for the scales.

  The forward value is bit for bit ``jquant.dequantize(QArray.from_codes(...))``
  of the codes ``clip(round(w / s) + z, qmin, qmax)``. Gradients: ``w`` gets
  the straight-through estimate (1 where ``qmin < w/s + z < qmax``, else 0);
  ``scale`` gets ``round(v) - v`` inside and ``c - z`` (the clipped code less
  the zero point) outside, times ``g = 1/sqrt(N * spec.qmax)`` and summed
  over each group; ``zero_point`` gets ``-s`` where clipped (0 inside),
  times ``g``.

  Args:
    w: Float weight.
    scale: Group scales (as `jquant.compute_scale_zero` shapes them: the
      contraction axes, flattened into one for a multi-axis spec such as
      ``QuantSpec(axis=(0, 1))``, replaced by the group count).
    zero_point: Zero points like ``scale`` (asymmetric specs) or None.
    spec: The `QuantSpec`.
    learn_scale: False stops the gradient into ``scale`` and ``zero_point``.

  Example:
    >>> s, _ = jquant.compute_scale_zero(w, spec)
    >>> gs = jax.grad(lambda s: qat.lsq_fake_quant(w, s, None, spec).sum())(s)
  """
  logical_shape = w.shape
  w, espec, _ = merge_contraction(w, spec)   # several contraction axes -> one (scales are laid out so)
  axis = espec.axis
  _check_scale_layout(scale, w, espec, "lsq_fake_quant")
  n = _group_count(espec, w.shape, axis)
  g = 1.0 / math.sqrt(n * spec.qmax)
  if not learn_scale:
    scale = jax.lax.stop_gradient(scale)
    zero_point = None if zero_point is None else jax.lax.stop_gradient(zero_point)
  # Round-trip through the stored dtype: training must see the scale that conversion will store.
  s = scale.astype(spec.jnp_scale_dtype).astype(jnp.float32)
  # Full shape: channel / tensor scales come back broadcastable only; the core is elementwise.
  s = jnp.broadcast_to(expand_to_groups(s, espec, w.shape[axis]), w.shape)
  z = None
  if zero_point is not None:
    # The stored zero point is an integer (STE through the rounding).
    zr = jnp.clip(jnp.round(zero_point), 0, spec.qmax)
    zr = zero_point + jax.lax.stop_gradient(zr - zero_point)
    z = jnp.broadcast_to(expand_to_groups(zr.astype(jnp.float32), espec, w.shape[axis]), w.shape)
  out = _lsq_core(w.astype(jnp.float32), s, z, float(spec.qmin), float(spec.qmax), g)
  return out.astype(w.dtype).reshape(logical_shape)


def _check_scale_layout(scale, w_merged, spec: QuantSpec, fn: str):
  """Scales must be laid out as `jquant.compute_scale_zero` returns them (contraction axes -> groups)."""
  want = list(w_merged.shape)
  want[spec.axis] = spec.num_groups(w_merged.shape[spec.axis])
  if spec.granularity == "tensor":
    want = [1] * len(want)
  if tuple(jnp.shape(scale)) != tuple(want):
    raise ValueError(f"qat.{fn}: scale has shape {tuple(jnp.shape(scale))}; allowed: {tuple(want)}, the layout "
                     f"jquant.compute_scale_zero returns for this weight and spec (axis={spec.axis}, "
                     f"granularity={spec.granularity!r}).")


def fake_quant_activations(x, bits: int = 8):
  """Symmetric per-token dynamic fake quantization of ``x`` (..., K), straight-through gradient.

  This is `jquant.ops.fake_quant_activations_per_token`: the codes and scales
  of `jquant.ops.quantize_activations_per_token`, the quantizer W8A8 serving
  and the SmoothQuant search use (scale ``amax / (2^(b-1) - 1)`` per row,
  codes clipped to ``±(2^(b-1) - 1)``).

  Example:
    >>> g = jax.grad(lambda x: qat.fake_quant_activations(x).sum())(x)    # all ones (STE)
  """
  return ops.fake_quant_activations_per_token(x, bits)[0]


def _weight_codes(w_fq, ws):
  """The int8 codes of a weight that is already on its grid (codes times per-column scale): exact."""
  return jnp.clip(jnp.round(w_fq.astype(jnp.float32) / ws), -128, 127).astype(jnp.int8)


@jax.custom_vjp
def _w8a8_train_dot(x, w_fq, ws):
  """``x @ w_fq`` computed exactly as `jquant.ops.W8A8Weight` computes it on XLA.

  ``x`` is quantized per token by `jquant.ops.quantize_activations_per_token`,
  ``w_fq`` (K, N) is already fake-quantized with per-column scales ``ws`` (N,)
  so its int8 codes come back exactly; int8 x int8 -> int32, then
  `jquant.ops.w8a8_epilogue`. The backward pass is that of the float product
  of the fake-quantized operands (straight through both quantizers).
  """
  xq, xs = ops.quantize_activations_per_token(x)
  return ops.w8a8_epilogue(int8_matmul(xq, _weight_codes(w_fq, ws)), xs, ws, x.dtype)


def _w8a8_train_dot_fwd(x, w_fq, ws):
  return _w8a8_train_dot(x, w_fq, ws), (x, w_fq, ws)


def _w8a8_train_dot_bwd(res, t):
  x, w_fq, ws = res
  x_fq = fake_quant_activations(x, 8)
  k = x.shape[-1]
  dx = jnp.dot(t, w_fq.T.astype(t.dtype)).astype(x.dtype)
  dw = jnp.dot(x_fq.reshape(-1, k).T, t.reshape(-1, t.shape[-1]).astype(x_fq.dtype)).astype(w_fq.dtype)
  return dx, dw, jnp.zeros_like(ws)


_w8a8_train_dot.defvjp(_w8a8_train_dot_fwd, _w8a8_train_dot_bwd)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class ActFakeQuant:
  """A (fake-quantized) Dense weight whose matmul also fake-quantizes its input.

  `jquant.ops.qdot` calls ``__qdot__``; models need no change. With
  ``weight_scale`` (8-bit activations over a symmetric int8 per-channel
  weight) the product runs on the integer codes exactly as the converted
  `jquant.ops.W8A8Weight` runs it, so training and export agree bit for bit;
  gradients are those of the float product (straight through both
  quantizers).

  Inside `jquant.quantized` (which `make_train_step` wraps the loss in) an
  N-D weight (``DenseGeneral``, ``Einsum``) is viewed as its (K, N) matrix
  first, so any model's matmuls take it.

  Attributes:
    weight: The (K, N) weight (or N-D, through `jquant.quantized`), already
      fake-quantized.
    bits: Activation bits (symmetric, per token, dynamic).
    weight_scale: None, or the per-output-channel scales of an int8
      ``weight``, flattened over its free axes ((N,) for a (K, N) weight).
  """

  weight: Any
  bits: int = 8
  weight_scale: Any = None

  def tree_flatten(self):
    return (self.weight, self.weight_scale), (self.bits,)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], aux[0], children[1])

  shape = weight_property("shape")
  dtype = weight_property("dtype")

  def __qdot__(self, x):
    if self.weight.ndim != 2:
      raise ValueError(f"ActFakeQuant: weight has shape {tuple(self.weight.shape)}; qdot takes (K, N). Run the "
                       "model through jquant.quantized(apply) (make_train_step does), which views N-D weights "
                       "as (K, N) matrices.")
    if self.weight_scale is not None:
      ws = jax.lax.stop_gradient(jnp.asarray(self.weight_scale, jnp.float32)).reshape(-1)
      return _w8a8_train_dot(x, self.weight, ws)
    return jnp.dot(fake_quant_activations(x, self.bits), self.weight.astype(x.dtype))


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class ActQuantWeight:
  """A packed weight (`QArray`) whose matmul quantizes its input per token first.

  `convert` uses it for activation-quantized weights that `W8A8Weight` cannot
  run (fewer than 8 activation bits, or grouped/low-bit weights).
  """

  weight: QArray
  bits: int = 8

  def tree_flatten(self):
    return (self.weight,), (self.bits,)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def __qdot__(self, x):
    return qdot(fake_quant_activations(x, self.bits), self.weight)


def _quantizer_arrays(state: QATState) -> dict:
  """``{"<path>/scale": ..., "<path>/zero_point": ...}``: the quantizers' arrays under readable paths."""
  out = {}
  for p, qz in state.quantizers.items():
    out[f"{p}/scale"] = qz.scale
    if qz.zero_point is not None:
      out[f"{p}/zero_point"] = qz.zero_point
  return out


def _check_trained(params, state: QATState, fn: str, step: Optional[int] = None):
  """Raises naming every selected latent weight and learned scale / zero point holding NaN or inf."""
  selected = {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]
              if path_str(kp) in state.quantizers}
  at = "" if step is None else f" at step {step}"
  advice = ("Training diverged" + at + ": restore an earlier checkpoint (qat.load_train_state) or lower the "
            "learning rates.")
  check_finite(selected, fn, "the latent weights" + at, advice)
  check_finite(_quantizer_arrays(state), fn, "the learned quantizer parameters" + at, advice)


def _map_selected(fn, params, state: QATState, name: str):
  """Applies ``fn(leaf, quantizer)`` to the selected leaves of ``params``."""
  if not isinstance(state, QATState):
    raise TypeError(f"qat.{name}: state must be a qat.QATState, got {type(state).__name__}.")
  found = set()

  def visit(kp, leaf):
    path = path_str(kp)
    qz = state.quantizers.get(path)
    if qz is None:
      return leaf
    found.add(path)
    return fn(leaf, qz)

  out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_qarray)
  missing = sorted(set(state.quantizers) - found)
  if missing:
    raise ValueError(f"qat.{name}: the state quantizes {missing[:4]} (and {max(len(missing) - 4, 0)} more) "
                     "which params do not hold; pass the params the state was built from.")
  return out


def _w8a8_ok(qz: Quantizer) -> bool:
  """Whether the weight and its activations fit `jquant.ops.W8A8Weight` (int8 x int8).

  Any layout: `jquant.quantized` views a weight as its (K, N) matrix over the
  axes it is quantized along (a (K, N) kernel contracting axis 0 also runs
  through `jquant.ops.qdot` directly).
  """
  spec = qz.spec
  return qz.act_bits == 8 and spec.bits == 8 and spec.symmetric and spec.granularity != "group"


def fake_quantize(params, state: QATState):
  """The parameters as the quantized model sees them (use inside the loss).

  Selected leaves become their fake-quantized values (`lsq_fake_quant`); with
  ``act_bits`` they become `ActFakeQuant` wrappers for `jquant.ops.qdot`.

  Example:
    >>> logits = model.apply(qat.fake_quantize(params, state), tokens)
  """

  def fq(leaf, qz: Quantizer):
    w = lsq_fake_quant(leaf, qz.scale, qz.zero_point, qz.spec, learn_scale=qz.lsq)
    if qz.act_bits is None:
      return w
    ws = None
    if _w8a8_ok(qz):
      ws = qz.scale.astype(qz.spec.jnp_scale_dtype).astype(jnp.float32).reshape(-1)
    return ActFakeQuant(w, qz.act_bits, ws)

  return _map_selected(fq, params, state, "fake_quantize")


@functools.partial(jax.jit, static_argnames="spec")
def _pack(leaf, scale, zero_point, spec: QuantSpec) -> QArray:
  """The codes of the training forward (`lsq_fake_quant`), packed with the learned scales."""
  w, espec, _ = merge_contraction(leaf, spec)
  axis = espec.axis
  scale = scale.astype(spec.jnp_scale_dtype)
  s = expand_to_groups(scale.astype(jnp.float32), espec, w.shape[axis])
  zero = z = None
  if zero_point is not None:
    zero = jnp.clip(jnp.round(zero_point), 0, spec.qmax)
    z = expand_to_groups(zero.astype(jnp.float32), espec, w.shape[axis])
  codes = _codes(w.astype(jnp.float32), s, z, float(spec.qmin), float(spec.qmax))
  return QArray.from_codes(codes.astype(jnp.int32).reshape(leaf.shape), scale, zero, spec, leaf.dtype)



def convert(params, state: QATState):
  """The trained model with packed integer weights (`QArray` s from the learned scales).

  Dequantizing a converted weight gives the fake-quantized training weight bit
  for bit. Activation-quantized weights become `jquant.ops.W8A8Weight`
  (8-bit activations over a symmetric int8 per-channel weight: int8 x int8
  matmul) or `ActQuantWeight` otherwise. A latent weight sharded over a
  mesh gives a `QArray` laid out by `jquant.sharding.qarray_shardings` of its
  sharding (each device holds the codes and scales of its own slice).

  Raises:
    ValueError: a selected latent weight, or a learned scale / zero point,
      holding NaN or inf (the message names the leaf path); params that do
      not hold the state's leaves.

  Example:
    >>> packed = qat.convert(params, state)
    >>> logits = model.apply(packed, tokens)     # same logits as training's forward, to float rounding
  """

  if isinstance(state, QATState):
    _check_trained(params, state, "qat.convert")

  def conv(leaf, qz: Quantizer):
    spec = qz.spec
    q = _pack(leaf, qz.scale, qz.zero_point, spec)
    s = _mesh_sharding(leaf)
    q = q if s is None else shard_like(q, s)  # laid out like jquant.quantize_params lays out a sharded leaf
    if qz.act_bits is None:
      return q
    return W8A8Weight(q) if _w8a8_ok(qz) else ActQuantWeight(q, qz.act_bits)

  return _map_selected(conv, params, state, "convert")


# ---------------------------------------------------------------------------
# Optimizer and training step.

def param_labels(trainable):
  """Labels for ``(params, qat_state)``: weights / other / scales / frozen.

  ``"weights"``: the selected (fake-quantized) weights; ``"other"``: all other
  parameters; ``"scales"``: learned scales and zero points; ``"frozen"``:
  scales and zero points of quantizers with ``lsq=False``.
  """
  params, state = trainable
  selected = set(state.quantizers)

  def plabel(kp, _):
    return "weights" if path_str(kp) in selected else "other"

  plabels = jax.tree_util.tree_map_with_path(plabel, params)
  qlabels = QATState({p: jax.tree_util.tree_map(lambda _, l=qz.lsq: "scales" if l else "frozen", qz)
                      for p, qz in state.quantizers.items()})
  return plabels, qlabels


def optimizer(weights: optax.GradientTransformation, scales: Optional[optax.GradientTransformation] = None,
              other: Optional[optax.GradientTransformation] = None) -> optax.GradientTransformation:
  """An ``optax.multi_transform`` over ``(params, qat_state)``.

  Args:
    weights: Optimizer of the fake-quantized weights.
    scales: Optimizer of the learned scales (default: ``weights``'s). LSQ
      scales usually want a learning rate 10-100x that of the weights.
    other: Optimizer of the parameters the rules do not select (norms,
      embeddings...; default: ``weights``'s). ``optax.set_to_zero()`` freezes
      them.

  Example:
    >>> opt = qat.optimizer(weights=optax.adamw(1e-5), scales=optax.adam(1e-4), other=optax.set_to_zero())
  """
  return optax.multi_transform(
      {"weights": weights, "scales": scales if scales is not None else weights,
       "other": other if other is not None else weights, "frozen": optax.set_to_zero()},
      param_labels)


def _project(state: QATState) -> QATState:
  """Keeps learned scales away from zero (with their sign: symmetric_scale="signed" scales may be negative)
  and zero points on the code range."""
  out = {}
  for p, qz in state.quantizers.items():
    zero = None if qz.zero_point is None else jnp.clip(qz.zero_point, 0.0, float(qz.spec.qmax))
    scale = jnp.where(qz.scale < 0, jnp.minimum(qz.scale, -_MIN_SCALE), jnp.maximum(qz.scale, _MIN_SCALE))
    out[p] = dataclasses.replace(qz, scale=scale, zero_point=zero)
  return QATState(out)


def init_train_state(params, state: QATState, opt: optax.GradientTransformation) -> TrainState:
  """The `TrainState` at step 0 (``opt.init`` over ``(params, state)``).

  ``params`` and ``state`` are copied: the step donates the train state's
  buffers, and the caller's arrays stay usable.
  """
  params, state = jax.tree_util.tree_map(jnp.copy, (params, state))
  return TrainState(params, state, opt.init((params, state)), jnp.zeros((), jnp.int32))


def make_train_step(loss_fn: Callable, opt: optax.GradientTransformation, *, has_aux: bool = False,
                    donate: bool = True) -> Callable:
  """A jit-compiled QAT step ``step(train_state, batch) -> (train_state, loss)``.

  The loss sees the fake-quantized parameters: ``loss_fn(qat.fake_quantize(
  params, state), batch)``. Gradients flow to the latent weights (STE) and
  the learned scales (LSQ); the optimizer updates both, then scales are kept
  positive. The step is traced once per batch shape and dtype.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with
      ``has_aux``), written for ordinary float parameters.
    opt: Any optax transformation over ``(params, qat_state)``; `optimizer`
      gives separate learning rates to weights and scales.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the step then returns
      ``(train_state, (loss, aux))``.
    donate: Donate the incoming train state's buffers (halves peak memory;
      the old state must not be used afterwards).

  The compiled step cannot raise on non-finite values (nothing is read back
  to the host); a NaN loss or weight is only seen where the loss is fetched:
  `train` checks every fetched loss and raises naming the step and the
  non-finite leaves. In a loop of your own, check ``jnp.isfinite(loss)``.

  Example:
    >>> step = qat.make_train_step(lambda p, b: model_loss(p, b), qat.optimizer(optax.adam(1e-4)))
    >>> ts, loss = step(ts, batch)
  """

  run_loss = quantized(loss_fn)  # ActFakeQuant leaves (act_bits) reach every matmul of any model

  def total(trainable, batch):
    params, state = trainable
    return run_loss(fake_quantize(params, state), batch)

  grad_fn = jax.value_and_grad(total, has_aux=has_aux)

  def step(ts: TrainState, batch):
    trainable = (ts.params, ts.qat)
    out, grads = grad_fn(trainable, batch)
    updates, opt_state = opt.update(grads, ts.opt_state, trainable)
    params, state = optax.apply_updates(trainable, updates)
    return TrainState(params, _project(state), opt_state, ts.step + 1), out

  return jax.jit(step, donate_argnums=(0,) if donate else ())


class TrainLog(NamedTuple):
  """Loss per step (host floats) and the wall seconds of the loop."""
  steps: list
  losses: list
  seconds: float


def train(step: Callable, ts: TrainState, batches: Iterable, *, num_steps: int, log_every: int = 10,
          log_path: Optional[str] = None, checkpoint_dir: Optional[str] = None,
          checkpoint_every: Optional[int] = None, desc: str = "QAT") -> tuple[TrainState, TrainLog]:
  """Runs ``num_steps`` steps with a tqdm bar, a loss log and optional checkpoints.

  Steps are numbered from ``ts.step``, so a train state restored with
  `load_train_state` continues its numbering (and its optimizer schedule).

  Args:
    step: From `make_train_step` (without ``has_aux``).
    ts: The starting `TrainState`.
    batches: Iterable of batches (at least ``num_steps``).
    num_steps: Steps to run.
    log_every: Loss fetch / bar update period (a fetch syncs the device).
    log_path: Optional file; one ``step<TAB>loss`` line per step, appended.
    checkpoint_dir: Optional directory; the whole train state (latent weights,
      QAT state, optimizer state, step) is written there with `jquant.save`
      every ``checkpoint_every`` steps and at the end (``<dir>/step_<n>``;
      restore with `load_train_state`).
    checkpoint_every: Checkpoint period in steps (default: only at the end).
    desc: Bar label.

  Returns:
    ``(train_state, TrainLog)``.

  Raises:
    ValueError: the loss became NaN or inf: raised when the losses are
      fetched (every ``log_every`` steps), naming the first non-finite step
      and the latent weights / learned scales that hold NaN or inf. The
      compiled step itself cannot raise (see `make_train_step`).
  """
  from tqdm.auto import tqdm

  if num_steps < 0:
    raise ValueError(f"qat.train: num_steps={num_steps!r}; allowed: >= 0.")
  first = int(ts.step)
  steps, losses = [], []
  pending = []
  log_f = open(log_path, "a") if log_path else None
  t0 = time.perf_counter()

  def flush():
    bad = None
    for i, l in pending:
      v = float(l)
      steps.append(i)
      losses.append(v)
      if bad is None and not math.isfinite(v):
        bad = (i, v)
      if log_f:
        log_f.write(f"{i}\t{v:.6f}\n")
    pending.clear()
    if log_f:
      log_f.flush()
    if bad is not None:
      _check_trained(ts.params, ts.qat, "qat.train", bad[0])  # names the leaves when they went non-finite
      raise ValueError(f"qat.train: the loss is {bad[1]} at step {bad[0]} (non-finite); the weights and scales are "
                       "still finite, so the loss itself overflowed or the batch holds NaN/inf. Check the data "
                       "and the loss; restore an earlier checkpoint (qat.load_train_state) or lower the learning "
                       "rates.")

  def checkpoint(n):
    save_train_state(os.path.join(checkpoint_dir, f"step_{n}"), ts)

  try:
    it = iter(batches)
    bar = tqdm(range(num_steps), desc=desc)
    for i in bar:
      try:
        batch = next(it)
      except StopIteration:
        raise ValueError(f"qat.train: batches ran out after {i} of num_steps={num_steps} steps.") from None
      ts, loss = step(ts, batch)
      pending.append((first + i + 1, loss))
      if (i + 1) % log_every == 0 or i + 1 == num_steps:
        flush()
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
      if checkpoint_dir and checkpoint_every and (i + 1) % checkpoint_every == 0 and i + 1 < num_steps:
        checkpoint(first + i + 1)
    flush()
    if checkpoint_dir:
      checkpoint(first + num_steps)
  finally:
    if log_f:
      log_f.close()
  return ts, TrainLog(steps, losses, time.perf_counter() - t0)


def _save_parts(path, parts: dict, overwrite: bool) -> str:
  """Each part in its own `jquant.save` directory; the group appears atomically (one rename)."""
  path = os.path.abspath(os.fspath(path))
  with atomic_directory(path, overwrite=overwrite, fn="qat.save_state") as tmp:
    for name, tree in parts.items():
      _save(os.path.join(tmp, name), tree)
  return path


def _load_part(path, name, like, fn):
  part = os.path.join(os.fspath(path), name)
  if not os.path.isdir(part):
    raise ValueError(f"qat.{fn}: {os.fspath(path)!r} holds no {name!r}; it was not saved there.")
  return _load(part, target=like)


def save_state(path, state: QATState, *, params=None, overwrite: bool = True) -> str:
  """Saves the QAT state (and optionally the latent weights) with `jquant.save`.

  Example:
    >>> qat.save_state("/tmp/qat_ckpt", state)
    >>> state2 = qat.load_state("/tmp/qat_ckpt", like=state)
  """
  if not isinstance(state, QATState):
    raise TypeError(f"qat.save_state: state must be a qat.QATState, got {type(state).__name__}.")
  parts = {"qat": state} if params is None else {"qat": state, "params": params}
  return _save_parts(path, parts, overwrite)


def load_state(path, like: QATState, *, params_like=None):
  """Loads what `save_state` (or `train`) wrote; ``like`` (``params_like``) give the structure.

  Returns:
    The `QATState`, or ``(state, params)`` when ``params_like`` is given.
  """
  state = _load_part(path, "qat", like, "load_state")
  if params_like is None:
    return state
  return state, _load_part(path, "params", params_like, "load_state")


def save_train_state(path, ts: TrainState, *, overwrite: bool = True) -> str:
  """Saves a whole `TrainState` (resumable: weights, QAT state, optimizer state, step)."""
  return _save_parts(path, {"qat": ts.qat, "params": ts.params, "opt_state": ts.opt_state,
                            "step": {"step": ts.step}}, overwrite)


def load_train_state(path, like: TrainState) -> TrainState:
  """Restores a `TrainState` saved by `save_train_state` or `train`; ``like`` gives the structure.

  Example:
    >>> ts = qat.load_train_state("/tmp/ckpt/step_40", like=qat.init_train_state(params, state, opt))
    >>> ts, log = qat.train(step, ts, batches, num_steps=40)          # steps 41..80
  """
  return TrainState(_load_part(path, "params", like.params, "load_train_state"),
                    _load_part(path, "qat", like.qat, "load_train_state"),
                    _load_part(path, "opt_state", like.opt_state, "load_train_state"),
                    jnp.asarray(_load_part(path, "step", {"step": like.step}, "load_train_state")["step"],
                                jnp.int32))
