"""Measuring the damage of each candidate spec on each weight: `hessians`, `measure`, `Sensitivity`.

The damage of quantizing weight ``W`` (viewed as ``(K, N)``, K the
contraction) to ``Q`` is its layer loss under the calibration Hessian
``H = 2/N sum_t x_t x_t^T`` of its inputs (GPTQ, Frantar et al. 2022, eq. 1)::

    damage(W, Q) = sum_j (W - Q)[:, j]^T H (W - Q)[:, j] / 2 = mean_t ||x_t (W - Q)||^2

It is additive over weights (each is quantized alone against the float
model's own inputs), so the budgeted choice of one spec per weight
(`jquant.mixed.allocate`) optimises exactly the sum of these numbers. ``Q`` is
round-to-nearest on the candidate's grid, and a candidate's size is the
`QArray` 's ``nbytes``: what `jquant.footprint` counts for that leaf, scales
and mins included.

Example:
    >>> import jquant
    >>> m = jquant.models.from_gguf()
    >>> calib = jquant.data.calibration_windows(m.tokenizer, 16)
    >>> hs = jquant.mixed.hessians(m, calib, batch_size=2)           # {path: H (K, K) float32}
    >>> sens = jquant.mixed.measure(m.params, hs, jquant.mixed.gguf_candidates())
    >>> print(sens.table(5))
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jquant import capture as capture_mod
from jquant import graph
from jquant.qarray import QArray, dequantize, quantize, to_matrix
from jquant.spec import QuantSpec
from jquant.utils import check_finite, path_str

_HI = jax.lax.Precision.HIGHEST

# A candidate: a fixed QuantSpec (its axis is replaced by each weight's contraction axes), or a function
# ``(path, shape, k) -> QuantSpec | None`` (None: the candidate does not apply to that weight).
Candidate = Union[QuantSpec, Callable[[str, tuple, int], Optional[QuantSpec]]]


def gguf_candidates(types_=("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"),
                    **solver) -> dict:
  """GGML block types as candidates: each applies to the weights whose rows its blocks divide.

  A k-quant (256-value blocks) does not apply to SmolLM2's 576-input weights:
  there the allocator chooses among the legacy 32-value types itself instead
  of getting llama.cpp's fallback. The chosen specs export as those types
  (`jquant.gguf.export`).

  Args:
    types_: GGML quantized type names (`jquant.gguf.QUANT_TYPES`).
    **solver: Spec settings that keep the grid (``clip="mse"``, ...).

  Returns:
    ``{type: candidate}`` for `measure`.

  Raises:
    ValueError: an unknown or float type.
  """
  from jquant.gguf import types as gt

  out = {}
  for t in types_:
    name = gt.check_type(t, "gguf_candidates")
    if name in gt.FLOAT_TYPES:
      raise ValueError(f"gguf_candidates: {name} is a float type; allowed: {', '.join(gt.QUANT_TYPES)}.")
    block = gt.BLOCK[name][0]

    def cand(path, shape, k, name=name, block=block):
      return gt.spec_for(name, **solver) if k % block == 0 else None

    out[name] = cand
  return out


def hessians(model, calib, *, params=None, batch_size: int = 8, include: str = r".*",
             progress: bool = True) -> dict:
  """``{path: H}``: ``H = 2/N sum x x^T`` (float32, ``(K, K)``) of the inputs of every matmul weight.

  The float model runs on the calibration batches once (`jquant.capture`,
  jitted); weights fed by the same activation (q/k/v, gate/up) share one
  array. A tied embedding used as the output head gets the Hessian of the
  head's input.

  Args:
    model: Anything `jquant.graph.as_apply` takes (jquant's ``Model``, a Linen
      or NNX module, a function ``f(params, *inputs)``).
    calib: Calibration inputs (`jquant.graph.batches`): an array of examples
      ``(N, ...)`` split into batches of ``batch_size``, or a list of batches.
    params: The float parameters (default: the model's own).
    batch_size: Examples per compiled step.
    include: Regex on paths; other weights get no Hessian.
    progress: A tqdm bar over batches.

  Returns:
    ``{path: H}`` with paths as `jquant.quantize_params` sees them.

  Raises:
    ValueError: no parameters, or non-finite activations (naming the weights).
  """
  apply, own = graph.as_apply(model)
  params = own if params is None else params
  if params is None:
    raise ValueError("hessians: params=None and the model holds none; pass params= (the float parameter tree).")
  bs = graph.batches(calib, batch_size, fn="hessians")
  pattern = re.compile(include)

  def step(p, acc, *xs):
    c = capture_mod.capture(apply, p, *xs)
    new = dict(acc)
    for g in c.groups:
      g = [q for q in g if pattern.search(q)]
      if not g:
        continue
      x = c.inputs[g[0]].astype(jnp.float32)
      x = x.reshape(-1, x.shape[-1])
      new[g[0]] = (acc[g[0]][0] + jnp.matmul(x.T, x, precision=_HI), acc[g[0]][1] + x.shape[0])
    return new

  shapes = jax.eval_shape(lambda p, *xs: capture_mod.capture(apply, p, *xs), params, *bs[0])
  leaders = {}
  for g in shapes.groups:
    g = [q for q in g if pattern.search(q)]
    if g:
      leaders[g[0]] = g
  if not leaders:
    raise ValueError(f"hessians: include={include!r} matches no matmul weight; weights found: "
                     f"{list(shapes.inputs)[:6]}.")
  acc = {k: (jnp.zeros((shapes.inputs[k].shape[-1],) * 2, jnp.float32), jnp.zeros((), jnp.float32))
         for k in leaders}
  jstep = jax.jit(step)
  it = bs
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(bs, desc="Hessians", unit="batch")
  for b in it:
    acc = jstep(params, acc, *b)
  out = {}
  for k, g in leaders.items():
    h = acc[k][0] * (2.0 / jnp.maximum(acc[k][1], 1.0))
    for q in g:
      out[q] = h
  check_finite({k: out[k] for k in leaders}, "hessians", "calibration Hessians",
               "Check the model's float outputs on the calibration data.")
  return out


def fisher(loss_fn: Callable, params, calib, *, batch_size: int = 1, include: str = r".*",
           progress: bool = True) -> dict:
  """``{path: F}``: the empirical diagonal Fisher, the mean over batches of the squared gradient of the loss.

  ``F`` has the weight's shape; `measure` with ``fisher=`` then scores a
  candidate by ``sum F * (W - Q)^2 / 2``, the second-order change of the
  model's own loss (as SqueezeLLM, Kim et al. 2023), comparable across
  weights of different layers, unlike the layer loss.

  Args:
    loss_fn: ``loss_fn(params, *inputs) -> scalar`` (e.g. the mean next-token NLL).
    params: The float parameters.
    calib: Calibration inputs (`jquant.graph.batches`).
    batch_size: Examples per gradient (1: per-example squared gradients).
    include: Regex on paths; float leaves of rank >= 2 that match are returned.
    progress: A tqdm bar over batches.

  Raises:
    ValueError: non-finite gradients (naming the leaves).
  """
  bs = graph.batches(calib, batch_size, fn="fisher")
  grad = jax.jit(jax.grad(loss_fn))
  sq = jax.jit(lambda acc, g: jax.tree_util.tree_map(lambda a, b: a + jnp.square(b.astype(jnp.float32)), acc, g))
  acc = jax.tree_util.tree_map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), params)
  it = bs
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(bs, desc="Fisher", unit="batch")
  for b in it:
    acc = sq(acc, grad(params, *b))
  pattern = re.compile(include)
  out = {path_str(k): v / len(bs) for k, v in jax.tree_util.tree_flatten_with_path(acc)[0]
         if v.ndim >= 2 and pattern.search(path_str(k))}
  check_finite(out, "fisher", "squared gradients", "Check the loss on the calibration data.")
  return out


class Sensitivity(NamedTuple):
  """The damage and exact size of each candidate on each weight.

  Attributes:
    paths: Weight paths, ``T`` of them (tree order).
    names: Candidate names, ``C`` of them.
    damage: float64 ``(T, C)``: layer loss under H (see the module); inf where
      the candidate does not apply.
    nbytes: int64 ``(T, C)``: the quantized leaf's bytes (`jquant.footprint`);
      -1 where the candidate does not apply.
    numel: int64 ``(T,)``: elements per weight.
    specs: ``T`` tuples of ``C`` `QuantSpec` (axis set to the weight's
      contraction) or None where not applicable.
  """

  paths: tuple
  names: tuple
  damage: np.ndarray
  nbytes: np.ndarray
  numel: np.ndarray
  specs: tuple

  def applicable(self) -> np.ndarray:
    """bool ``(T, C)``: where a candidate applies."""
    return self.nbytes >= 0

  def table(self, max_rows: int = 40) -> str:
    """Damage per weight and candidate (``-`` where a candidate does not apply)."""
    w = max(8, *(len(n) for n in self.names))
    head = f"{'path':<36} " + " ".join(f"{n:>{w}}" for n in self.names)
    lines = [head, "-" * len(head)]
    for i, p in enumerate(self.paths[:max_rows]):
      cells = [f"{self.damage[i, j]:>{w}.3g}" if self.nbytes[i, j] >= 0 else f"{'-':>{w}}"
               for j in range(len(self.names))]
      lines.append(f"{p[-36:]:<36} " + " ".join(cells))
    if len(self.paths) > max_rows:
      lines.append(f"... {len(self.paths) - max_rows} more weights")
    return "\n".join(lines)

  def __str__(self):
    return self.table()

  def to_json(self) -> str:
    """A JSON string that `Sensitivity.from_json` reads back exactly (float64 damages as repr)."""
    specs = [[None if s is None else dict(_spec_dict(s)) for s in row] for row in self.specs]
    return json.dumps({"paths": list(self.paths), "names": list(self.names),
                       "damage": [[repr(float(v)) for v in row] for row in self.damage],
                       "nbytes": self.nbytes.tolist(), "numel": self.numel.tolist(), "specs": specs})

  @classmethod
  def from_json(cls, text: str) -> "Sensitivity":
    d = json.loads(text)
    specs = tuple(tuple(None if s is None else QuantSpec(**s) for s in row) for row in d["specs"])
    return cls(tuple(d["paths"]), tuple(d["names"]), np.array([[float(v) for v in r] for r in d["damage"]],
                                                                 np.float64).reshape(len(d["paths"]), -1),
               np.asarray(d["nbytes"], np.int64).reshape(len(d["paths"]), -1), np.asarray(d["numel"], np.int64),
               specs)


def _spec_dict(s: QuantSpec):
  import dataclasses
  d = dataclasses.asdict(s)
  d["axis"] = list(d["axis"]) if isinstance(d["axis"], tuple) else d["axis"]
  return d


@jax.jit
def _layer_loss(w2, q2, h):
  e = w2.astype(jnp.float32) - q2.astype(jnp.float32)
  return 0.5 * jnp.sum(e * jnp.matmul(h, e, precision=_HI))


def layer_loss(w, q: QArray, h, k_axes) -> float:
  """``sum_j (w - q)_j^T H (w - q)_j / 2`` of a weight and its quantized `QArray` along ``k_axes``."""
  return float(_layer_loss(to_matrix(w, k_axes), to_matrix(dequantize(q, jnp.float32), k_axes), h))


@functools.partial(jax.jit, static_argnames=("spec", "k_axes"))
def _rtn(w, h, spec, k_axes):
  """(QArray, layer loss) of RTN onto ``spec``: one compiled program per shape and spec."""
  q = quantize(w, spec)
  return q, _layer_loss(to_matrix(w, k_axes), to_matrix(dequantize(q, jnp.float32), k_axes), h)


@functools.partial(jax.jit, static_argnames=("spec",))
def _rtn_fisher(w, f, spec):
  """(QArray, sum F (w - q)^2 / 2) of RTN onto ``spec``."""
  q = quantize(w, spec)
  return q, 0.5 * jnp.sum(f * jnp.square(w.astype(jnp.float32) - dequantize(q, jnp.float32)))


def measure(params, hessians_: Optional[Mapping[str, Any]], candidates: Mapping[str, Candidate], *,
            fisher: Optional[Mapping[str, Any]] = None, axes: Optional[Mapping[str, Any]] = None,
            progress: bool = True) -> Sensitivity:
  """Quantizes every weight with a Hessian to every candidate (RTN) and records damage and bytes.

  Args:
    params: The float parameter tree.
    hessians_: ``{path: H (K, K)}`` (`hessians`); exactly these weights are
      measured, damage = layer loss under H. May be None when ``fisher`` is given.
    fisher: Optional ``{path: F}`` (`fisher`, weight-shaped): these weights
      are measured instead, damage ``= sum F (W - Q)^2 / 2``; needs ``axes``
      (or Hessians) for the contraction.
    candidates: ``{name: QuantSpec or fn(path, shape, k) -> QuantSpec | None}``
      (`gguf_candidates` for GGML types). A spec's axis is replaced by the
      weight's contraction axes.
    axes: ``{path: contraction axes}`` (default: read from each Hessian's
      size: axis 0 of a kernel whose first dimension is K, else the last).
    progress: A tqdm bar over weights.

  Returns:
    A `Sensitivity`.

  Raises:
    ValueError: empty candidates or Hessians, a Hessian with no weight or the
      wrong size, non-finite weights, or a weight no candidate applies to.
  """
  if not isinstance(candidates, Mapping):
    raise TypeError(f"measure: candidates is a {type(candidates).__name__}; allowed: a mapping {{name: QuantSpec or "
                    "function}}, e.g. {'int4 g32': QuantSpec(bits=4, granularity='group', group_size=32)} or "
                    "jquant.mixed.gguf_candidates(); the names label the allocation's choices.")
  if not candidates:
    raise ValueError("measure: candidates is empty; allowed: {name: QuantSpec or function}, e.g. "
                     "jquant.mixed.gguf_candidates().")
  if fisher is not None:
    check_finite(dict(fisher), "measure", "fisher", "Compute it with jquant.mixed.fisher on finite data.")
    negative = [p for p, f in fisher.items() if float(jnp.min(jnp.asarray(f))) < 0]
    if negative:
      raise ValueError(f"measure: fisher holds negative values at {negative[:4]}; a diagonal Fisher is a mean of "
                       "squared gradients (>= 0): compute it with jquant.mixed.fisher.")
  stats = fisher if fisher is not None else hessians_
  if not stats:
    raise ValueError("measure: no weights to measure (hessians_ and fisher empty or None); compute Hessians "
                     "with jquant.mixed.hessians(model, calib) or a Fisher with jquant.mixed.fisher.")
  leaves = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, QArray))[0]}
  missing = [p for p in stats if p not in leaves]
  if missing:
    raise ValueError(f"measure: Hessians for paths {missing[:4]} that params does not have; params paths look "
                     f"like {list(leaves)[:4]}.")
  paths = [p for p in leaves if p in stats]
  names = tuple(candidates)
  check_finite({p: leaves[p] for p in paths}, "measure", "weights")
  T, C = len(paths), len(names)
  damage = np.full((T, C), np.inf)
  nbytes = np.full((T, C), -1, np.int64)
  specs = []
  it = list(enumerate(paths))
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(it, desc="sensitivity", unit="weight")
  for i, p in it:
    w, h = leaves[p], jnp.asarray(stats[p], jnp.float32)
    if isinstance(w, QArray) or not jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating):
      raise ValueError(f"measure: {p!r} is not a float weight; pass the float parameter tree.")
    if fisher is not None and h.shape != tuple(w.shape):
      raise ValueError(f"measure: fisher[{p!r}] has shape {tuple(h.shape)}, the weight {tuple(w.shape)}; allowed: "
                       "the weight's shape (jquant.mixed.fisher).")
    if fisher is not None and (axes is None or p.removeprefix("params/") not in
                               {str(a).removeprefix("params/") for a in axes}):
      hk = None if hessians_ is None or p not in hessians_ else int(jnp.shape(hessians_[p])[0])
      if hk is None:
        raise ValueError(f"measure: with fisher=, {p!r} needs its contraction axes: pass axes= "
                         "(jquant.capture.contraction_axes) or its Hessian.")
      k_axes = _k_axes(p, w.shape, hk, None)
    else:
      k_axes = _k_axes(p, w.shape, h.shape[0] if fisher is None else 0, axes)
    k = int(np.prod([w.shape[a] for a in k_axes]))
    row = []
    for j, n in enumerate(names):
      c = candidates[n]
      spec = c(p, tuple(w.shape), k) if callable(c) else c
      if spec is not None:
        if not isinstance(spec, QuantSpec):
          raise TypeError(f"measure: candidate {n!r} gave {type(spec).__name__} for {p!r}; allowed: a QuantSpec "
                          "or None.")
        spec = spec.replace(axis=k_axes if len(k_axes) > 1 else k_axes[0])
        try:
          q, loss = _rtn(w, h, spec, k_axes) if fisher is None else _rtn_fisher(w, h, spec)
        except ValueError:
          spec = None  # the grid does not fit this weight (e.g. a group size that does not divide K)
        else:
          damage[i, j] = float(loss)
          nbytes[i, j] = q.nbytes
      row.append(spec)
    if not np.any(nbytes[i] >= 0):
      raise ValueError(f"measure: no candidate of {list(names)} applies to {p!r} (shape {tuple(w.shape)}, "
                       f"{k} inputs); add one whose groups divide {k}.")
    specs.append(tuple(row))
  numel = np.array([int(np.prod(leaves[p].shape)) for p in paths], np.int64)
  return Sensitivity(tuple(paths), names, damage, nbytes, numel, tuple(specs))


def _k_axes(path, shape, k, axes):
  if axes is not None:
    a = dict((str(key).removeprefix("params/"), v) for key, v in axes.items()).get(path.removeprefix("params/"))
    if a is not None:
      return tuple(sorted(int(x) % len(shape) for x in a))
  if shape[0] == k:
    return (0,)
  if shape[-1] == k:
    return (len(shape) - 1,)
  raise ValueError(f"measure: the Hessian of {path!r} is {k} x {k} but the weight's shape {tuple(shape)} has no "
                   "axis of that size at either end; pass axes= (jquant.capture.contraction_axes).")


__all__ = ["hessians", "fisher", "measure", "layer_loss", "gguf_candidates", "Sensitivity", "Candidate"]
