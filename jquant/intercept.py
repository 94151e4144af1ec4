"""Any model on quantized weights: `quantized(fn)` and the matmul interpreter behind it.

Researchers quantize *their* models (Linen or NNX transformers of their own,
Gemma, MaxText, Flax ports). `quantized(fn)` runs such a model's own apply
function on a parameter tree holding quantized leaves, with no edit to the
model:

    y = jax.jit(jquant.quantized(model.apply))({"params": qparams}, x)      # Linen
    y = jax.jit(jquant.quantized(lambda s, x: nnx.merge(graphdef, s)(x)))(qstate, x)   # NNX

How it works. ``fn`` is traced to a jaxpr with every quantized leaf replaced
by a float placeholder of its logical shape and dtype (so Flax's parameter
shape checks, ``promote_dtype`` and NNX's ``merge`` see what they expect).
The jaxpr is then evaluated equation by equation. A quantized leaf flows
through view operations (dtype casts, transposes) as a *view*; when it reaches
a ``dot_general`` whose contraction runs over the axes it was quantized along
(``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``jnp.einsum``/``jnp.dot``
in Gemma's own layers, ``nnx.Linear``/``LinearGeneral``/``Einsum``), the
product is computed by `jquant.ops.qdot` on the packed weight viewed as a
``(K, N)`` matrix (so the Pallas kernels run where they apply). Any other use
of a weight-only `QArray` (an embedding gather, a tied output head that
contracts another axis) reads its dequantized value: the result is exactly the
float model run on dequantized weights. Leaves that also quantize activations
(`W8A8Weight`, QAT's `ActFakeQuant`) are only defined as matmul operands;
other uses raise an error naming the leaf. Nested jits, remat, custom
derivatives and ``lax.scan`` over stacked layers (``nn.scan``) are entered.

Why a jaxpr interpreter and not qwix's interception. qwix intercepts
``jax.lax.dot_general``/``jnp.einsum`` (and Flax's parameter creation) while
the model runs and maps operands back to parameters by identity. That needs a
provider per intercepted function and per framework, and loses the mapping as
soon as the model casts, reshapes or transposes a parameter before the
product. At the jaxpr level every framework and every op spelling reduces to
one primitive, ``dot_general``, and a weight is followed through casts and
transposes exactly; nothing in JAX or Flax is patched. The cost is one extra
trace of ``fn`` per compilation.

The same interpreter records the input of every matmul of any model
(`record_matmul_inputs`, used by `jquant.capture`).

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jquant
    >>> model = nn.Dense(64)
    >>> x = jnp.ones((2, 128))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> spec = jquant.QuantSpec(bits=4, granularity="group", group_size=64)
    >>> qparams = jquant.quantize_params(params, [jquant.Rule("kernel", spec)])
    >>> y = jax.jit(jquant.quantized(model.apply))({"params": qparams}, x)
    >>> y.shape
    (2, 64)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from jquant import ops
from jquant.qarray import QArray, dequantize
from jquant.utils import path_str


class InterceptError(ValueError):
  """A quantized leaf is used in a way that has no quantized meaning."""


# ---------------------------------------------------------------------------
# Quantized leaves.


def is_quantized(x) -> bool:
  """A `QArray` or a wrapper computing its own product (``__qdot__``: `W8A8Weight`, QAT leaves)."""
  return isinstance(x, QArray) or hasattr(type(x), "__qdot__")


def _inner(leaf):
  """The weight a wrapper holds (`W8A8Weight.weight`, `ActFakeQuant.weight`, ...)."""
  return getattr(leaf, "weight", None)


def logical_struct(leaf) -> jax.ShapeDtypeStruct:
  """The float array a quantized leaf stands for, as a shape and dtype."""
  if isinstance(leaf, QArray):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
  inner = _inner(leaf)
  if inner is not None:
    return logical_struct(inner) if isinstance(inner, QArray) else jax.ShapeDtypeStruct(inner.shape, inner.dtype)
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)


def _activation_quantizing(leaf) -> bool:
  # A wrapper whose class sets ``dequantized_elsewhere = True`` (`jquant.gguf.arith.GGMLWeight`) quantizes
  # activations only in its matmuls; other uses (an embedding lookup) read its dequantized weight.
  return not isinstance(leaf, QArray) and not getattr(type(leaf), "dequantized_elsewhere", False)


def dequantize_leaf(leaf):
  """The float value of a weight-only leaf (`QArray`) or of the weight inside a wrapper."""
  if isinstance(leaf, QArray):
    return dequantize(leaf)
  inner = _inner(leaf)
  if inner is None:
    raise TypeError(f"jquant.quantized: cannot read the weight of {type(leaf).__name__}.")
  return dequantize_leaf(inner) if is_quantized(inner) else inner


def _qarray_axes(q: QArray) -> tuple[int, ...]:
  """The logical contraction axes of a `QArray`."""
  p = q.axis % q.qvalue.ndim
  return tuple(range(p, p + (1 if q.axis_shape is None else len(q.axis_shape))))


def _qarray_matrix(q: QArray, contract: tuple[int, ...]):
  """``q`` as a 2-D (K, N) `QArray` when ``contract`` are its quantization axes, else None.

  The payload's free axes move behind its (flattened, packed) contraction axis
  and merge into N: a transpose of bytes, no repacking.
  """
  if set(contract) != set(_qarray_axes(q)):
    return None
  nd = q.qvalue.ndim
  p = q.axis % nd
  order = (p,) + tuple(i for i in range(nd) if i != p)

  def mat(a):
    a = jnp.transpose(a, order)
    return a.reshape(a.shape[0], -1)

  qv, s = mat(q.qvalue), mat(q.scale)
  z = None if q.zero_point is None else mat(q.zero_point)
  supers = (None if a is None else mat(a) for a in (q.super_scale, q.super_min))  # two-level scales
  return QArray(qv, s, z, q.spec.replace(axis=0), q.size, -2, q.dtype, None, *supers)


def as_matrix(leaf, contract: tuple[int, ...]):
  """A quantized leaf as a (K, N) leaf for `jquant.ops.qdot`, or None where it cannot be.

  Args:
    leaf: `QArray`, `W8A8Weight`, `ActQuantWeight`, `ActFakeQuant` or another
      ``__qdot__`` wrapper.
    contract: The logical axes the product contracts.

  Returns:
    ``(matrix, k_axes, n_axes)``: the 2-D leaf, and the logical axes flattened
    (row-major) into its K and N, or None.
  """
  shape = logical_struct(leaf).shape
  free = tuple(a for a in range(len(shape)) if a not in contract)
  k_axes = tuple(sorted(contract))
  if isinstance(leaf, QArray):
    m = _qarray_matrix(leaf, k_axes)
    return None if m is None else (m, k_axes, free)
  inner = _inner(leaf)
  if k_axes == (0,) and len(shape) == 2:
    return leaf, k_axes, free
  if inner is None or not dataclasses.is_dataclass(leaf) and not hasattr(leaf, "_replace"):
    return None
  if isinstance(inner, QArray):
    m = _qarray_matrix(inner, k_axes)
    if m is None:
      return None
  else:
    w = jnp.transpose(inner, k_axes + free)
    m = w.reshape(int(np.prod([shape[a] for a in k_axes])), -1)
  replace = leaf._replace if hasattr(leaf, "_replace") else functools.partial(dataclasses.replace, leaf)
  changes = {"weight": m}
  if getattr(leaf, "weight_scale", None) is not None:
    changes["weight_scale"] = jnp.reshape(leaf.weight_scale, (-1,))
  return replace(**changes), k_axes, free


# ---------------------------------------------------------------------------
# Values of the interpreter.


@dataclasses.dataclass(frozen=True)
class _View:
  """A parameter leaf as the traced program sees it: after transposes and casts.

  ``perm[i]`` is the leaf's logical axis that is axis ``i`` of the view.
  """

  leaf: Any
  path: str
  perm: tuple
  dtype: Any
  quantized: bool

  @property
  def shape(self):
    base = logical_struct(self.leaf).shape if self.quantized else self.leaf.shape
    return tuple(base[a] for a in self.perm)

  def materialize(self, why: str):
    if self.quantized:
      if _activation_quantizing(self.leaf):
        raise InterceptError(
            f"jquant.quantized: {self.path!r} ({type(self.leaf).__name__}) also quantizes the activations of "
            f"its matmul, but the model uses it in {why}; only dot_general/einsum/dot products over its "
            "contraction axes have a quantized meaning. Keep this leaf in float or weight-only (QArray).")
      w = dequantize_leaf(self.leaf)
    else:
      w = self.leaf
    if self.perm != tuple(range(len(self.perm))):
      w = jnp.transpose(w, self.perm)
    return w.astype(self.dtype)


def group_by_source(order, sources) -> list[list[str]]:
  """Paths (in ``order``) grouped by equal ``sources[path]`` keys."""
  groups: dict = {}
  for p in order:
    groups.setdefault(sources[p], []).append(p)
  return list(groups.values())


class _Context:
  """What an evaluation collects: recorded matmul inputs and contraction axes."""

  def __init__(self, record: bool):
    self.record = record
    self.inputs: dict[str, Any] = {}
    self.axes: dict[str, tuple] = {}
    self.order: list[str] = []
    self.sources: dict[str, tuple] = {}
    self.canonical: dict[tuple, Any] = {}
    self._alive: list = []  # keeps recorded activations alive, so their ids identify them

  def groups(self) -> list[list[str]]:
    """Recorded paths grouped by the activation array they read, in call order."""
    return group_by_source(self.order, self.sources)


# ---------------------------------------------------------------------------
# The interpreter.


_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _inner_jaxpr(eqn):
  for name in _CALL_PARAMS:
    j = eqn.params.get(name)
    if j is None:
      continue
    if isinstance(j, jex.core.ClosedJaxpr):
      return j.jaxpr, j.consts
    if isinstance(j, jex.core.Jaxpr):
      return j, ()
  return None


def _eval(jaxpr, consts, args, ctx: _Context):
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    with eqn.ctx.manager:
      if any(isinstance(x, _View) for x in invals):
        outs = _eval_view_eqn(eqn, invals, ctx)
      else:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _materialized(invals, why):
  return [x.materialize(why) if isinstance(x, _View) else x for x in invals]


def _eval_view_eqn(eqn, invals, ctx):
  name = eqn.primitive.name
  x = invals[0]
  if name == "convert_element_type" and isinstance(x, _View) and jnp.issubdtype(eqn.params["new_dtype"],
                                                                                   jnp.floating):
    return dataclasses.replace(x, dtype=eqn.params["new_dtype"])
  if name == "transpose" and isinstance(x, _View):
    return dataclasses.replace(x, perm=tuple(x.perm[p] for p in eqn.params["permutation"]))
  if name in ("copy", "copy_p", "optimization_barrier") and len(invals) == 1:
    return invals[0] if not eqn.primitive.multiple_results else [invals[0]]
  if name == "dot_general":
    return _dot_general(eqn, invals, ctx)
  if name == "scan":
    return _scan(eqn, invals, ctx)
  inner = _inner_jaxpr(eqn)
  if inner is not None and name not in ("while", "cond"):
    # jit, remat, custom_jvp/vjp calls: enter the inner program (their own rules are not needed for a
    # quantized weight, which is not differentiated through its codes).
    j, consts = inner
    return _eval(j, consts, invals, ctx)
  return eqn.primitive.bind(*_materialized(invals, f"'{name}'"), **eqn.primitive.get_bind_params(eqn.params))


def _dot_general(eqn, invals, ctx):
  lhs, rhs = invals
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  out_dtype = eqn.outvars[0].aval.dtype
  if isinstance(lhs, _View) and isinstance(rhs, _View):
    lhs = lhs.materialize("a product of two parameters")
  w_is_rhs = isinstance(rhs, _View)
  w, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
  wc, xc = (rc, lc) if w_is_rhs else (lc, rc)
  wb = rb if w_is_rhs else lb
  contract = tuple(w.perm[d] for d in wc)
  if ctx.record:
    _record(ctx, w, x, contract, dict(zip(contract, xc)))
  if not w.quantized or wb:
    why = "a batched product (dot_general batch dimensions)" if wb else ""
    a, b = (x, w.materialize(why)) if w_is_rhs else (w.materialize(why), x)
    return jax.lax.dot_general(a, b, **eqn.params)
  found = as_matrix(w.leaf, contract)
  if found is None:
    w_val = w.materialize(f"a product over axes {contract} it is not quantized along")
    a, b = (x, w_val) if w_is_rhs else (w_val, x)
    return jax.lax.dot_general(a, b, **eqn.params)
  mat, k_axes, n_axes = found
  pair = dict(zip(contract, xc))
  x_free = [d for d in range(x.ndim) if d not in xc]
  x2 = jnp.transpose(x, x_free + [pair[a] for a in k_axes])
  lead = tuple(x.shape[d] for d in x_free)
  x2 = x2.reshape(lead + (-1,)).astype(w.dtype)
  y = ops.qdot(x2, mat)
  full = logical_struct(w.leaf).shape
  y = y.reshape(lead + tuple(full[a] for a in n_axes))
  # dot_general orders the weight's free axes as the view does.
  view_free = [w.perm[d] for d in range(len(w.perm)) if d not in wc]
  tail = [len(lead) + n_axes.index(a) for a in view_free]
  y = jnp.transpose(y, list(range(len(lead))) + tail)
  if not w_is_rhs:
    nw = len(view_free)
    y = jnp.transpose(y, list(range(len(lead), len(lead) + nw)) + list(range(len(lead))))
  return y.astype(out_dtype)


def _record(ctx: _Context, w: _View, x, contract, pair):
  k_axes = tuple(sorted(contract))
  source = (id(x), tuple(pair[a] for a in k_axes))
  x2 = ctx.canonical.get(source)
  if x2 is None:
    x_free = [d for d in range(x.ndim) if d not in pair.values()]
    perm = x_free + [pair[a] for a in k_axes]
    x2 = x if perm == list(range(x.ndim)) else jnp.transpose(x, perm)
    shape = tuple(x.shape[d] for d in x_free) + (int(np.prod([x.shape[pair[a]] for a in k_axes])),)
    x2 = x2 if x2.shape == shape else x2.reshape(shape)
    ctx.canonical[source] = x2
  if w.path in ctx.inputs:
    from jquant.capture import CaptureError
    raise CaptureError(
        f"capture: parameter {w.path!r} is used by two matmuls inside one capture; capture one application "
        "at a time (weights shared between layers are not supported).")
  ctx.inputs[w.path] = x2
  ctx.axes[w.path] = k_axes
  ctx.order.append(w.path)
  ctx.sources[w.path] = source
  ctx._alive.append(x)


def _scan_parts(p, invals):
  """(consts, carry, xs) of a scan equation (jax >= 0.11 describes them with ``ft_in``)."""
  if "ft_in" in p:
    return tuple(map(list, p["ft_in"].update(list(invals)).unpack()))
  nc, ncar = p["num_consts"], p["num_carry"]
  return list(invals[:nc]), list(invals[nc:nc + ncar]), list(invals[nc + ncar:])


def _scan(eqn, invals, ctx):
  p = eqn.params
  consts, carry, xs = _scan_parts(p, invals)
  ncar = len(carry)
  if any(isinstance(c, _View) for c in carry):
    carry = _materialized(carry, "a scan carry")
  # A stacked leaf scanned over (nn.scan) is sliced as a pytree: each step sees one layer's leaf.
  xs_in, rebuild = [], []
  for x in xs:
    if isinstance(x, _View) and x.perm == tuple(range(len(x.perm))) and x.perm and (
        not x.quantized or _scannable(x.leaf)):
      xs_in.append(x.leaf)
      rebuild.append(x)
    else:
      xs_in.append(x.materialize("a scan over a transposed parameter") if isinstance(x, _View) else x)
      rebuild.append(None)
  body = p["jaxpr"]
  body_jaxpr, body_consts = (body.jaxpr, body.consts) if hasattr(body, "consts") else (body, ())

  def step(c, x_slices):
    args = []
    for x, r in zip(x_slices, rebuild):
      if r is None:
        args.append(x)
      else:
        args.append(_View(x, r.path, tuple(range(len(r.perm) - 1)), r.dtype, r.quantized))
    outs = _eval(body_jaxpr, body_consts, [*consts, *c, *args], ctx)
    return list(outs[:ncar]), list(outs[ncar:])

  if ctx.record:
    raise InterceptError("capture: matmul inputs inside lax.scan cannot be recorded per layer; unroll the "
                         "layers (e.g. nn.scan -> a Python loop) for calibration.")
  c_out, ys = jax.lax.scan(step, list(carry), xs_in, length=p["length"], reverse=p["reverse"],
                           unroll=p["unroll"])
  return [*c_out, *ys]


def _scannable(leaf) -> bool:
  """A stacked quantized leaf whose leading (layer) axis is not quantized along."""
  q = leaf if isinstance(leaf, QArray) else _inner(leaf)
  if isinstance(q, QArray):
    return 0 not in _qarray_axes(q)
  return True


# ---------------------------------------------------------------------------
# Entry points.


def param_path(keypath) -> str:
  """The ``/``-joined parameter path of a leaf in ``(args, kwargs)``.

  The argument index, a leading Linen ``params`` collection and NNX's
  trailing ``value`` are dropped: ``({"params": {"dense": {"kernel": w}}},)``
  gives ``"dense/kernel"``.
  """
  keys = list(keypath)[2:] if len(keypath) >= 2 else list(keypath)
  if keys and getattr(keys[0], "key", None) == "params":
    keys = keys[1:]
  if keys and getattr(keys[-1], "name", None) in ("value", "raw_value"):
    keys = keys[:-1]
  return path_str(keys)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "__jax_array__")


def _trace(fn, args, kwargs, watch: Callable[[Any], bool]):
  """Traces ``fn`` with watched leaves as float placeholders; returns the jaxpr and the evaluation inputs."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_quantized)
  values = [leaf for _, leaf in leaves]
  dyn = [i for i, v in enumerate(values) if is_quantized(v) or _is_array(v)]

  def flat_fn(*dyn_vals):
    vals = list(values)
    for i, v in zip(dyn, dyn_vals):
      vals[i] = v
    a, kw = jax.tree_util.tree_unflatten(treedef, vals)
    return fn(*a, **kw)

  structs = [logical_struct(values[i]) if is_quantized(values[i])
             else jax.ShapeDtypeStruct(jnp.shape(values[i]), jnp.result_type(values[i])) for i in dyn]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*structs)
  inputs = []
  for i in dyn:
    v = values[i]
    path = param_path(leaves[i][0])
    if is_quantized(v):
      s = logical_struct(v)
      inputs.append(_View(v, path, tuple(range(len(s.shape))), s.dtype, True))
    elif watch(v):
      inputs.append(_View(v, path, tuple(range(jnp.ndim(v))), jnp.result_type(v), False))
    else:
      inputs.append(v)
  return closed, out_shape, inputs


def _run(fn, args, kwargs, ctx: _Context, watch):
  closed, out_shape, inputs = _trace(fn, args, kwargs, watch)
  outs = _eval(closed.jaxpr, closed.consts, inputs, ctx)
  outs = [o.materialize("the function's outputs") if isinstance(o, _View) else o for o in outs]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def quantized(fn: Callable) -> Callable:
  """``fn`` run on trees that hold quantized leaves, with no edit to ``fn``.

  Every matmul (``dot_general``, hence ``einsum``, ``dot``, ``@``, Flax's
  ``Dense``/``DenseGeneral``/``Einsum``, NNX's ``Linear``/``LinearGeneral``/
  ``Einsum``) whose weight operand is a quantized leaf contracted over its
  quantization axes runs through `jquant.ops.qdot` (packed, Pallas kernels
  where they apply); every other use of a weight-only `QArray` reads its
  dequantized value. See the module docstring.

  Args:
    fn: Any function of pytrees (``model.apply``, an NNX merge-and-call).

  Returns:
    A function with ``fn``'s signature and outputs. Jit it: each call traces
    ``fn`` once more.

  Raises:
    InterceptError: an activation-quantizing leaf (`W8A8Weight`, QAT's
      `ActFakeQuant`) is used other than as a matmul weight.

  Example:
    >>> y = jax.jit(jquant.quantized(model.apply))({"params": qparams}, x)
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    leaves = jax.tree_util.tree_leaves((args, kwargs), is_leaf=is_quantized)
    if not any(is_quantized(x) for x in leaves):
      return fn(*args, **kwargs)
    return _run(fn, args, kwargs, _Context(record=False), watch=lambda v: False)

  return wrapped


def _is_weight(v) -> bool:
  return jnp.ndim(v) >= 2 and jnp.issubdtype(jnp.result_type(v), jnp.floating)


def record_matmul_inputs(fn: Callable, *args, **kwargs):
  """Runs ``fn`` and records the activation of every matmul against a parameter leaf.

  Returns:
    ``(out, inputs, axes, order, sources)``: ``fn``'s output; ``{path: x}``
    with ``x`` shaped ``(..., K)`` (the contracted axes flattened last,
    ordered as the weight's axes); ``{path: contraction axes of the weight}``;
    the paths in call order; ``{path: key}``, equal keys for paths whose
    matmuls read the same activation array over the same axes.
  """
  ctx = _Context(record=True)
  out = _run(fn, args, kwargs, ctx, watch=_is_weight)
  return out, ctx.inputs, ctx.axes, ctx.order, ctx.sources


__all__ = ["quantized", "record_matmul_inputs", "is_quantized", "logical_struct", "as_matrix",
           "dequantize_leaf", "param_path", "InterceptError"]
