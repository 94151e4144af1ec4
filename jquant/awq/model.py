"""AWQ over any model: block by block through its traced program, groups and folds found, not declared.

`scale_model` takes any model `jquant.graph.as_apply` understands (a Linen
module with its params, an NNX module, jquant's own models, an apply
function) and calibration batches as `jquant.graph.batches` takes them (an
int token array still works). It traces the model once (`jquant.graph`),
cuts it into its blocks and, for each block in order:

1. runs the float block on every batch and takes the mean ``|x|`` per input
   channel of every *group* of matmuls that read one array (q/k/v after one
   norm, gate/up), in float32, with the contracted axes of N-D kernels
   (``DenseGeneral``, ``Einsum``) flattened as `jquant.capture` records them;
2. finds where each group's inverse scale can be folded
   (`jquant.folds`: a norm's ``x * scale`` or ``x * (1 + scale)``, a linear
   layer with its bias, grouped-query ``v -> o`` with tied scales), and
   verifies every fold numerically on the block before it is used; groups
   with no exact fold are not scaled (BERT's post-norm ``q/k/v``, ``down``
   after a GELU);
3. searches the scales ``s = mean|x|^alpha`` of each foldable group whose
   layers a rule quantizes, scoring every candidate by the float32 error of
   what the group feeds, with the group's weights scaled and fake-quantized
   by the rule's spec: a single layer's own output (``o``, ``down``); for
   several layers, the output of the first matmul that all of them reach
   (the attention output projection for q/k/v, ``down`` for gate/up), as
   the reference implementation inspects the attention and MLP modules. Only
   the part of the block between the group's weights and that output is
   re-run per candidate (`jquant.dataflow.Flat.slice`), on values recorded
   once from the float block;
4. folds the scales (exact in float), then searches a clipping range per
   quantization group for every quantized kernel except those whose outputs
   meet in attention scores (queries and keys, detected from the program:
   their outputs reach a product of two activations over their last axis),
   and clamps the kernels.

Alike blocks share every compiled step. Like the reference implementation,
block ``i + 1`` is calibrated on the *float* output of block ``i``
(``propagate="float"``); ``propagate="quantized"`` feeds the scaled, clipped,
quantized block's output instead. Memory stays near one block's activations
for all calibration windows, plus what the scored windows need.

`quantize_model` = `scale_model` + `jquant.quantize_params` along the
contraction axes read from the model. AWQ then GPTQ: give
``scale_model(...).params`` to `jquant.gptq.quantize_model`.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jquant
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     h = nn.Dense(64, name="up")(nn.RMSNorm(name="norm")(x))
    ...     return x + nn.Dense(32, name="down")(jax.nn.silu(h))
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for i in range(2):
    ...       x = Block(name=f"layers_{i}")(x)
    ...     return x
    >>> x = jax.random.normal(jax.random.key(0), (8, 16, 32))
    >>> params = Net().init(jax.random.key(1), x)["params"]
    >>> rules = [jquant.Rule(r"layers_\\d+/\\w+/kernel", jquant.QuantSpec(bits=4, granularity="group", group_size=16))]
    >>> qparams = jquant.awq.quantize_model(Net(), params, x, rules, progress=False)
    >>> y = jax.jit(jquant.quantized(Net().apply))({"params": qparams}, x)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jquant import dataflow, folds as folds_lib, graph, intercept
from jquant.awq import core
from jquant.qarray import dequantize, from_matrix, quantize, to_matrix
from jquant.spec import QuantSpec, Rule, first_match
from jquant.tree import quantize_params
from jquant.tokens import check_calibration_tokens
from jquant.utils import check_finite, path_str

PROPAGATE = ("float", "quantized")


@dataclasses.dataclass(frozen=True)
class AWQConfig:
  """Knobs of the AWQ model pass.

  Attributes:
    n_grid: Exponents ``alpha`` searched per variant (``i / n_grid``).
    variant: ``"act"`` (``s = mean|x|^alpha``), ``"act_over_weight"``
      (``/ w_mean^(1-alpha)``) or ``"both"`` (twice the candidates).
    clip: Search a clipping range per quantization group (not for layers
      whose outputs meet in attention scores).
    clip_grid: Shrink steps of the clipping search per unit of range.
    max_shrink: Largest fraction of the range the clipping search cuts.
    clip_tokens: Calibration tokens the clipping search is scored on.
    skip_positions: Leave the first positions (axis 1 of ``(B, T, ...)``
      activations) of every window out of the statistics, the scores and the
      clipping tokens (attention sinks).
    score_windows: Examples the scale search is scored on (None: all); the
      statistics always use every example.
    batch_size: Examples per forward when the calibration data is one array.
    propagate: ``"float"``: block i+1 sees the float block i's output (the
      reference's convention); ``"quantized"``: the quantized block's.
    tied_folds: Also scale groups whose fold ties scales over copies
      (``v -> o`` under grouped-query attention). The reference skips them.
    rtol: Largest relative change of a block's float outputs a fold may
      cause when verified (None: `jquant.folds.default_rtol`).
  """

  n_grid: int = 20
  variant: str = "act"
  clip: bool = True
  clip_grid: int = 20
  max_shrink: float = 0.5
  clip_tokens: int = 512
  skip_positions: int = 0
  score_windows: Optional[int] = None
  batch_size: int = 8
  propagate: str = "float"
  tied_folds: bool = False
  rtol: Optional[float] = None

  def __post_init__(self):
    if self.variant not in core.VARIANTS:
      raise ValueError(f"AWQConfig: variant={self.variant!r}; allowed: {core.VARIANTS}.")
    if self.propagate not in PROPAGATE:
      raise ValueError(f"AWQConfig: propagate={self.propagate!r}; allowed: {PROPAGATE}.")
    for name in ("n_grid", "clip_grid", "clip_tokens", "batch_size"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"AWQConfig: {name}={v!r}; allowed: a positive int.")
    if isinstance(self.skip_positions, bool) or not isinstance(self.skip_positions, int) or self.skip_positions < 0:
      raise ValueError(f"AWQConfig: skip_positions={self.skip_positions!r}; allowed: an int >= 0.")
    if self.score_windows is not None and (not isinstance(self.score_windows, int) or self.score_windows < 1):
      raise ValueError(f"AWQConfig: score_windows={self.score_windows!r}; allowed: None or a positive int.")
    if not 0.0 <= self.max_shrink < 1.0:
      raise ValueError(f"AWQConfig: max_shrink={self.max_shrink!r}; allowed: a float in [0, 1).")
    if self.rtol is not None and not self.rtol > 0:
      raise ValueError(f"AWQConfig: rtol={self.rtol!r}; allowed: None or a positive float.")


class GroupReport(NamedTuple):
  """What the scale search chose for one group of one block.

  Attributes:
    block: The block (``layers_3``).
    group: The fold's name inside the block (``attn_norm``, ``mlp/up``).
    layers: The kernels scaled (paths inside the block).
    alpha: The chosen exponent.
    weighted: Whether the chosen candidate divides by the weight term.
    error: The chosen candidate's error.
    rtn_error: The same with plain round-to-nearest weights (alpha 0; NaN
      for ``variant="act_over_weight"``).
  """

  block: str
  group: str
  layers: tuple
  alpha: float
  weighted: bool
  error: float
  rtn_error: float


class ScaledModel(NamedTuple):
  """Result of `scale_model`.

  Attributes:
    params: Float parameters, scaled, folded and clipped: ready for RTN
      (`jquant.quantize_params`) or GPTQ. Same tree structure as the input.
    scales: ``{fold name ("layers_3/attn_norm"): (K,) scales}``.
    reports: One `GroupReport` per searched group.
    seconds: Wall time of the pass.
    folds: The `jquant.folds.Fold` s applied (full paths).
    rejected: Candidate folds refused by the numerical check
      (`jquant.folds.Rejected`, full paths).
    axes: ``{kernel path: contraction axes}`` of every matmul of the model.
  """

  params: Any
  scales: dict
  reports: list
  seconds: float
  folds: tuple = ()
  rejected: tuple = ()
  axes: dict = {}


# ---------------------------------------------------------------------------
# What a block's program needs, computed once per structure (alike blocks share it).


class _Group(NamedTuple):
  sites: tuple        # site indices in the Flat
  targets: tuple      # Vars whose error scores a candidate
  slice: Any          # dataflow.Slice from the consumers' weights to the targets


class _Plan:
  """A block structure: its flat program, groups, scored slices, and the compiled steps."""

  def __init__(self, flat: dataflow.Flat):
    self.flat = flat
    self.n_params = len(flat.params)
    self.names = [flat.params[v] for v in flat.invars[:self.n_params]]
    self.qk = {i for i in range(len(flat.sites)) if flat.feeds_scores(i)}
    self.groups = [self._group(g) for g in flat.groups]
    self.derived: Optional[tuple] = None   # the folds verified on the first block of this structure
    self.key: Any = None
    self.jit: dict = {}

  def _group(self, g) -> _Group:
    flat = self.flat
    sites = [flat.sites[i] for i in g]
    targets: tuple = ()
    if len(sites) > 1:
      reach = [flat.downstream([s.out]) for s in sites]
      common = set.intersection(*reach)
      later = [t for t in flat.sites if t.eqn in common and t.eqn not in {s.eqn for s in sites} and not t.batched]
      if later:
        targets = (min(later, key=lambda t: t.eqn).out,)
    if not targets:
      targets = tuple(s.out for s in sites)
    changed = [flat.invars[flat.param_index[s.param]] for s in sites]
    return _Group(tuple(g), targets, flat.slice(changed, targets))


def _rules_spec(rules, path: str):
  _, spec = first_match(rules, path)
  if spec is not None and not isinstance(spec, QuantSpec):
    raise TypeError(f"jquant.awq: the rule for {path} gives a {type(spec).__name__}; allowed: a jquant.QuantSpec "
                    "or None.")
  return spec


def _full(block: str, rel: str) -> str:
  return rel[1:] if rel.startswith("/") else f"{block}/{rel}"


def _matrix_spec(spec: Optional[QuantSpec]) -> Optional[QuantSpec]:
  return None if spec is None else spec.replace(axis=0)


def _skip(x, skip: int):
  return x[:, skip:] if skip and x.ndim >= 3 else x


def _stat_sum(x, x_dims, skip):
  c = _skip(dataflow.canonical(x, x_dims), skip).astype(jnp.float32)
  return jnp.sum(jnp.abs(c).reshape(-1, c.shape[-1]), axis=0), jnp.float32(c.size // c.shape[-1])


def _target_error(ref, out, skip):
  d = jnp.square(out.astype(jnp.float32) - ref.astype(jnp.float32))
  if skip and d.ndim >= 2:
    d = d[:, skip:]
  return jnp.mean(d)


def _reference_step(plan: _Plan, skip: int, score: bool, clip_sites: tuple, frontier: tuple):
  """Compiled: the float block on one batch -> (outputs, |x| sums, counts[, frontier, clip inputs])."""
  key = ("ref", skip, score, clip_sites, frontier)
  f = plan.jit.get(key)
  if f is not None:
    return f
  flat = plan.flat
  stat_sites = [flat.sites[g.sites[0]] for g in plan.groups]

  def impl(ps, st):
    want = list(flat.outvars) + [s.x for s in stat_sites]
    if score:
      want += list(frontier) + [flat.sites[i].x for i in clip_sites]
    vals = flat.run(list(ps) + list(st), want)
    n = len(flat.outvars)
    outs, xs, rest = vals[:n], vals[n:n + len(stat_sites)], vals[n + len(stat_sites):]
    sums = [_stat_sum(x, s.x_dims, skip) for x, s in zip(xs, stat_sites)]
    if not score:
      return outs, sums
    fr, cx = rest[:len(frontier)], rest[len(frontier):]
    cx = [_skip(dataflow.canonical(x, flat.sites[i].x_dims), skip) for x, i in zip(cx, clip_sites)]
    return outs, sums, fr, cx

  f = plan.jit[key] = jax.jit(impl)
  return f


def _search_step(plan: _Plan, parts: tuple, specs: tuple, shapes: tuple, fold, cfg: AWQConfig):
  """Compiled: the AWQ scale search of one group, on the scored batches.

  ``parts`` gives, per scored batch, the ``(plan, group index)`` of the
  program that batch runs in (batches of several shapes have several).
  """
  key = ("search", tuple((p.key, gi) for p, gi in parts), specs, fold.tie if fold is not None else None, cfg.n_grid,
         cfg.variant, cfg.skip_positions)
  f = plan.jit.get(key)
  if f is not None:
    return f
  main = parts[0][0]
  sites = [main.flat.sites[i] for i in main.groups[parts[0][1]].sites]
  mspecs = [_matrix_spec(s) for s in specs]
  slices = [p.groups[gi].slice for p, gi in parts]
  skip = cfg.skip_positions

  def impl(mats, pvals, frontiers, refs, x_mean):
    x_mean = fold.tie_stat(x_mean, "mean") if fold is not None else x_mean
    w_mean = None
    if cfg.variant != "act":
      parts_w = [core.weight_stats([m], sp) * m.shape[1] for m, sp in zip(mats, mspecs)]
      w_mean = sum(parts_w) / sum(m.shape[1] for m in mats)
      w_mean = fold.tie_stat(w_mean, "mean") if fold is not None else w_mean

    def loss(s):
      changed = [from_matrix(core.scaled_fake_quant(m, s, sp), shape, site.w_axes)
                 for m, sp, shape, site in zip(mats, mspecs, shapes, sites)]
      err = jnp.float32(0.0)
      for sl, pv, fr, ref in zip(slices, pvals, frontiers, refs):
        it = iter(pv)
        env = [next(it) if v in sl.flat.params else x for v, x in zip(sl.frontier, fr)]
        outs = sl.run(changed, env)
        err = err + sum(_target_error(r, o, skip) for r, o in zip(ref, outs)) / len(outs)
      return err / len(slices)

    return core.search_scales(loss, x_mean, w_mean, n_grid=cfg.n_grid, variant=cfg.variant)

  f = plan.jit[key] = jax.jit(impl)
  return f


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink", "n_tokens"))
def _clip(w_mat, xs, s, *, spec, n_grid, max_shrink, n_tokens):
  """Compiled: the clipping search of one (K, N) kernel on its (scaled) inputs, and the clamp."""
  x = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])
  tokens = core.sample_tokens(x / s.astype(x.dtype), n_tokens)
  rng = core.search_clip(w_mat, tokens, spec, n_grid=n_grid, max_shrink=max_shrink)
  return core.apply_clip(w_mat, rng, spec)


def _run_step(plan: _Plan):
  f = plan.jit.get("run")
  if f is None:
    f = plan.jit["run"] = jax.jit(lambda ps, st: plan.flat.run(list(ps) + list(st)))
  return f


# ---------------------------------------------------------------------------
# The pass.


def _config(config, overrides) -> AWQConfig:
  cfg = config or AWQConfig()
  if overrides:
    names = [f.name for f in dataclasses.fields(AWQConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
      raise TypeError(f"jquant.awq: unknown options {unknown}; allowed: {names}.")
    cfg = dataclasses.replace(cfg, **overrides)
  return cfg


def _calibration(calib, cfg: AWQConfig):
  """``(batches, number of scored batches)``: the scored examples first, in batches of their own.

  Batches are not padded: a shorter last batch (or a list of batches of
  several shapes) runs in a program traced for its shape.
  """
  if isinstance(calib, list):
    bs = graph.batches(calib, cfg.batch_size, fn="awq.scale_model")
    if cfg.score_windows is None:
      return bs, len(bs)
    n, k = 0, 0
    for b in bs:
      if n >= cfg.score_windows:
        break
      n += int(np.shape(jax.tree_util.tree_leaves(b)[0])[0]) if np.ndim(jax.tree_util.tree_leaves(b)[0]) else 1
      k += 1
    return bs, k
  leaves = jax.tree_util.tree_leaves(calib)
  if not leaves:
    graph.batches(calib, cfg.batch_size, fn="awq.scale_model")  # raises the empty-data error
  if any(np.ndim(a) == 0 for a in leaves) or len({np.shape(a)[0] for a in leaves}) != 1:
    raise ValueError(f"awq.scale_model: calib must be an array of examples (N, ...), a pytree of such arrays "
                     f"sharing N, or a list of batches; got leaves of shapes {[np.shape(a) for a in leaves]}.")
  n = int(np.shape(leaves[0])[0])
  k = n if cfg.score_windows is None else min(cfg.score_windows, n)
  scored = graph.batches(jax.tree_util.tree_map(lambda a: a[:k], calib), cfg.batch_size, fn="awq.scale_model")
  rest = (graph.batches(jax.tree_util.tree_map(lambda a: a[k:], calib), cfg.batch_size, fn="awq.scale_model")
          if k < n else [])
  return scored + rest, len(scored)


def _check_float(params):
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=intercept.is_quantized)[0]:
    if intercept.is_quantized(leaf):
      from jquant.utils import path_str
      raise TypeError(f"jquant.awq: parameter {path_str(kp)!r} is already quantized ({type(leaf).__name__}); "
                      "AWQ needs the float parameters.")


def _block_folds(plan, block, bp, state0, cfg, given):
  """Verified folds of one block (relative paths) by consumer set; and rejected candidates."""
  checker = folds_lib.block_checker(plan.flat, bp, state0, cfg.rtol)
  flat = plan.flat
  groups = {frozenset(flat.sites[i].param for i in g.sites) for g in plan.groups}
  if given is not None:
    mine = []
    for f in given:
      rel = f.relative_to(block)
      if rel is None:
        continue
      if frozenset(rel.consumers) not in groups:
        raise folds_lib.FoldError(
            f"fold {f.name!r}: consumers {f.consumers} are not one group of matmuls sharing an input in block "
            f"{block!r}; its groups are {[sorted(g) for g in groups]}.")
      if rel.consumer_axes is None:
        rel = dataclasses.replace(rel, consumer_axes=tuple(flat.sites[flat.site_of[c]].w_axes for c in rel.consumers))
      mine.append(rel)
    checker.require(mine, describe=lambda f: f.under(block).name)
    return {frozenset(f.consumers): f for f in mine}, []
  if plan.derived is not None and checker.ok(plan.derived):
    return {frozenset(f.consumers): f for f in plan.derived}, []
  fs, rejected = folds_lib.derive_groups(flat, checker)
  if plan.derived is None:
    plan.derived = tuple(fs)
  return {frozenset(f.consumers): f for f in fs}, list(rejected)


_PLANS: collections.OrderedDict = collections.OrderedDict()
_MAX_PLANS = 16  # block structures whose compiled steps are kept (sweeps and tests rerun the same model)


def _consts_key(consts) -> tuple:
  out = []
  for c in consts:
    a = np.asarray(c)
    out.append((a.shape, str(a.dtype), hashlib.sha1(a.tobytes()).hexdigest()))
  return tuple(out)


def _plan(programs, prog, seg) -> _Plan:
  """The `_Plan` of a block structure, shared by alike blocks, programs and calls (same jaxpr and constants)."""
  ck = programs.__dict__.setdefault("_consts_keys", {})
  if id(prog) not in ck:
    ck[id(prog)] = _consts_key(prog.closed.consts)
  key = (seg.key, ck[id(prog)])
  plan = _PLANS.get(key)
  if plan is None:
    plan = _PLANS[key] = _Plan(dataflow.segment_flat(prog, seg))
    plan.key = key
    while len(_PLANS) > _MAX_PLANS:
      _PLANS.popitem(last=False)
  _PLANS.move_to_end(key)
  return plan


def _stat_plan(plan, groups):
  """Indices of ``groups`` (consumer sets) in ``plan``."""
  index = {frozenset(plan.flat.sites[i].param for i in g.sites): gi for gi, g in enumerate(plan.groups)}
  return [index[g] for g in groups]


def scale_model(model, params, calib, rules: Sequence[Rule], *, blocks: Optional[str] = None,
                folds: Optional[Sequence[folds_lib.Fold]] = None, config: Optional[AWQConfig] = None,
                progress: bool = True, **overrides) -> ScaledModel:
  """Searches AWQ scales and clipping ranges block by block and folds them in.

  Args:
    model: A Linen module, an NNX module, an object with
      ``.apply(params, *inputs)`` (jquant's models) or a function
      ``fn(params, *inputs)`` (see `jquant.graph.as_apply`).
    params: Its float parameters (None: the model's own, e.g. an NNX
      module's state or ``model.params``).
    calib: Calibration data as `jquant.graph.batches` takes it: an array
      (or pytree of arrays) of examples split into ``batch_size`` batches,
      or a list of batches (tuples of positional inputs, any pytree).
    rules: `jquant.Rule` list giving each kernel's `QuantSpec` by its full
      path (``layers_3/mlp/up/kernel``); layers left in float are scored
      unquantized.
    blocks: Optional regex naming the blocks (see `jquant.graph.find_blocks`).
    folds: Optional `jquant.folds.Fold` list (full paths) to use instead of
      the derived ones; each is verified, and one that changes the float
      block raises `jquant.folds.FoldError` naming it.
    config: An `AWQConfig`; keyword ``overrides`` replace its fields
      (``n_grid=10``, ``variant="both"``, ``batch_size=4``, ...).
    progress: Show a tqdm bar over blocks.

  Returns:
    A `ScaledModel`; ``.params`` is a float tree equivalent to ``params`` in
    float arithmetic except for the clipping. Leaves of ``params`` sharded
    over a mesh (`jquant.sharding.shard_params`) come back on the same
    `NamedSharding`; the block steps run SPMD on them, nothing is gathered
    onto one device.

  Raises:
    TypeError: unknown options, quantized parameters, a rule spec that is not
      a `QuantSpec`.
    ValueError: empty calibration data, bad options; parameters holding NaN
      or inf (checked up front, naming every such leaf); activation
      statistics holding NaN or inf (checked per block as soon as they are
      computed, naming the block's layers); token ids outside the model's
      vocabulary (jquant's models); a rule whose pattern matches no
      parameter (naming it and the nearest paths).
    jquant.graph.GraphError: the model's blocks cannot be found or run in order.
    jquant.folds.FoldError: a given fold is not exact.
  """
  cfg = _config(config, overrides)
  from jquant.blockpass import check_rules
  rules = check_rules(rules, "awq.scale_model")
  apply, own = graph.as_apply(model)
  params = own if params is None else params
  if params is None:
    raise ValueError("awq.scale_model: params is None and the model holds none; pass its parameters.")
  _check_float(params)
  from jquant.blockpass import check_rules_match
  check_rules_match(rules, [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=intercept.is_quantized)[0]], "awq.scale_model")
  check_finite(params, "awq.scale_model", "params", "Fix these weights before AWQ.", is_leaf=intercept.is_quantized)
  check_calibration_tokens(model, calib, fn="awq.scale_model")
  check_finite({"calib": calib}, "awq.scale_model", "the calibration inputs",
               "Clean the calibration data; every example must be finite.")
  batches, n_score = _calibration(calib, cfg)
  start = time.perf_counter()
  programs = dataflow.Programs(apply, params, blocks)
  progs = [programs(b) for b in batches]
  treedef = jax.tree_util.tree_structure(params)
  by_path = dict(zip(progs[0].param_paths, graph._flat_params(params)))
  new_by_path = dict(by_path)
  states = [p.prefix(params, *b) for p, b in zip(progs, batches)]
  plan_of = functools.partial(_plan, programs)

  scales, reports, applied, rejected_all, axes_all = {}, [], [], [], {}
  n_blocks = len(progs[0].block_segments)
  for bi in tqdm(range(n_blocks), desc="AWQ", disable=not progress):
    segs = [p.block_segments[bi] for p in progs]
    bplans = [plan_of(p, s) for p, s in zip(progs, segs)]
    block, main = segs[0].name, bplans[0]
    flat = main.flat
    bp = progs[0].block_params(by_path, segs[0])
    st_lists = [graph.state_list(s, st) for s, st in zip(segs, states)]
    for s in flat.sites:
      axes_all[_full(block, s.param)] = s.w_axes
    if cfg.skip_positions:
      for s in flat.sites:
        if len(s.x.aval.shape) - len(s.x_dims) < 2:
          raise ValueError(f"awq.scale_model: skip_positions={cfg.skip_positions} needs activations shaped "
                           f"(B, T, ...), but {_full(block, s.param)} reads {s.x.aval.shape}.")
    specs = {s.param: (None if s.param.startswith("/") else _rules_spec(rules, _full(block, s.param)))
             for s in flat.sites}
    fold_of, rejected = _block_folds(main, block, bp, st_lists[0], cfg, folds)
    rejected_all += [folds_lib.Rejected(r.fold.under(block), r.change) for r in rejected]
    groups = [frozenset(flat.sites[i].param for i in g.sites) for g in main.groups]
    searched = [gi for gi, g in enumerate(groups) if g in fold_of
                and (cfg.tied_folds or fold_of[g].tie is None)
                and any(specs[flat.sites[i].param] is not None for i in main.groups[gi].sites)]
    clip_params = tuple(s.param for i, s in enumerate(flat.sites)
                        if cfg.clip and specs[s.param] is not None and i not in main.qk and not s.batched
                        and _matrix_spec(specs[s.param]).granularity != "tensor")

    # 1. Float block on every batch: statistics, outputs, and what the scored batches need.
    sums = [None] * len(groups)
    counts = [0.0] * len(groups)
    outs_all, rec = [], []
    for b, (pl, st) in enumerate(zip(bplans, st_lists)):
      order = _stat_plan(pl, groups)
      ps = [bp[n] for n in pl.names]
      if b < n_score:
        gis = _stat_plan(pl, [groups[gi] for gi in searched])
        frontier = tuple(dict.fromkeys(v for gi in gis for v in pl.groups[gi].slice.frontier
                                       if v not in pl.flat.params))
        frontier += tuple(dict.fromkeys(t for gi in gis for t in pl.groups[gi].targets if t not in frontier))
        csites = tuple(pl.flat.site_of[p] for p in clip_params)
        outs, ss, fr, cx = _reference_step(pl, cfg.skip_positions, True, csites, frontier)(ps, st)
        rec.append((pl, dict(zip(frontier, fr)), dict(zip(clip_params, cx))))
      else:
        outs, ss = _reference_step(pl, cfg.skip_positions, False, (), ())(ps, st)
      outs_all.append(outs)
      for gi, j in enumerate(order):
        sm, cnt = ss[j]
        sums[gi] = sm if sums[gi] is None else sums[gi] + sm
        counts[gi] += cnt
    x_means = [sm / jnp.maximum(c, 1.0) for sm, c in zip(sums, counts)]
    # Checked here, naming the layers: a NaN statistic would otherwise surface later as another error.
    check_finite({"+".join(_full(block, flat.sites[i].param) for i in main.groups[gi].sites): x_means[gi]
                  for gi in range(len(groups))}, "awq.scale_model",
                 f"the activation statistics (mean |x|) of block {block!r}",
                 "The calibration activations entering these layers are NaN/inf: check the calibration data, the "
                 "earlier blocks' outputs and float16/bfloat16 overflow.")

    # 2. Scale search per foldable, quantized group (on the float block), then all folds.
    new_bp = dict(bp)
    group_s = {}
    for gi in searched:
      g, fold = main.groups[gi], fold_of[groups[gi]]
      sites = [flat.sites[i] for i in g.sites]
      gspecs = tuple(specs[s.param] for s in sites)
      shapes = tuple(tuple(np.shape(bp[s.param])) for s in sites)
      mats = [to_matrix(bp[s.param], s.w_axes) for s in sites]
      parts, pvals, fronts, refs = [], [], [], []
      for pl, fr, _ in rec:
        pg = pl.groups[_stat_plan(pl, [groups[gi]])[0]]
        parts.append((pl, _stat_plan(pl, [groups[gi]])[0]))
        pvals.append([bp[pl.flat.params[v]] for v in pg.slice.frontier if v in pl.flat.params])
        fronts.append([fr.get(v) for v in pg.slice.frontier])
        refs.append([fr[t] for t in pg.targets])
      res = _search_step(main, tuple(parts), gspecs, shapes, fold, cfg)(mats, pvals, fronts, refs, x_means[gi])
      core.check_all_inf(res.errors, "awq.scale_model", f" for group {fold.under(block).name!r} "
                         f"({', '.join(_full(block, s.param) for s in sites)})")
      group_s[gi] = res.scales
      scales[fold.under(block).name] = res.scales
      rtn = float(res.errors[0]) if cfg.variant != "act_over_weight" else float("nan")
      reports.append(GroupReport(block, fold.name, tuple(s.param for s in sites), float(res.alpha),
                                 bool(res.weighted), float(res.errors[res.index]), rtn))
    for gi, s in group_s.items():
      fold = fold_of[groups[gi]]
      new_bp = folds_lib.apply_fold(new_bp, fold, s)
      applied.append(fold.under(block))

    # 3. Clipping on the scaled kernels, scored on the scored batches' (scaled) inputs.
    s_of = {p: group_s[gi] for gi in group_s for p in groups[gi]}
    for path in clip_params:
      s = flat.sites[flat.site_of[path]]
      w = new_bp[path]
      k = int(np.prod([np.shape(w)[a] for a in s.w_axes]))
      sc = s_of.get(path, jnp.ones((k,), jnp.float32))
      spec = _matrix_spec(specs[path])
      m = _clip(to_matrix(w, s.w_axes), [cx[path] for _, _, cx in rec], sc, spec=spec, n_grid=cfg.clip_grid,
                max_shrink=cfg.max_shrink, n_tokens=cfg.clip_tokens)
      new_bp[path] = from_matrix(m, np.shape(w), s.w_axes).astype(w.dtype)

    for rel, v in new_bp.items():
      if not rel.startswith("/"):
        new_by_path[_full(block, rel)] = v

    # 4. The next block's inputs.
    if cfg.propagate == "quantized":
      qbp = dict(new_bp)
      for s in flat.sites:
        spec = specs[s.param]
        if spec is not None:
          w = new_bp[s.param]
          q = dequantize(quantize(to_matrix(w, s.w_axes), _matrix_spec(spec)))
          qbp[s.param] = from_matrix(q, np.shape(w), s.w_axes).astype(w.dtype)
      outs_all = [_run_step(pl)([qbp[n] for n in pl.names], st) for pl, st in zip(bplans, st_lists)]
    states = [graph.updated(s, st, o) for s, st, o in zip(segs, states, outs_all)]
  jax.block_until_ready(states[-1])
  out = jax.tree_util.tree_unflatten(treedef, [new_by_path[p] for p in progs[0].param_paths])
  out = jax.tree_util.tree_map(_laid_out_like, out, params)  # sharded params: each leaf back on its sharding
  return ScaledModel(out, scales, reports, time.perf_counter() - start, tuple(applied), tuple(rejected_all),
                     axes_all)


def _laid_out_like(new, old):
  """``new`` on ``old``'s `NamedSharding` (folds and clips run eagerly and may move a sharded leaf)."""
  s = getattr(old, "sharding", None)
  return jax.device_put(new, s) if isinstance(s, jax.sharding.NamedSharding) else new


def quantize_model(model, params, calib, rules: Sequence[Rule], *, blocks: Optional[str] = None,
                   folds: Optional[Sequence[folds_lib.Fold]] = None, config: Optional[AWQConfig] = None,
                   progress: bool = True, return_scaled_float: bool = False, **overrides):
  """AWQ: `scale_model`, then round-to-nearest with ``rules`` (`jquant.quantize_params`).

  Kernels are quantized along the contraction axes read from the model's own
  matmuls (so one rule fits ``DenseGeneral``/``Einsum`` kernels too).

  Args:
    model, params, calib, rules, blocks, folds, config, progress, overrides:
      See `scale_model` (e.g. ``n_grid=20``, ``variant="both"``,
      ``clip=False``).
    return_scaled_float: Also return the `ScaledModel` (its float ``params``
      feed GPTQ for AWQ+GPTQ).

  Returns:
    The quantized parameter tree (`jquant.QArray` leaves where ``rules``
    select; run it with ``jquant.quantized(apply)``), or ``(qparams, scaled)``
    with ``return_scaled_float=True``.

  Example:
    >>> qparams = jquant.awq.quantize_model(model, params, calib, rules, n_grid=20)
  """
  scaled = scale_model(model, params, calib, rules, blocks=blocks, folds=folds, config=config,
                       progress=progress, **overrides)
  apply, own = graph.as_apply(model)
  from jquant import capture
  first = graph.batches(calib, _config(config, overrides).batch_size, fn="awq.quantize_model")[0]
  axes = dict(capture.contraction_axes(apply, scaled.params, *first))
  axes.update(scaled.axes)
  qparams = quantize_params(scaled.params, rules, axes=axes)
  return (qparams, scaled) if return_scaled_float else qparams


__all__ = ["AWQConfig", "GroupReport", "ScaledModel", "scale_model", "quantize_model", "PROPAGATE"]
