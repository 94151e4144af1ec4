"""Dataflow of a traced program: nested calls inlined, matmul sites, producers, slices.

Folds (`jquant.folds`) and AWQ's scale search (`jquant.awq`) reason about a
model's program, not its class: which operation produces a matmul's input
(a norm's ``x * scale``, a linear layer's output, ...), whose outputs meet in
attention scores, and what part of a block has to be re-run when a group of
weights changes. `Flat` is one piece of a program (a `jquant.graph` block
segment, or a whole function) as a flat list of equations: calls that only
group code (``jit``, ``custom_jvp``/``custom_vjp`` calls, ``remat``) are
inlined, so ``jnp.einsum``, ``jax.nn.silu`` and Flax's layers read as the
primitives they run; loops and conditionals stay single equations.

A *site* is a ``dot_general`` against a parameter, found as
`jquant.intercept` finds it: the weight operand is a parameter seen through
float casts and transposes. Sites reading the very same array over the same
axes form a *group* (q/k/v after one norm, gate/up), as in `jquant.capture`.

`Flat.slice(changed, targets)` is the part of the program between some
parameters and some values: the equations that depend on the parameters and
that the targets depend on, and its *frontier* (the values it reads from the
rest of the program). Evaluating a slice on frontier values recorded once is
how a search re-runs only what a candidate changes.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from jquant import dataflow
    >>> m = nn.Sequential([nn.LayerNorm(), nn.Dense(8)])
    >>> x = jnp.ones((2, 4))
    >>> p = m.init(jax.random.key(0), x)["params"]
    >>> flat = dataflow.trace(lambda p, x: m.apply({"params": p}, x), p, x)
    >>> [s.param for s in flat.sites]
    ['layers_1/kernel']
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from jquant.utils import path_str

# Calls whose body is inlined: they only group code (their own rules matter for differentiation, not here).
_INLINE = ("pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_jvp_call",
           "custom_vjp_call", "custom_vjp_call_jaxpr")
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# Ops through which a parameter stays "the weight" (as in jquant.intercept's views).
_VIEW_OPS = ("convert_element_type", "transpose", "copy", "copy_p")
# Ops through which a parameter stays "that parameter" for a bias or norm scale.
_DERIVED_OPS = ("convert_element_type", "reshape", "broadcast_in_dim", "expand_dims", "squeeze", "copy",
                "copy_p")
# Ops between a matmul's output and its bias add that keep the output channels (`Flat.linear_bias`'s default).
_BIAS_PATH_OPS = ("reshape", "convert_element_type", "copy")


class Var:
  """A value of a `Flat` program (its shape and dtype in ``aval``)."""

  __slots__ = ("aval", "n")
  _count = itertools.count()

  def __init__(self, aval):
    self.aval = aval
    self.n = next(Var._count)

  def __repr__(self):
    return f"Var{self.n}:{self.aval.str_short() if hasattr(self.aval, 'str_short') else self.aval}"


class Eqn(NamedTuple):
  """One equation: the original JAX equation (primitive, params, context) on `Var` / literal atoms."""

  src: Any
  ins: tuple
  outs: tuple

  @property
  def name(self) -> str:
    return self.src.primitive.name


class Site(NamedTuple):
  """A matmul against a parameter.

  Attributes:
    eqn: Index of its ``dot_general`` in `Flat.eqns`.
    param: The weight's path.
    x: The activation operand.
    w_axes: The weight's contracted axes, ascending (its K, flattened row-major).
    x_dims: ``x``'s contracted dims, paired with ``w_axes`` in order.
    batched: The product has batch dimensions (not a plain matmul).
    out: The ``dot_general``'s output.
  """

  eqn: int
  param: str
  x: Var
  w_axes: tuple
  x_dims: tuple
  batched: bool
  out: Var

  @property
  def source(self) -> tuple:
    return (self.x, self.x_dims)


class BiasWalk(NamedTuple):
  """What follows a linear layer's output (`Flat.linear_bias`).

  Attributes:
    bias: Path of the parameter the chain adds to the output (``n_out``
      elements: the layer's bias), or None.
    stop: Index in `Flat.eqns` of the first equation after the output (and
      its bias add) that is not one of the ops walked through (e.g. a
      residual add), or None where the chain forks, ends or runs past the
      step limit.
    value: The chain's value that ``stop`` reads (None with ``stop``).
  """

  bias: Optional[str]
  stop: Optional[int]
  value: Optional[Var]


def _is_var(a) -> bool:
  return isinstance(a, Var)


def _inner(eqn):
  if eqn.primitive.name not in _INLINE:
    return None
  for name in _CALL_PARAMS:
    j = eqn.params.get(name)
    if isinstance(j, jex.core.ClosedJaxpr):
      return j.jaxpr, list(j.consts)
    if isinstance(j, jex.core.Jaxpr):
      return j, []
  return None


class Flat:
  """A program as a flat equation list over `Var` s.

  Build one with `trace` (a function) or `from_jaxpr` (a `jquant.graph`
  segment).

  Attributes:
    invars: Inputs: the parameters (in ``param_paths`` order), then the rest.
    outvars: Outputs (`Var` or literal).
    eqns: `Eqn` list in program order.
    params: ``{Var: path}`` of the parameter inputs.
    consts: ``{Var: value}`` of constants.
    sites: Matmuls against parameters, in program order.
    groups: Site indices reading the same array over the same axes.
  """

  def __init__(self, jaxpr, consts, param_paths: Sequence[str]):
    self.consts: dict = {}
    self.eqns: list[Eqn] = []
    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts):
      nv = Var(v.aval)
      self.consts[nv] = c
      env[v] = nv
    self.invars = []
    for v in jaxpr.invars:
      nv = Var(v.aval)
      env[v] = nv
      self.invars.append(nv)
    self.outvars = self._inline(jaxpr, env)
    self.params = {v: p for v, p in zip(self.invars, param_paths)}
    self.param_index = {p: i for i, p in enumerate(param_paths)}
    self.producer: dict = {}
    self.users: dict = {}
    for i, e in enumerate(self.eqns):
      for o in e.outs:
        self.producer[o] = i
      for a in e.ins:
        if _is_var(a):
          self.users.setdefault(a, []).append(i)
    self.sites = self._find_sites()
    self.site_of = {s.param: k for k, s in enumerate(self.sites)}
    groups: dict = {}
    for k, s in enumerate(self.sites):
      if not s.batched:
        groups.setdefault(s.source, []).append(k)
    self.groups = [tuple(g) for g in groups.values()]

  # -- building --------------------------------------------------------------
  def _inline(self, jaxpr, env):
    def read(v):
      return v if isinstance(v, jex.core.Literal) else env[v]

    for eqn in jaxpr.eqns:
      ins = tuple(read(v) for v in eqn.invars)
      inner = _inner(eqn)
      if inner is not None:
        j, cs = inner
        sub = {}
        for v, c in zip(j.constvars, cs):
          nv = Var(v.aval)
          self.consts[nv] = c
          sub[v] = nv
        for v, a in zip(j.invars, ins):
          sub[v] = a
        outs = self._inline(j, sub)
        for v, a in zip(eqn.outvars, outs):
          env[v] = a
        continue
      outs = tuple(Var(v.aval) for v in eqn.outvars)
      for v, nv in zip(eqn.outvars, outs):
        env[v] = nv
      self.eqns.append(Eqn(eqn, ins, outs))
    return [read(v) for v in jaxpr.outvars]

  def _find_sites(self) -> list:
    out = []
    for i, e in enumerate(self.eqns):
      if e.name != "dot_general":
        continue
      lhs, rhs = e.ins
      (lc, rc), (lb, rb) = e.src.params["dimension_numbers"]
      ro, lo = self.view_origin(rhs), self.view_origin(lhs)
      if ro is not None:
        (path, perm), x, wc, xc, wb = ro, lhs, rc, lc, rb
      elif lo is not None:
        (path, perm), x, wc, xc, wb = lo, rhs, lc, rc, lb
      else:
        continue
      if not _is_var(x):
        continue
      contract = tuple(perm[d] for d in wc)
      pair = dict(zip(contract, xc))
      w_axes = tuple(sorted(contract))
      out.append(Site(i, path, x, w_axes, tuple(pair[a] for a in w_axes), bool(wb), e.outs[0]))
    return out

  # -- queries -----------------------------------------------------------------
  def view_origin(self, a) -> Optional[tuple]:
    """``(path, perm)`` when ``a`` is a parameter seen through float casts and transposes, else None."""
    perm = None
    while _is_var(a):
      if a in self.params:
        nd = len(a.aval.shape)
        if nd < 2 or not jnp.issubdtype(a.aval.dtype, jnp.floating):
          return None
        return self.params[a], tuple(range(nd)) if perm is None else perm
      i = self.producer.get(a)
      if i is None:
        return None
      e = self.eqns[i]
      if e.name not in _VIEW_OPS:
        return None
      if e.name == "convert_element_type" and not jnp.issubdtype(e.src.params["new_dtype"], jnp.floating):
        return None
      if e.name == "transpose":
        p = tuple(e.src.params["permutation"])
        perm = p if perm is None else tuple(p[q] for q in perm)
      a = e.ins[0]
    return None

  def derived_param(self, a) -> Optional[str]:
    """The parameter ``a`` is read from through reshapes, broadcasts and casts, else None."""
    while _is_var(a):
      if a in self.params:
        return self.params[a]
      i = self.producer.get(a)
      if i is None or self.eqns[i].name not in _DERIVED_OPS:
        return None
      a = self.eqns[i].ins[0]
    return None

  def chain(self, v, steps: int):
    """Yields ``(equation index, value it reads)`` along ``v``'s single-user chain, at most ``steps``.

    Each equation read is the only reader of the value before it (its first
    output is the next value); the chain stops at a fork or where nothing
    reads the value. The caller breaks where the equations stop being ones
    it walks through.
    """
    for _ in range(steps):
      users = self.users.get(v, [])
      if len(users) != 1:
        return
      yield users[0], v
      v = self.eqns[users[0]].outs[0]

  def linear_bias(self, out, n_out: int, *, through: Sequence[str] = _BIAS_PATH_OPS, steps: int = 4) -> BiasWalk:
    """The bias added to a linear layer's output ``out``, and where the chain goes on from it.

    Walks ``out``'s single-user chain (`chain`, at most ``steps``
    equations) through ``through`` ops (reshapes, casts: the output's
    channels unchanged). The first ``add`` on it whose other operand is a
    parameter of ``n_out`` elements (seen through reshapes, broadcasts and
    casts: `derived_param`) is the bias; the walk goes on through ``through``
    ops after it. Used by the folds (`jquant.folds`: a linear source's bias
    scales with its outputs) and the rotations (`jquant.rotation`: a residual
    writer's bias rotates with it).

    Args:
      out: The layer's output value (`Site.out`).
      n_out: Its output channels (elements the bias must have).
      through: Op names walked through.
      steps: Equations read at the most (the bias add included).

    Returns:
      A `BiasWalk`: the bias path or None, and the equation the walk stopped at.

    Example (``flat`` of the module's example: a LayerNorm, then ``nn.Dense(8)``):
      >>> site = flat.sites[0]
      >>> flat.linear_bias(site.out, 8).bias        # the Dense's output + its bias
      'layers_1/bias'
    """
    bias = None
    for i, v in self.chain(out, steps):
      e = self.eqns[i]
      if e.name == "add" and bias is None:
        others = [a for a in e.ins if a is not v]
        p = self.derived_param(others[0]) if others else None
        if p is not None and int(np.prod(self.param_shape(p))) == n_out:
          bias = p
          continue
        return BiasWalk(None, i, v)
      if e.name not in through:
        return BiasWalk(bias, i, v)
    return BiasWalk(bias, None, None)

  def is_const(self, a) -> bool:
    """``a`` is a literal, a constant, or computed from constants only."""
    seen = set()
    stack = [a]
    while stack:
      a = stack.pop()
      if not _is_var(a) or a in self.consts:
        continue
      if a in seen:
        continue
      seen.add(a)
      i = self.producer.get(a)
      if i is None:
        return False
      stack.extend(self.eqns[i].ins)
    return True

  def param_shape(self, path: str) -> tuple:
    return tuple(self.invars[self.param_index[path]].aval.shape)

  def downstream(self, starts, *, stop_at_sites: bool = False) -> set:
    """Indices of the equations that read (transitively) any of ``starts``.

    With ``stop_at_sites``, the walk does not continue past another
    parameter matmul (its output is a new quantity).
    """
    site_eqns = {s.eqn for s in self.sites} if stop_at_sites else set()
    frontier = list(starts)
    seen_vars = set(frontier)
    out = set()
    while frontier:
      v = frontier.pop()
      for i in self.users.get(v, ()):
        if i in out:
          continue
        out.add(i)
        if i in site_eqns:
          continue
        for o in self.eqns[i].outs:
          if o not in seen_vars:
            seen_vars.add(o)
            frontier.append(o)
    return out

  def upstream(self, targets) -> set:
    """Indices of the equations that ``targets`` depend on."""
    out = set()
    stack = [t for t in targets if _is_var(t)]
    seen = set(stack)
    while stack:
      v = stack.pop()
      i = self.producer.get(v)
      if i is None or i in out:
        continue
      out.add(i)
      for a in self.eqns[i].ins:
        if _is_var(a) and a not in seen:
          seen.add(a)
          stack.append(a)
    return out

  def feeds_scores(self, site: int) -> bool:
    """The site's output reaches a product of two activations that contracts its last (feature) axis.

    That is how queries and keys meet in attention scores (``q k^T`` over
    the head dimension, whatever the einsum spelling), while values are
    contracted over positions. The walk stops at other parameter matmuls.
    """
    s = self.sites[site]
    reached = self.downstream([s.out], stop_at_sites=True)
    derived = {s.out}
    for i in sorted(reached):
      e = self.eqns[i]
      if any(_is_var(a) and a in derived for a in e.ins):
        if e.name == "dot_general" and i not in {t.eqn for t in self.sites}:
          (lc, rc), _ = e.src.params["dimension_numbers"]
          for a, dims in zip(e.ins, (lc, rc)):
            if _is_var(a) and a in derived and len(a.aval.shape) - 1 in dims:
              return True
        derived.update(e.outs)
    return False

  # -- evaluation ---------------------------------------------------------------
  def evaluate(self, env: dict, eqn_ids: Optional[Sequence[int]] = None, want: Sequence = ()) -> list:
    """Runs equations (all, or ``eqn_ids`` in order) on ``env`` ``{Var: value}``; returns ``want`` values.

    ``env`` must hold every value the equations read that they do not
    compute (constants are added).
    """
    env = dict(env)
    for v, c in self.consts.items():
      env.setdefault(v, c)

    def read(a):
      return a.val if isinstance(a, jex.core.Literal) else env[a]

    ids = range(len(self.eqns)) if eqn_ids is None else eqn_ids
    for i in ids:
      e = self.eqns[i]
      vals = [read(a) for a in e.ins]
      prim = e.src.primitive
      with e.src.ctx.manager:
        outs = prim.bind(*vals, **prim.get_bind_params(e.src.params))
      if not prim.multiple_results:
        outs = [outs]
      for o, x in zip(e.outs, outs):
        env[o] = x
    return [read(a) for a in want]

  def run(self, inputs: Sequence, want: Optional[Sequence] = None) -> list:
    """All equations on ``inputs`` (in ``invars`` order); returns ``want`` (default the outputs)."""
    env = dict(zip(self.invars, inputs))
    return self.evaluate(env, None, self.outvars if want is None else want)

  def slice(self, changed: Sequence[Var], targets: Sequence) -> "Slice":
    """The equations between ``changed`` values and ``targets``, and the frontier they read."""
    ids = sorted(self.downstream(changed) & self.upstream(targets))
    produced = {o for i in ids for o in self.eqns[i].outs}
    changed = list(changed)
    frontier, seen = [], set(changed)
    for i in ids:
      for a in self.eqns[i].ins:
        if _is_var(a) and a not in produced and a not in seen and a not in self.consts:
          seen.add(a)
          frontier.append(a)
    for t in targets:  # a target the changed values do not reach is read as is
      if _is_var(t) and t not in produced and t not in seen and t not in self.consts:
        seen.add(t)
        frontier.append(t)
    return Slice(self, tuple(ids), tuple(changed), tuple(frontier), tuple(targets))


class Slice(NamedTuple):
  """Part of a `Flat`: ``eqns`` recompute ``targets`` from ``changed`` and ``frontier`` values."""

  flat: Flat
  eqns: tuple
  changed: tuple
  frontier: tuple
  targets: tuple

  def run(self, changed_values: Sequence, frontier_values: Sequence) -> list:
    env = dict(zip(self.changed, changed_values))
    env.update(zip(self.frontier, frontier_values))
    return self.flat.evaluate(env, self.eqns, self.targets)


def canonical(x, x_dims: Sequence[int]):
  """An activation as `jquant.capture` records it: ``(..., K)``, contracted dims flattened last in order."""
  free = [d for d in range(x.ndim) if d not in x_dims]
  perm = free + list(x_dims)
  y = x if perm == list(range(x.ndim)) else jnp.transpose(x, perm)
  return y.reshape(tuple(x.shape[d] for d in free) + (-1,))


def from_jaxpr(jaxpr, consts, param_paths: Sequence[str]) -> Flat:
  """A `Flat` of a jaxpr whose first ``len(param_paths)`` inputs are parameters."""
  return Flat(jaxpr, consts, param_paths)


def trace(fn, params, *inputs) -> Flat:
  """A `Flat` of ``fn(params, *inputs)``; parameter paths as `jquant.graph` names them."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [path_str(kp) for kp, _ in leaves]
  p_tree = jax.tree_util.tree_structure(params)
  in_leaves, in_tree = jax.tree_util.tree_flatten(inputs)

  def flat_fn(*flat):
    p = jax.tree_util.tree_unflatten(p_tree, flat[:len(paths)])
    return fn(p, *jax.tree_util.tree_unflatten(in_tree, flat[len(paths):]))

  structs = [jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for _, v in leaves]
  structs += [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in in_leaves]
  closed = jax.make_jaxpr(flat_fn)(*structs)
  return Flat(closed.jaxpr, closed.consts, paths)





class Programs:
  """One `jquant.graph.Program` per input shape, so that batches of any sizes run through one model.

  A traced program is specific to the shapes it was traced with; a
  calibration set whose last batch is shorter (or a list of batches of
  several shapes) needs one program per shape. Their blocks are the same
  parameters, so block ``i`` of every program is processed together.

  Args:
    apply: ``apply(params, *inputs)``.
    params: The parameter tree.
    blocks: Optional block regex (see `jquant.graph.find_blocks`).
  """

  def __init__(self, apply, params, blocks: Optional[str] = None):
    self.apply, self.params, self.blocks = apply, params, blocks
    self._progs: dict = {}

  def __call__(self, batch: tuple):
    from jquant import graph
    leaves, tree = jax.tree_util.tree_flatten(batch)
    key = (tree, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves))
    prog = self._progs.get(key)
    if prog is None:
      prog = graph.trace(self.apply, self.params, *batch, blocks=self.blocks)
      first = next(iter(self._progs.values()), None)
      if first is not None and [s.name for s in first.block_segments] != [s.name for s in prog.block_segments]:
        raise graph.GraphError("graph: batches of different shapes cut the model into different blocks "
                               f"({[s.name for s in first.block_segments]} vs {[s.name for s in prog.block_segments]}).")
      self._progs[key] = prog
    return prog


def segment_flat(prog, seg) -> Flat:
  """The `Flat` of one `jquant.graph` segment, cached on the program per segment structure."""
  cache = prog.__dict__.setdefault("_flats", {})
  flat = cache.get(seg.key)
  if flat is None:
    j = prog._sub_jaxpr(seg.start, seg.stop, [prog._var(i) for i in seg.state_in], seg.params,
                        [prog._var(i) for i in seg.state_out])
    flat = cache[seg.key] = Flat(j, prog.closed.consts, seg.rel)
  return flat


__all__ = ["Flat", "Slice", "Site", "BiasWalk", "Var", "Eqn", "Programs", "trace", "from_jaxpr", "segment_flat",
           "canonical"]
