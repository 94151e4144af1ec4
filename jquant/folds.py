"""Folds as data: where a per-channel scale on a matmul's input can be absorbed, found and checked.

AWQ and SmoothQuant rewrite ``x @ W`` as ``(x / s) @ (s * W)`` with a positive
per-channel ``s`` (K,) on the contraction. ``s * W`` scales the weight's input
rows; ``x / s`` must be absorbed by the operation that *produces* ``x``, so
that the float model computes the same function. A `Fold` says which
operation that is and how it absorbs ``1 / s``:

* ``norm_scale``: a norm ending in ``x * scale`` (RMSNorm, LayerNorm):
  ``scale /= s``, and the norm's ``bias /= s``;
* ``norm_one_plus_scale``: Gemma's ``x * (1 + scale)``:
  ``scale' = (1 + scale) / s - 1``;
* ``linear``: a matmul with a parameter (``up`` before ``down`` in a gated
  MLP, ``v`` before ``o``): its output channels and its ``bias /= s``; N-D
  kernels included (``DenseGeneral``/``Einsum`` value projections). With
  ``tie=(r, m)`` the consumer reads each group of ``m`` source channels ``r``
  times (grouped-query attention: ``o`` reads each kv head once per query
  head of its group), so ``s`` must be equal over the copies.

The consumers' kernels get ``* s`` along their contraction axes.

Folds are derived from the model's traced program (`jquant.dataflow`): for
each group of matmuls sharing an input, the producer of that input is found
by walking back from it: a ``mul`` by a (reshaped) parameter of K entries is
a norm scale (``mul`` by ``1 + parameter``: Gemma's), an ``add`` of such a
parameter on the way is the norm's bias, a ``dot_general`` with a parameter
whose outputs number K (or divide K) is a linear source, its bias the
parameter added to its output. Candidates that the walk does not reach are
then tried from the parameter tree (1-D parameters of K entries, kernels with
K outputs). Every candidate is *verified numerically* before use: applied
with a random ``s`` (e^U(-1, 1)) on a calibration batch, it must leave the
block's (or the model's) float outputs unchanged to `DEFAULT_RTOL` relative
(float32; 4 ulp of the dtype for lower precision). What fails is not used: a
derived candidate is listed as rejected, a fold the user gave is refused
with a `FoldError` naming it. That is what keeps a bias left undivided, a fold
across a GELU, or a post-norm LayerNorm whose output is also the residual
stream from ever changing the model.

Paths are those of `jquant.graph` (``layers_0/attn_norm/scale``), relative to
the tree the fold is applied to.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jquant
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     h = nn.Dense(32, name="up")(nn.RMSNorm(name="norm")(x))
    ...     return x + nn.Dense(16, name="down")(h)
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for i in range(2):
    ...       x = Block(name=f"layers_{i}")(x)
    ...     return x
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    >>> params = Net().init(jax.random.key(1), x)["params"]
    >>> found = jquant.folds.derive(Net(), params, x)
    >>> [(f.kind, f.name, f.consumers) for f in found.folds][:2]
    [('norm_scale', 'layers_0/norm', ('layers_0/up/kernel',)), ('linear', 'layers_0/up', ('layers_0/down/kernel',))]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jquant import dataflow
from jquant.utils import path_str

KINDS = ("norm_scale", "norm_one_plus_scale", "linear")
DEFAULT_RTOL = 1e-5  # largest relative change of the float outputs a fold may cause (float32)
_MAX_CANDIDATES = 8  # candidates tried per group of matmuls
_LOG_RANGE = 1.0     # verification scales are e^U(-1, 1)
_LEAF_NAMES = ("kernel", "scale", "weight", "w")


class FoldError(ValueError):
  """A fold that would change the float model, or one that does not fit the parameters."""


@dataclasses.dataclass(frozen=True)
class Fold:
  """Where ``1 / s`` for the input of some matmuls is absorbed.

  Attributes:
    kind: One of `KINDS`.
    source: Path of the norm's scale (norm kinds) or of the producing
      matmul's kernel (``linear``).
    consumers: Paths of the kernels reading the scaled input; each gets
      ``* s`` along its contraction axes.
    bias: Path of the source's bias (divided by ``s``), or None.
    source_axes: ``linear`` only: the source kernel's contracted axes; its
      other axes, in order, are its output channels (``(0,)`` for a Dense
      ``(in, out)`` kernel).
    consumer_axes: Each consumer's contraction axes (ascending); None means
      ``(0,)`` for every consumer.
    tie: ``linear`` only: ``(r, m)`` when the consumers read each group of
      ``m`` source channels ``r`` times (grouped-query attention), else None.

  Example:
    >>> Fold("norm_scale", "layers_0/attn_norm/scale", ("layers_0/attn/q/kernel", "layers_0/attn/k/kernel"))
  """

  kind: str
  source: str
  consumers: tuple
  bias: Optional[str] = None
  source_axes: tuple = (0,)
  consumer_axes: Optional[tuple] = None
  tie: Optional[tuple] = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Fold: kind={self.kind!r}; allowed: {KINDS}.")
    if isinstance(self.consumers, str) or not self.consumers:
      raise ValueError(f"Fold: consumers={self.consumers!r}; allowed: a non-empty tuple of kernel paths.")
    object.__setattr__(self, "consumers", tuple(self.consumers))
    object.__setattr__(self, "source_axes", tuple(int(a) for a in self.source_axes))
    if self.consumer_axes is not None:
      axes = tuple(tuple(int(a) for a in ax) for ax in self.consumer_axes)
      if len(axes) != len(self.consumers):
        raise ValueError(f"Fold: consumer_axes has {len(axes)} entries for {len(self.consumers)} consumers; "
                         "allowed: one tuple of axes per consumer, or None.")
      object.__setattr__(self, "consumer_axes", axes)
    if self.tie is not None:
      if self.kind != "linear" or len(self.tie) != 2 or min(self.tie) < 1:
        raise ValueError(f"Fold: tie={self.tie!r}; allowed: None, or (copies, channels per group) >= 1 for a "
                         "'linear' fold.")
      object.__setattr__(self, "tie", (int(self.tie[0]), int(self.tie[1])))

  @property
  def name(self) -> str:
    """The source module's path: ``layers_0/attn_norm``, ``layers_0/mlp/up`` (the source path without a
    trailing ``kernel``/``scale``/``weight``/``w``)."""
    head, _, last = self.source.rpartition("/")
    return head if head and last in _LEAF_NAMES else self.source

  def axes_of(self, i: int) -> tuple:
    return (0,) if self.consumer_axes is None else self.consumer_axes[i]

  def paths(self) -> tuple:
    return (self.source,) + ((self.bias,) if self.bias else ()) + self.consumers

  def under(self, prefix: str) -> "Fold":
    """The same fold with every path below ``prefix`` (block-relative -> full paths)."""
    if not prefix:
      return self
    j = lambda p: p[1:] if p.startswith("/") else f"{prefix}/{p}"
    return dataclasses.replace(self, source=j(self.source), bias=self.bias and j(self.bias),
                               consumers=tuple(j(c) for c in self.consumers))

  def relative_to(self, prefix: str) -> Optional["Fold"]:
    """The fold with paths relative to ``prefix`` (None if a path is outside it)."""
    if not prefix:
      return self
    n = len(prefix) + 1
    if not all(p.startswith(prefix + "/") for p in self.paths()):
      return None
    return dataclasses.replace(self, source=self.source[n:], bias=self.bias and self.bias[n:],
                               consumers=tuple(c[n:] for c in self.consumers))

  def tie_stat(self, v, reduce: str = "max"):
    """A per-channel statistic (K,) made equal over the tied copies (``max`` or ``mean``); as is without a tie."""
    if self.tie is None:
      return v
    r, m = self.tie
    g = jnp.reshape(v, (-1, r, m))
    g = jnp.max(g, axis=1, keepdims=True) if reduce == "max" else jnp.mean(g, axis=1, keepdims=True)
    return jnp.broadcast_to(g, (g.shape[0], r, m)).reshape(-1)

  def source_scales(self, s):
    """The scales of the source's channels: ``s`` itself, or one per tied group."""
    if self.tie is None:
      return s
    r, m = self.tie
    return jnp.reshape(s, (-1, r, m))[:, 0, :].reshape(-1)


class Rejected(NamedTuple):
  """A candidate fold that changed the float outputs: the fold and the relative change it caused."""

  fold: Fold
  change: float


class Derived(NamedTuple):
  """Result of `derive`: verified folds, and candidates refused by the check."""

  folds: tuple
  rejected: tuple


# ---------------------------------------------------------------------------
# The math: exact in real arithmetic.


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _along(s, shape, axes):
  """``s`` shaped to broadcast against an array of ``shape`` along ``axes`` (row-major)."""
  sizes = [shape[a] for a in axes]
  out = [1] * len(shape)
  for a in axes:
    out[a] = shape[a]
  return jnp.reshape(jnp.reshape(s, sizes), out)


def _leaf(params: Mapping, path: str, fold: Fold):
  if path not in params:
    raise FoldError(f"fold {fold.name!r} ({fold.kind}): no parameter {path!r}; parameters look like "
                    f"{sorted(params)[:6]}. Give paths as jquant.graph names them.")
  return params[path]


def check_fold(params: Mapping, fold: Fold) -> int:
  """The fold's channel count K, after checking its shapes against ``params`` ``{path: array}``.

  Raises:
    FoldError: a path is missing, or sizes disagree.
  """
  ks = set()
  for i, c in enumerate(fold.consumers):
    w = _leaf(params, c, fold)
    axes = fold.axes_of(i)
    if any(not -w.ndim <= a < w.ndim for a in axes):
      raise FoldError(f"fold {fold.name!r}: consumer {c!r} has shape {tuple(w.shape)}, no axes {axes}.")
    ks.add(int(np.prod([w.shape[a] for a in axes])))
  if len(ks) != 1:
    raise FoldError(f"fold {fold.name!r}: consumers {fold.consumers} contract different sizes {sorted(ks)}; a "
                    "fold's consumers must read the same input.")
  k = ks.pop()
  r = 1
  if fold.tie is not None:
    r, m = fold.tie
    if k % (r * m):
      raise FoldError(f"fold {fold.name!r}: tie={fold.tie} (copies, channels per group) does not divide the {k} "
                      "input channels of its consumers.")
  ks_src = k // r
  src = _leaf(params, fold.source, fold)
  if fold.kind == "linear":
    free = [a for a in range(src.ndim) if a not in [x % src.ndim for x in fold.source_axes]]
    n_out = int(np.prod([src.shape[a] for a in free]))
  else:
    n_out = int(np.size(src))
  if n_out != ks_src:
    raise FoldError(f"fold {fold.name!r} ({fold.kind}): source {fold.source!r} has {n_out} output channels but "
                    f"its consumers read {k} (tie {fold.tie}); they must match.")
  if fold.bias is not None and int(np.size(_leaf(params, fold.bias, fold))) != ks_src:
    raise FoldError(f"fold {fold.name!r}: bias {fold.bias!r} has {int(np.size(params[fold.bias]))} entries, the "
                    f"source {ks_src} channels.")
  return k


def apply_fold(params: Mapping[str, Any], fold: Fold, s) -> dict:
  """``params`` ``{path: array}`` with ``1 / s`` folded into the source and ``s`` into the consumers.

  Args:
    params: Flat ``{path: float array}`` holding the fold's paths.
    fold: The `Fold`.
    s: ``(K,)`` positive scales on the consumers' input channels. With a
      ``tie``, each tied group's scales are read at its first copy (make
      them equal with `Fold.tie_stat`).

  Returns:
    A new dict; the float function is unchanged (up to one rounding per
    touched weight) when the fold is valid.

  Raises:
    FoldError: shapes disagree.
  """
  k = check_fold(params, fold)
  s = _f32(s)
  if s.shape != (k,):
    raise FoldError(f"fold {fold.name!r}: s has shape {tuple(s.shape)}; allowed: ({k},), the consumers' input "
                    "channels.")
  s_src = fold.source_scales(s)
  if fold.tie is not None:  # the consumers read each source channel r times: one scale for all copies
    r, m = fold.tie
    s = jnp.broadcast_to(jnp.reshape(s_src, (-1, 1, m)), (k // (r * m), r, m)).reshape(-1)
  out = dict(params)
  src = params[fold.source]
  if fold.kind == "norm_scale":
    out[fold.source] = (_f32(src) / jnp.reshape(s_src, src.shape)).astype(src.dtype)
  elif fold.kind == "norm_one_plus_scale":
    out[fold.source] = ((1.0 + _f32(src)) / jnp.reshape(s_src, src.shape) - 1.0).astype(src.dtype)
  else:
    axes = [a % src.ndim for a in fold.source_axes]
    free = [a for a in range(src.ndim) if a not in axes]
    out[fold.source] = (_f32(src) / _along(s_src, src.shape, free)).astype(src.dtype)
  if fold.bias is not None:
    b = params[fold.bias]
    out[fold.bias] = (_f32(b) / jnp.reshape(s_src, b.shape)).astype(b.dtype)
  for i, c in enumerate(fold.consumers):
    w = params[c]
    axes = [a % w.ndim for a in fold.axes_of(i)]
    out[c] = (_f32(w) * _along(s, w.shape, axes)).astype(w.dtype)
  return out


def apply(params, folds: Sequence[Fold], scales: Mapping[str, Any]):
  """A parameter tree with every fold applied with ``scales[fold.name]``.

  Args:
    params: A float parameter tree (Linen dict, NNX state).
    folds: `Fold` s with paths in ``params``.
    scales: ``{fold.name: (K,) scales}``; folds without an entry are skipped.

  Returns:
    A tree of the same structure.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(kp) for kp, _ in leaves]
  flat = dict(zip(paths, (v for _, v in leaves)))
  for f in folds:
    if f.name in scales:
      flat = apply_fold(flat, f, scales[f.name])
  return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths])


def random_scales(k: int, seed: int) -> np.ndarray:
  """Verification scales: ``(k,)`` float32 ``e^U(-1, 1)``, fixed by ``seed`` (NumPy, no device work)."""
  return np.exp(np.random.default_rng(seed).uniform(-_LOG_RANGE, _LOG_RANGE, k)).astype(np.float32)


def _tie_np(fold: Fold, s: np.ndarray) -> np.ndarray:
  if fold.tie is None:
    return s
  r, m = fold.tie
  g = s.reshape(-1, r, m)[:, :1, :]
  return np.broadcast_to(g, (g.shape[0], r, m)).reshape(-1).copy()


def relative_change(ref: Sequence, out: Sequence):
  """Largest ``||out - ref|| / ||ref||`` over the floating outputs (float32; traceable); inf if others differ."""
  worst = jnp.float32(0.0)
  for a, b in zip(ref, out):
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
      worst = jnp.where(jnp.array_equal(a, b), worst, jnp.inf)
      continue
    a32, b32 = _f32(a).ravel(), _f32(b).ravel()
    den = jnp.linalg.norm(a32)
    num = jnp.linalg.norm(b32 - a32)
    r = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), num)
    worst = jnp.maximum(worst, jnp.where(jnp.isfinite(r), r, jnp.inf))
  return worst


_relative_change_jit = jax.jit(relative_change)


def default_rtol(outputs: Sequence) -> float:
  """`DEFAULT_RTOL` for float32 outputs; 4 ulp of the coarsest floating output dtype otherwise."""
  eps = [float(jnp.finfo(jnp.result_type(o)).eps) for o in outputs
         if jnp.issubdtype(jnp.result_type(o), jnp.floating)]
  return max([DEFAULT_RTOL] + [4 * e for e in eps if e > np.finfo(np.float32).eps])


# ---------------------------------------------------------------------------
# Finding candidates in a program.


def _site_k(flat: dataflow.Flat, site: dataflow.Site) -> int:
  shape = flat.param_shape(site.param)
  return int(np.prod([shape[a] for a in site.w_axes]))


def _site_outputs(flat: dataflow.Flat, site: dataflow.Site) -> tuple:
  shape = flat.param_shape(site.param)
  return tuple(shape[a] for a in range(len(shape)) if a not in site.w_axes)


def _ties(flat: dataflow.Flat, site: dataflow.Site, k: int, n_out: int) -> list:
  """Candidate ``tie`` s for a source with ``n_out`` channels feeding ``k`` inputs."""
  if n_out == k:
    return [None]
  if k % n_out:
    return []
  r = k // n_out
  ms = []
  # The channels per head: the last axis of the first reshape of the source's output.
  v = site.out
  for _ in range(4):
    users = flat.users.get(v, [])
    if not users:
      break
    e = flat.eqns[users[0]]
    if e.name == "reshape":
      ms.append(int(e.outs[0].aval.shape[-1]))
      break
    if e.name not in ("add", "convert_element_type", "copy"):
      break
    v = e.outs[0]
  shape = _site_outputs(flat, site)
  if len(shape) > 1:
    ms.append(int(shape[-1]))
  ms.append(n_out)
  return [(r, m) for m in dict.fromkeys(ms) if n_out % m == 0]


def program_candidates(flat: dataflow.Flat, group: Sequence[int]) -> list[Fold]:
  """Candidate folds for a group of sites, in the order the walk back from their input reaches them.

  Paths are those of ``flat``'s parameters. Nothing is verified here.
  """
  sites = [flat.sites[i] for i in group]
  k = _site_k(flat, sites[0])
  consumers = tuple(s.param for s in sites)
  consumer_axes = tuple(s.w_axes for s in sites)
  site_eqns = {s.eqn: s for s in flat.sites}
  out: list = []
  seen_vars = set()
  queue = [(sites[0].x, None)]
  while queue and len(out) < _MAX_CANDIDATES:
    v, bias = queue.pop(0)
    if v in seen_vars or not isinstance(v, dataflow.Var):
      continue
    seen_vars.add(v)
    i = flat.producer.get(v)
    if i is None:
      continue
    e = flat.eqns[i]
    if i in site_eqns:
      src = site_eqns[i]
      if src.param in consumers or src.batched:
        continue
      n_out = int(np.prod(_site_outputs(flat, src)))
      for tie in _ties(flat, src, k, n_out):
        out.append(Fold("linear", src.param, consumers, flat.linear_bias(src.out, n_out).bias, src.w_axes,
                        consumer_axes, tie))
      continue
    nxt = [a for a in e.ins if isinstance(a, dataflow.Var) and not flat.is_const(a)]
    if e.name in ("mul", "add"):
      found = None
      for a in e.ins:
        p = flat.derived_param(a)
        if p is not None and len(flat.param_shape(p)) >= 1 and int(np.prod(flat.param_shape(p))) == k:
          found = (a, p)
      if found is not None and e.name == "mul":
        out.append(Fold("norm_scale", found[1], consumers, bias, consumer_axes=consumer_axes))
        nxt = [a for a in nxt if a is not found[0]]
      elif found is not None:
        bias = found[1]
        nxt = [a for a in nxt if a is not found[0]]
      if e.name == "mul":  # x * (1 + scale): the scale reached through an add of a constant
        for a in e.ins:
          j = flat.producer.get(a) if isinstance(a, dataflow.Var) else None
          if j is None or flat.eqns[j].name != "add":
            continue
          ins = flat.eqns[j].ins
          ps = [flat.derived_param(b) for b in ins]
          if any(p is not None for p in ps) and any(flat.is_const(b) for b in ins):
            p = next(p for p in ps if p is not None)
            if int(np.prod(flat.param_shape(p))) == k:
              out.append(Fold("norm_one_plus_scale", p, consumers, bias, consumer_axes=consumer_axes))
              nxt = [b for b in nxt if b is not a]
    queue.extend((a, bias) for a in nxt)
  return list(dict.fromkeys(out))[:_MAX_CANDIDATES]


def tree_candidates(flat: dataflow.Flat, group: Sequence[int], params: Mapping[str, Any]) -> list[Fold]:
  """Candidates from the parameter tree the walk did not propose.

  1-D parameters of K entries that the program multiplies with (as a norm
  scale, or ``1 +`` it), with a sibling ``*bias`` of K entries as their bias;
  and matmuls upstream of the group's input with K outputs (or a divisor of K).
  """
  sites = [flat.sites[i] for i in group]
  k = _site_k(flat, sites[0])
  consumers = tuple(s.param for s in sites)
  axes = tuple(s.w_axes for s in sites)
  scaling = set()
  for e in flat.eqns:
    if e.name in ("mul", "add"):
      for a in e.ins:
        p = flat.derived_param(a)
        if p is not None and (e.name == "mul" or any(flat.is_const(b) for b in e.ins)):
          scaling.add(p)
  out = []
  for p, leaf in params.items():
    if p not in scaling or p.startswith("/") or jnp.ndim(leaf) != 1 or int(np.size(leaf)) != k:
      continue
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      continue
    stem = p.rsplit("/", 1)[0] if "/" in p else ""
    bias = next((q for q in params if q != p and q.rsplit("/", 1)[0] == stem and q.endswith("bias")
                 and jnp.ndim(params[q]) == 1 and int(np.size(params[q])) == k), None)
    out.append(Fold("norm_scale", p, consumers, bias, consumer_axes=axes))
    out.append(Fold("norm_one_plus_scale", p, consumers, bias, consumer_axes=axes))
  upstream = flat.upstream([sites[0].x])
  for src in flat.sites:
    if src.eqn not in upstream or src.param in consumers or src.batched or src.param.startswith("/"):
      continue
    n_out = int(np.prod(_site_outputs(flat, src)))
    for tie in _ties(flat, src, k, n_out):
      out.append(Fold("linear", src.param, consumers, flat.linear_bias(src.out, n_out).bias, src.w_axes, axes, tie))
  return out


# ---------------------------------------------------------------------------
# Verification and derivation on a piece of program.


class Checker:
  """Runs a piece of program on one calibration batch and checks folds against its float outputs.

  The program is compiled once per ``fn`` (alike pieces that pass the same
  ``cache`` share it); each check applies folds with random scales, runs it
  and measures the relative change of its outputs.

  Args:
    fn: Traceable ``fn(params, *args) -> list of outputs``, ``params`` a flat
      ``{path: array}``.
    params: The float parameters ``{path: array}``.
    args: ``fn``'s other arguments (the batch, or a block's inputs).
    rtol: Largest relative change allowed (default `default_rtol`).
    cache: A dict shared by checkers of the same ``fn`` (compiled code).
  """

  def __init__(self, fn: Callable, params: Mapping[str, Any], args: Sequence = (), rtol: Optional[float] = None,
               cache: Optional[dict] = None):
    self.fn = fn
    self.params = dict(params)
    self.args = tuple(args)
    self.cache = {} if cache is None else cache
    ref = self.cache.get("ref")
    if ref is None:
      ref = self.cache["ref"] = jax.jit(fn)
    self.ref = ref(self.params, *self.args)
    self.rtol = default_rtol(self.ref) if rtol is None else float(rtol)

  def change(self, folds: Sequence[Fold], seed: int = 0) -> float:
    """The relative change of the outputs with ``folds`` applied with random scales.

    The folds are applied op by op (small, cached kernels) and the program
    runs compiled once for all checks of this ``fn``.
    """
    p = self.params
    for j, f in enumerate(folds):
      p = apply_fold(p, f, _tie_np(f, random_scales(check_fold(p, f), seed + j)))
    return float(_relative_change_jit(self.ref, self.cache["ref"](p, *self.args)))

  def ok(self, folds: Sequence[Fold]) -> bool:
    try:
      return self.change(folds) <= self.rtol
    except FoldError:
      return False

  def require(self, folds: Sequence[Fold], describe: Callable[[Fold], str] = lambda f: f.name):
    """Raises `FoldError` naming the first fold that changes the outputs (all are checked together first)."""
    if self.ok(folds):
      return
    for f in folds:
      c = self.change([f])
      if not c <= self.rtol:
        raise FoldError(
            f"fold {describe(f)!r} ({f.kind}: {f.source} -> {', '.join(f.consumers)}"
            f"{', bias ' + f.bias if f.bias else ''}) changes the float outputs by {c:.3g} relative with random "
            f"scales (allowed: {self.rtol:.1g}); it is not exact for this model (a nonlinearity between source "
            "and consumers, an undivided bias, or a source that also feeds other layers). Remove it.")
    raise FoldError(f"folds {[describe(f) for f in folds]} change the float outputs together, though each alone "
                    "does not; two of them touch the same parameters in incompatible ways.")


def derive_groups(flat: dataflow.Flat, checker: Checker, groups: Optional[Sequence[Sequence[int]]] = None,
                  *, fallback: bool = True) -> tuple[list, list]:
  """Verified folds for the groups of ``flat`` (all by default), and rejected candidates.

  For each group the candidates of `program_candidates` (then, with
  ``fallback``, `tree_candidates`) are checked in order; the first that
  leaves the outputs unchanged is kept.

  Returns:
    ``(folds, rejected)``: one `Fold` per group that has one; `Rejected`
    candidates.
  """
  groups = flat.groups if groups is None else groups
  folds, rejected, used = [], [], set()
  for g in groups:
    if any(flat.sites[i].param.startswith("/") for i in g):
      continue  # weights outside this piece (shared) are not folded here
    tried = []
    chosen = None
    cands = program_candidates(flat, g)
    if fallback:
      cands = cands + [c for c in tree_candidates(flat, g, checker.params) if c not in cands]
    for c in cands:
      if c in tried or c.source in used or c.source.startswith("/") or (c.bias or "").startswith("/"):
        continue
      tried.append(c)
      try:
        change = checker.change([c])
      except FoldError:
        continue
      if change <= checker.rtol:
        chosen = c
        break
      rejected.append(Rejected(c, change))
    if chosen is not None:
      folds.append(chosen)
      used.add(chosen.source)
  return folds, rejected


# ---------------------------------------------------------------------------
# Whole models.


def _model_pieces(model, params):
  from jquant import graph
  apply, p0 = graph.as_apply(model)
  params = p0 if params is None else params
  if params is None:
    raise ValueError("folds: params is None; pass the model's parameters (a Linen module has none of its own).")
  return apply, params


def _flat_params(params):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_str(kp): v for kp, v in leaves}


def _segments(apply, params, inputs, blocks):
  """``[(prefix, Flat, rel params, state_in)]`` for each block (or the whole program when it has none)."""
  from jquant import graph
  try:
    prog = graph.trace(apply, params, *inputs, blocks=blocks)
  except graph.GraphError:
    if blocks is not None:
      raise
    flat = dataflow.trace(apply, params, *inputs)
    leaves = jax.tree_util.tree_leaves(inputs)
    return [("", flat, _flat_params(params), leaves)]
  by_path = dict(zip(prog.param_paths, graph._flat_params(params)))
  state = prog.prefix(params, *inputs)
  out = []
  for seg in prog.block_segments:
    flat = dataflow.segment_flat(prog, seg)
    bp, state_in = prog.block_params(by_path, seg), graph.state_list(seg, state)
    out.append((seg.name, flat, bp, state_in))
    state = graph.updated(seg, state, block_checker(flat, bp, state_in).ref)
  return out


def block_checker(flat: dataflow.Flat, params: Mapping[str, Any], state_in: Sequence,
                  rtol: Optional[float] = None) -> Checker:
  """A `Checker` of a block's program (``flat``) on its inputs ``state_in``; compiled once per ``flat``."""
  cache = flat.__dict__.setdefault("_checker_cache", {})
  names = [flat.params[v] for v in flat.invars[:len(flat.params)]]
  fn = cache.get("fn")
  if fn is None:
    fn = cache["fn"] = lambda p, st: flat.run([p[n] for n in names] + list(st))
  return Checker(fn, params, (list(state_in),), rtol, cache)


def derive(model, params, *inputs, blocks: Optional[str] = None, rtol: Optional[float] = None,
           fallback: bool = True) -> Derived:
  """Every verified fold of a model, found from its program, block by block.

  Args:
    model: A Linen module (with ``params``), an NNX module, an object with
      ``.apply(params, *inputs)``, or a function (see `jquant.graph.as_apply`).
    params: Its float parameters (None for an NNX module: its state).
    *inputs: One calibration batch (the model's positional inputs); folds
      are verified on it.
    blocks: Optional regex naming the blocks (see `jquant.graph.find_blocks`);
      a model with no blocks is checked as a whole.
    rtol: Largest relative change of the outputs (default `default_rtol`).
    fallback: Also try candidates from the parameter tree.

  Returns:
    `Derived` ``(folds, rejected)`` with full parameter paths.

  Example:
    >>> found = jquant.folds.derive(model, params, tokens[:2])
    >>> [f.name for f in found.folds]
    ['layers_0/attn_norm', 'layers_0/attn/v', 'layers_0/mlp_norm', 'layers_0/mlp/up', ...]
  """
  apply, params = _model_pieces(model, params)
  if not inputs:
    raise ValueError("folds.derive: no inputs; pass one calibration batch (the model's positional inputs).")
  folds, rejected = [], []
  for name, flat, bp, state_in in _segments(apply, params, inputs, blocks):
    checker = block_checker(flat, bp, state_in, rtol)
    fs, rj = derive_groups(flat, checker, fallback=fallback)
    folds += [f.under(name) for f in fs]
    rejected += [Rejected(r.fold.under(name), r.change) for r in rj]
  return Derived(tuple(folds), tuple(rejected))


def verify(model, params, inputs: Sequence, folds: Sequence[Fold], *, rtol: Optional[float] = None) -> float:
  """Checks folds on one batch through the whole model; raises `FoldError` naming one that is not exact.

  Args:
    model, params: As for `derive`.
    inputs: The model's positional inputs (a tuple), one calibration batch.
    folds: `Fold` s with full parameter paths.
    rtol: Largest relative change of the outputs (default `default_rtol`).

  Returns:
    The relative change of the outputs with all folds applied at random scales.
  """
  apply, params = _model_pieces(model, params)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(kp) for kp, _ in leaves]

  def fn(p, *x):
    return jax.tree_util.tree_leaves(apply(jax.tree_util.tree_unflatten(treedef, [p[q] for q in paths]), *x))

  checker = Checker(fn, _flat_params(params), tuple(inputs), rtol)
  checker.require(list(folds))
  return checker.change(list(folds))


__all__ = ["Fold", "FoldError", "KINDS", "DEFAULT_RTOL", "Derived", "Rejected", "Checker", "apply_fold", "apply",
           "check_fold", "derive", "derive_groups", "verify", "program_candidates", "tree_candidates",
           "random_scales", "relative_change", "default_rtol", "block_checker"]
