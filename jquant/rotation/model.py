"""Rotating a whole model, found from its traced program: QuaRot/SpinQuant-style rotations folded exactly.

`derive_plan` reads the model's program (`jquant.dataflow`) and finds:

* the residual width ``d`` and the embedding tables: parameters ``(V, d)``
  read by a ``gather``;
* the residual *readers*: groups of matmuls whose input is a norm's output,
  with the norm's fold (`jquant.folds.program_candidates`: ``x * scale`` or
  Gemma's ``x * (1 + scale)``);
* the residual *writers*: matmuls whose output (through reshapes, casts
  and its bias) is added to another value (``x + o(...)``, ``x + down(...)``);
* per-head pairs: a matmul (``v``) whose output reaches another matmul
  (``o``) only through reshapes, transposes and products that do not
  contract its channels (attention), as the ``linear`` fold between them
  says, with the head size (the fold's tie, or the first reshape);
* online rotations: the writers whose input is not rotated by any fold
  (``down``, which reads ``silu(gate) * up``).

`rotate` then applies (`jquant.rotation.core`): the norms' scales are folded
into their readers; a randomised Hadamard ``Q`` (d x d) rotates the
embeddings (``E Q``), every reader (``Q^T W``) and every writer (``W Q``,
bias ``b Q``), so the residual stream carries ``x Q`` and the (scale-free)
RMS norms commute with it; a randomised Hadamard of the head size rotates
each value head and the matching rows of ``o``; the online kernels get
``R^T W`` and run as `OnlineRotation` leaves, ``R`` a Hadamard transform of
their input applied in the forward pass. The result is checked: the rotated
float model must give the original outputs on the calibration batch to a
float32 rounding bound, else `RotationError` names what went wrong.

Not supported (the check refuses them): LayerNorm (its mean subtraction
does not commute with ``Q``), norms after a sublayer on its way to the
residual (Gemma 2/3's post-attention norms), and tied embeddings (the final
norm's scale cannot be folded into a table that is also the embedding:
untie first, `untie_embeddings`).

Example:
    >>> import jax, jax.numpy as jnp, jquant
    >>> from jquant.rotation import rotate, untie_embeddings
    >>> m = untie_embeddings(jquant.models.llama_init(jquant.models.LlamaConfig(), jax.random.key(0)))
    >>> tokens = jnp.arange(32).reshape(2, 16)
    >>> rot = rotate(m, m.params, tokens)
    >>> y = rot.model.apply(rot.params, tokens)     # == m.apply(m.params, tokens) to float32 rounding
    >>> rot.change < 1e-4
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jquant import dataflow
from jquant import folds as folds_lib
from jquant.rotation import core
from jquant.rotation.hadamard import Rotation, RotationError, has_hadamard
from jquant.rotation.online import wrap
from jquant.utils import path_str

_NORM_KINDS = ("norm_scale", "norm_one_plus_scale")
# Ops through which a value keeps its channels, one to one (a writer's output on its way to the residual add).
_CHANNEL_OPS = ("reshape", "convert_element_type", "copy", "copy_p")
# Ops allowed between a per-head source and its consumer (attention moves tokens, not channels).
_HEAD_OPS = _CHANNEL_OPS + ("transpose", "broadcast_in_dim", "squeeze", "expand_dims", "dot_general")
# float32 rounding bound of the check: relative change of the outputs (see `rotate`).
DEFAULT_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class RotationConfig:
  """Which rotations `rotate` applies.

  Attributes:
    residual: Rotate the residual stream (QuaRot's ``Q``, d x d).
    heads: Rotate each value head and the rows of the output projection
      reading it (QuaRot's per-head Hadamard).
    online: Rotate the input of writers no fold reaches (the MLP's down
      projection) in the forward pass.
    seed: Seed of the random signs (and of random orthogonal factors).
    kind: ``"hadamard"`` (randomised Hadamard; a random orthogonal factor
      where no Hadamard matrix of the size is built) or ``"orthogonal"``
      (random orthogonal factor of the odd part, SpinQuant's initialisation
      family).
    rtol: Largest relative change of the float outputs the check accepts
      (`DEFAULT_RTOL`, float32 rounding of the rotated weights).
    keep_channels: Residual channels the residual rotation leaves fixed,
      their norm gains kept in the norms. For a massive-activation channel
      that the model silences with a near-zero gain (SmolLM2's channel 507):
      rotating it would spread it over every channel with the gain folded
      into the weights, where quantization error does not shrink with it.

  Example:
    >>> RotationConfig(online=False, seed=3)
  """

  residual: bool = True
  heads: bool = True
  online: bool = True
  seed: int = 0
  kind: str = "hadamard"
  rtol: float = DEFAULT_RTOL
  keep_channels: tuple = ()

  def __post_init__(self):
    keep = self.keep_channels
    if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool):
      raise TypeError(f"RotationConfig: keep_channels={keep!r}; allowed: a tuple of channel indices, e.g. ({keep},).")
    object.__setattr__(self, "keep_channels", tuple(int(c) for c in keep))
    if self.kind not in ("hadamard", "orthogonal"):
      raise ValueError(f"RotationConfig: kind={self.kind!r}; allowed: 'hadamard', 'orthogonal'.")
    if not (isinstance(self.rtol, (int, float)) and self.rtol > 0):
      raise ValueError(f"RotationConfig: rtol={self.rtol!r}; allowed: a positive float.")


class Writer(NamedTuple):
  """A matmul writing the residual: its kernel path, contraction axes, and bias path (or None)."""

  path: str
  k_axes: tuple
  bias: Optional[str]


class HeadPair(NamedTuple):
  """A per-head rotation: ``fold`` (``linear``: source -> consumers) and the head size ``m``."""

  fold: folds_lib.Fold
  m: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `rotate` rotates, derived from the program (`derive_plan`); paths as `jquant.graph` names them.

  Attributes:
    d: Residual width.
    embeddings: Paths of ``(V, d)`` embedding tables.
    norms: Norm `jquant.folds.Fold` s whose consumers read the residual.
    writers: `Writer` s.
    heads: `HeadPair` s.
    online: ``(path, k_axes)`` of kernels rotated online.
  """

  d: int
  embeddings: tuple
  norms: tuple
  writers: tuple
  heads: tuple
  online: tuple

  def summary(self) -> str:
    return (f"d={self.d}: {len(self.embeddings)} embedding(s), {len(self.norms)} norms -> "
            f"{sum(len(f.consumers) for f in self.norms)} readers, {len(self.writers)} writers, "
            f"{len(self.heads)} per-head pairs, {len(self.online)} online")


class RotatedModel:
  """A model whose online rotations run in the forward pass: ``apply(params, *inputs)`` as the original's.

  ``params`` are a plain tree (float, or with quantized leaves: `QArray`,
  `jquant.ops.W8A8Weight`, `jquant.ops.IntMatmulWeight`); the kernels at
  ``online`` are wrapped in `OnlineRotation` at each call, so quantizers
  (RTN, GPTQ, AWQ, calibration) see the model's ordinary tree and GPTQ
  captures the *rotated* input of those kernels. Other attributes (``config``)
  are the wrapped model's.
  """

  def __init__(self, model, apply, params, online: dict):
    self.base, self._apply, self.params, self.online = model, apply, params, dict(online)

  def __getattr__(self, name):
    if name in ("base", "_apply", "params", "online"):
      raise AttributeError(name)
    return getattr(self.base, name)

  def apply(self, params, *inputs):
    from jquant.intercept import quantized
    return quantized(self._apply)(wrap(params, set(self.online), self.online), *inputs)


class Rotated(NamedTuple):
  """Result of `rotate`: the model to run, its rotated float params, the plan, the measured change."""

  model: RotatedModel
  params: Any
  plan: Plan
  change: float


def _flat(params) -> tuple[dict, list, Any]:
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(kp) for kp, _ in leaves]
  return dict(zip(paths, (v for _, v in leaves))), paths, tree


def _writer_bias(flat: dataflow.Flat, site: dataflow.Site, d: int):
  """``(True, bias)`` when the site's output reaches a residual add through channel ops and its bias."""
  walk = flat.linear_bias(site.out, d, through=_CHANNEL_OPS, steps=8)
  if walk.stop is None or flat.eqns[walk.stop].name != "add":
    return False, None
  other = [a for a in flat.eqns[walk.stop].ins if a is not walk.value]
  # A residual add: the other operand is computed (the stream), neither a parameter nor a constant.
  return bool(other) and flat.derived_param(other[0]) is None and not flat.is_const(other[0]), walk.bias


def _head_size(flat: dataflow.Flat, site: dataflow.Site, fold: folds_lib.Fold) -> Optional[int]:
  if fold.tie is not None:
    return fold.tie[1]
  shape = flat.param_shape(site.param)
  free = [shape[a] for a in range(len(shape)) if a not in site.w_axes]
  if len(free) > 1:  # (heads, head_dim) outputs: an N-D projection
    return int(free[-1])
  for i, _ in flat.chain(site.out, 4):
    e = flat.eqns[i]
    if e.name == "reshape":
      return int(e.outs[0].aval.shape[-1])
    if e.name not in _CHANNEL_OPS + ("add",):
      return None
  return None


def _head_path_ok(flat: dataflow.Flat, src: dataflow.Site, dst: dataflow.Site) -> bool:
  between = flat.downstream([src.out], stop_at_sites=True) & flat.upstream([dst.x])
  for i in between:
    e = flat.eqns[i]
    if e.name == "add" and any(flat.derived_param(a) is not None for a in e.ins):
      continue
    if e.name not in _HEAD_OPS:
      return False
  return True


def _scale_use(flat: dataflow.Flat, v, up: set):
  """``(kind, eqn)`` when parameter ``v`` scales a value in ``up`` (``x * g``, or ``x * (1 + g)``), else None."""
  one_plus = False
  for _ in range(8):
    users = flat.users.get(v, [])
    if len(users) != 1:
      return None
    i = users[0]
    e = flat.eqns[i]
    if e.name in dataflow._DERIVED_OPS:
      v = e.outs[0]
      continue
    if e.name == "add" and not one_plus and any(a is not v and flat.is_const(a) for a in e.ins):
      one_plus, v = True, e.outs[0]
      continue
    if e.name == "mul" and i in up:
      return ("norm_one_plus_scale" if one_plus else "norm_scale"), i
    return None
  return None


def _upstream_no_matmul(flat: dataflow.Flat, x) -> set:
  """Equations ``x`` depends on without passing through a product (a norm's output, not an earlier layer's)."""
  out, stack, seen = set(), [x], {x}
  while stack:
    v = stack.pop()
    i = flat.producer.get(v)
    if i is None or i in out or flat.eqns[i].name == "dot_general":
      continue
    out.add(i)
    for a in flat.eqns[i].ins:
      if isinstance(a, dataflow.Var) and a not in seen:
        seen.add(a)
        stack.append(a)
  return out


def _norm_fold(flat: dataflow.Flat, g, d: int) -> Optional[folds_lib.Fold]:
  """The norm whose output the group reads: the walk's norm candidate, else the last norm-like scale before it."""
  cands = folds_lib.program_candidates(flat, g)
  f = next((c for c in cands if c.kind in _NORM_KINDS), None)
  if f is not None:
    return f
  sites = [flat.sites[i] for i in g]
  up = _upstream_no_matmul(flat, sites[0].x)
  best = None
  for v, p in flat.params.items():
    shape = flat.param_shape(p)
    if len(shape) != 1 or shape[0] != d:
      continue
    use = _scale_use(flat, v, up)
    if use is not None and (best is None or use[1] > best[0]):
      best = (use[1], p, use[0])
  if best is None:
    return None
  return folds_lib.Fold(best[2], best[1], tuple(s.param for s in sites), consumer_axes=tuple(s.w_axes for s in sites))


def derive_plan(model, params, *inputs) -> Plan:
  """The `Plan` of a model, from its program traced on ``inputs`` (see the module docstring).

  Args:
    model: A Linen module, an NNX module, an object with ``.apply(params,
      *inputs)`` (jquant's models), or a function (`jquant.graph.as_apply`).
    params: Its float parameters (None: the model's own).
    *inputs: One batch of its positional inputs.

  Raises:
    RotationError: no embedding table, or tables of different widths.
  """
  from jquant import graph
  apply, p0 = graph.as_apply(model)
  params = p0 if params is None else params
  flat = dataflow.trace(apply, params, *inputs)
  emb = []
  for e in flat.eqns:
    if e.name == "gather":
      p = flat.derived_param(e.ins[0])
      if p is not None and len(flat.param_shape(p)) == 2 and p not in emb:
        emb.append(p)
  if not emb:
    raise RotationError("derive_plan: no embedding table (a (V, d) parameter read by a gather) in the program; "
                        "the residual rotation starts there. Rotate a model that embeds its tokens.")
  widths = {flat.param_shape(p)[1] for p in emb}
  if len(widths) != 1:
    raise RotationError(f"derive_plan: embedding tables {emb} have widths {sorted(widths)}; allowed: one width d.")
  d = widths.pop()
  norms, readers = [], set()
  for g in flat.groups:
    if folds_lib._site_k(flat, flat.sites[g[0]]) != d:
      continue
    f = _norm_fold(flat, g, d)
    if f is not None:
      norms.append(f)
      readers.update(f.consumers)
  writers = []
  for s in flat.sites:
    if s.batched or int(np.prod([flat.param_shape(s.param)[a] for a in range(len(flat.param_shape(s.param)))
                                 if a not in s.w_axes])) != d:
      continue
    ok, bias = _writer_bias(flat, s, d)
    if ok:
      writers.append(Writer(s.param, s.w_axes, bias))
  heads, head_consumers = [], set()
  for g in flat.groups:
    if len(g) != 1 or flat.sites[g[0]].param in readers:
      continue
    dst = flat.sites[g[0]]
    for c in folds_lib.program_candidates(flat, g):
      if c.kind != "linear":
        continue
      src = flat.sites[flat.site_of[c.source]]
      m = _head_size(flat, src, c)
      if m and _head_path_ok(flat, src, dst):
        heads.append(HeadPair(c, m))
        head_consumers.update(c.consumers)
        break
  online = tuple((w.path, w.k_axes) for w in writers if w.path not in head_consumers and w.path not in readers)
  return Plan(int(d), tuple(emb), tuple(norms), tuple(writers), tuple(heads), online)


def _relative_change(ref, out) -> float:
  """Largest ``||out - ref|| / ||ref||`` over the outputs (float64 NumPy); inf where not finite."""
  worst = 0.0
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a)
    r = np.linalg.norm(b - a) / (den if den > 0 else 1.0)
    worst = max(worst, r if np.isfinite(r) else np.inf)
  return worst


def _rotation(n: int, seed: int, kind: str) -> Rotation:
  return Rotation.random(n, seed, kind)


def _leaf_paths(params):
  from jquant.intercept import is_quantized
  return [(path_str(k), v) for k, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]]


def rotate(model, params, *inputs, config: RotationConfig = RotationConfig(), plan: Optional[Plan] = None) -> Rotated:
  """The model with its rotations folded into ``params`` and the online ones wrapped; checked exact.

  Args:
    model, params, inputs: As for `derive_plan`; ``inputs`` is also the
      batch the result is checked on.
    config: `RotationConfig`.
    plan: A `Plan` (default: `derive_plan`).

  Returns:
    `Rotated` ``(model, params, plan, change)``: run ``model.apply(params,
    *inputs)``; ``change`` is the relative change ``||y' - y|| / ||y||`` of
    the outputs on ``inputs``.

  Raises:
    RotationError: tied embeddings (the final norm's readers include an
      embedding table; `untie_embeddings`), or the rotated model's outputs
      differ by more than ``config.rtol`` (a LayerNorm, a post-norm on the
      residual, an unsupported reader): the message gives the change.
  """
  from jquant import graph
  if not isinstance(config, RotationConfig):
    raise TypeError(f"rotate: config must be a RotationConfig, got {type(config).__name__}.")
  apply, p0 = graph.as_apply(model)
  params = p0 if params is None else params
  from jquant.intercept import is_quantized
  from jquant.utils import check_finite
  quantized = [path for path, leaf in _leaf_paths(params) if is_quantized(leaf)]
  if quantized:
    raise ValueError(f"rotate: params holds quantized leaves ({quantized[:3]}); rotations fold into float "
                     "weights: rotate the float params, then quantize rot.params.")
  check_finite(params, "rotate", "the float parameters", "Rotate a model whose weights are all finite.")
  if plan is None:
    plan = derive_plan(model, params, *inputs)
  flat, paths, tree = _flat(params)
  online = {}
  if config.residual:
    tied = [c for f in plan.norms for c in f.consumers if c in plan.embeddings]
    if tied:
      raise RotationError(f"rotate: the embedding table {tied[0]!r} also reads the final norm (tied output "
                          "embedding); the norm's scale cannot be folded into it without changing the embedding. "
                          "Untie it first (jquant.rotation.untie_embeddings for jquant's models), or pass "
                          "RotationConfig(residual=False).")
    keep = config.keep_channels
    if any(not 0 <= c < plan.d for c in keep):
      raise RotationError(f"rotate: keep_channels={keep}; allowed: residual channels in [0, {plan.d}).")
    n_rot = plan.d - len(set(keep))
    q = core.fixing(_rotation(n_rot, config.seed, config.kind).matrix(), plan.d, keep)
    for f in plan.norms:
      flat = core.fold_norm_scale(flat, f, keep)
    for e in plan.embeddings:
      flat[e] = core.rotate_output(flat[e], (0,), q)
    for f in plan.norms:
      for i, c in enumerate(f.consumers):
        flat[c] = core.rotate_input(flat[c], f.axes_of(i), q)
    for w in plan.writers:
      flat[w.path] = core.rotate_output(flat[w.path], w.k_axes, q)
      if w.bias is not None:
        flat[w.bias] = core.rotate_output(flat[w.bias], (), q)
  if config.heads:
    for j, (f, m) in enumerate(plan.heads):
      h = _rotation(m, config.seed + 1 + j, config.kind).matrix()
      src = flat[f.source]
      n_out = int(np.prod([src.shape[a] for a in range(src.ndim) if a not in [x % src.ndim for x in f.source_axes]]))
      flat[f.source] = core.rotate_output(src, f.source_axes, core.block_diagonal(h, n_out))
      if f.bias is not None:
        flat[f.bias] = core.rotate_output(flat[f.bias], (), core.block_diagonal(h, n_out))
      for i, c in enumerate(f.consumers):
        w = flat[c]
        k = int(np.prod([w.shape[a] for a in f.axes_of(i)]))
        flat[c] = core.rotate_input(w, f.axes_of(i), core.block_diagonal(h, k))
  if config.online:
    for p, k_axes in plan.online:
      w = flat[p]
      k = int(np.prod([w.shape[a] for a in k_axes]))
      r = Rotation.hadamard(k) if has_hadamard(k) else Rotation.random(k, config.seed, "orthogonal")
      flat[p] = core.rotate_input(w, k_axes, r.matrix())
      online[p] = r
  new = jax.tree_util.tree_unflatten(tree, [flat[p] for p in paths])
  rotated = RotatedModel(model, apply, new, online)
  change = _relative_change(jax.jit(apply)(params, *inputs), jax.jit(rotated.apply)(new, *inputs))
  if not change <= config.rtol:
    raise RotationError(
        f"rotate: the rotated float model's outputs differ from the original's by {change:.3g} relative (allowed: "
        f"{config.rtol:.1g}); this model has an operation the rotation does not commute with (a LayerNorm, a "
        f"norm after a sublayer on its way to the residual, a reader the plan missed). Plan: {plan.summary()}. "
        "Rotate fewer parts (RotationConfig(residual=False) keeps heads/online) or fix the plan.")
  return Rotated(rotated, new, plan, change)


def untie_embeddings(model):
  """A jquant `Model` with a separate output head ``lm_head`` = the embedding's transpose (same function).

  Raises:
    TypeError: not a jquant Llama `Model`.
  """
  from jquant.models.llama import Model
  if not isinstance(model, Model):
    raise TypeError(f"untie_embeddings: model must be a jquant.models Llama Model, got {type(model).__name__}; "
                    "for another model give its output head its own parameter.")
  if not model.config.tie_embeddings:
    return model
  params = dict(model.params)
  params["lm_head"] = {"kernel": jnp.asarray(params["embed"]["embedding"]).T}
  return dataclasses.replace(model, config=dataclasses.replace(model.config, tie_embeddings=False), params=params)


__all__ = ["RotationConfig", "Plan", "Writer", "HeadPair", "Rotated", "RotatedModel", "derive_plan", "rotate",
           "untie_embeddings", "DEFAULT_RTOL"]
