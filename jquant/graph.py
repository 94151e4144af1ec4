"""Models as data: any model's program, cut into its transformer blocks and run one block at a time.

Sequential post-training methods (GPTQ, AWQ, static W8A8 calibration,
SmoothQuant) process a model block by block: calibrate block ``i`` on the
inputs it will really see, quantize it, then produce block ``i + 1``'s inputs
with the quantized block. They need no model class: `trace` turns any apply
function into a `Program` (a jaxpr whose parameter inputs are named by their
paths), `find_blocks` finds the repeated blocks from the parameter paths
(``layers_0..N``, ``blocks_3``, NNX's ``layers/0``, Gemma's ``layer_0``) or a
user regex, and the program is cut where each block's parameters are first
read. What flows between the pieces (`State`) is whatever the program keeps
alive across the cut: the residual stream, and things like rotary tables or
attention masks computed once up front.

Pieces with the same structure (every block of a homogeneous transformer)
share one compiled function: `Segment.key` says which are alike, so a solver
jits its per-block step once per key, not once per block.

Example:
    >>> prog = jquant.graph.trace(model.apply, params, tokens)
    >>> prog.blocks
    ('layers_0', 'layers_1')
    >>> state = prog.prefix(params, tokens)
    >>> for i in range(len(prog.blocks)):
    ...   state = prog.run_block(i, params, state)
    >>> logits = prog.suffix(params, state)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from jquant import intercept
from jquant.utils import path_str

# A block key: the shortest path prefix whose last component carries a layer number.
_NUMBERED = re.compile(r"^(?:(?P<stem>.*?)_)?(?P<num>\d+)$")


class GraphError(ValueError):
  """The model's program cannot be cut into blocks as asked."""


def find_blocks(paths: Sequence[str], pattern: Optional[str] = None) -> tuple[str, ...]:
  """The repeated blocks of a model, from its parameter paths, in layer order.

  Args:
    paths: ``/``-joined parameter paths.
    pattern: A regex whose match (``re.search``, group 0) on a path is its
      block key, e.g. ``r"decoder/layer_\\d+"``. Default: the shortest path
      prefix ending in a numbered component (``layers_3``, ``blocks/3``,
      ``h/3``) among the stems numbered most often.

  Returns:
    Block keys (path prefixes), ordered by layer number.

  Raises:
    GraphError: nothing looks like a block, or the pattern matches nothing.

  Example:
    >>> find_blocks(["embed/embedding", "layers_1/mlp/kernel", "layers_0/mlp/kernel", "norm/scale"])
    ('layers_0', 'layers_1')
  """
  found: dict = {}
  if pattern is not None:
    rx = re.compile(pattern)
    for p in paths:
      m = rx.search(p)
      if m:
        key = p[:m.end()]
        nums = re.findall(r"\d+", m.group(0))
        found.setdefault(key, int(nums[-1]) if nums else len(found))
    if not found:
      raise GraphError(f"find_blocks: pattern {pattern!r} matches no parameter path; paths look like "
                       f"{list(paths)[:6]}.")
    return tuple(sorted(found, key=lambda k: (found[k], k)))
  stems: dict = {}
  for p in paths:
    parts = p.split("/")
    for i, part in enumerate(parts[:-1]):
      m = _NUMBERED.match(part)
      if m:
        prefix = "/".join(parts[:i + 1])
        stem = "/".join(parts[:i] + [m.group("stem") or ""])
        stems.setdefault(stem, {})[prefix] = int(m.group("num"))
        break
  stems = {s: keys for s, keys in stems.items() if len(keys) >= 2}
  if not stems:
    raise GraphError(
        "find_blocks: no repeated numbered blocks among the parameter paths (looked for components like "
        f"'layers_3', 'blocks/3', 'h/3'); paths look like {list(paths)[:6]}. Name the blocks with "
        "blocks=r'<regex>' (its match on a path is the block key).")
  stem = max(stems, key=lambda s: len(stems[s]))
  keys = stems[stem]
  return tuple(sorted(keys, key=lambda k: keys[k]))


def _in_block(path: str, block: str) -> bool:
  return path == block or path.startswith(block + "/")


@dataclasses.dataclass(frozen=True)
class Segment:
  """One piece of the program: equations ``[start, stop)`` of the top-level jaxpr.

  Attributes:
    name: ``"prefix"``, a block key, or ``"suffix"``.
    start, stop: The equation range.
    params: Full paths of the parameters it reads, ordered by relative path.
    rel: Those paths relative to the block (full paths for prefix/suffix and
      for parameters outside the block).
    state_in, state_out: Indices into the program's variable table of what
      flows in and out.
    key: Equal for segments with the same structure (same compiled code).
  """

  name: str
  start: int
  stop: int
  params: tuple
  rel: tuple
  state_in: tuple
  state_out: tuple
  key: Any


class Program:
  """A traced model: parameter inputs by path, cut into prefix, blocks and suffix.

  Use `trace` to build one.
  """

  def __init__(self, closed, param_paths, n_params, input_tree, out_tree, blocks: tuple[str, ...]):
    self.closed = closed
    self.jaxpr = closed.jaxpr
    self.param_paths = tuple(param_paths)
    self.n_params = n_params
    self.input_tree = input_tree
    self.out_tree = out_tree
    self.blocks = blocks
    self._index = {p: i for i, p in enumerate(self.param_paths)}
    self._jit_cache: dict = {}
    self._cut()

  # -- cutting --------------------------------------------------------------
  def _cut(self):
    eqns = self.jaxpr.eqns
    pvars = {v: p for v, p in zip(self.jaxpr.invars[:self.n_params], self.param_paths)}
    first_use: dict = {}
    last_use: dict = {}
    for i, e in enumerate(eqns):
      for v in e.invars:
        if isinstance(v, jex.core.Var) and v in pvars:
          for b in self.blocks:
            if _in_block(pvars[v], b):
              first_use.setdefault(b, i)
              last_use[b] = i
    missing = [b for b in self.blocks if b not in first_use]
    if missing:
      raise GraphError(f"graph: blocks {missing} hold parameters the program never reads.")
    starts = [first_use[b] for b in self.blocks]
    if starts != sorted(starts):
      raise GraphError(f"graph: the blocks {self.blocks} do not run in order (first reads at equations "
                       f"{starts}); name them in execution order with blocks=r'...'.")
    for b, nxt in zip(self.blocks, self.blocks[1:]):
      if last_use[b] >= first_use[nxt]:
        raise GraphError(f"graph: block {b!r} still reads its parameters after block {nxt!r} starts; the "
                         "blocks interleave and cannot be run one at a time (weights shared across blocks?).")
    # Cut each boundary where the least data is alive (between the previous block's last parameter read
    # and this block's first): the residual stream alone, not also a norm's half-computed statistics.
    live = self._live_bytes()
    # The prefix keeps every parameter read that comes before the first block (embeddings).
    first = starts[0]
    pre = [i + 1 for i, e in enumerate(eqns[:first]) if any(isinstance(v, jex.core.Var) and v in pvars
                                                            for v in e.invars)]
    lows = [max(pre, default=0)] + [last_use[b] + 1 for b in self.blocks[:-1]]
    starts = [min(range(lo, s + 1), key=lambda c: (live[c], -c)) for lo, s in zip(lows, starts)]
    # The last block ends where a block-sized piece ends, if the blocks look alike; else at the end.
    stops = starts[1:]
    last_len = stops[-1] - starts[-2] if len(starts) >= 2 else None
    end = len(eqns)
    if last_len is not None and starts[-1] + last_len <= end and last_use[self.blocks[-1]] < starts[-1] + last_len:
      prims = lambda a, b: [e.primitive.name for e in eqns[a:b]]
      if prims(starts[-2], starts[-1]) == prims(starts[-1], starts[-1] + last_len):
        end = starts[-1] + last_len
    bounds = [("prefix", 0, starts[0])] + [(b, s, t) for b, s, t in zip(self.blocks, starts, stops + [end])]
    bounds.append(("suffix", end, len(eqns)))
    segs = [self._segment(*b) for b in bounds]
    if len(self.blocks) >= 2 and segs[-2].key != segs[-3].key:
      segs[-2] = self._aligned_last(segs[-3], segs[-2]) or segs[-2]
    self.segments = tuple(segs)

  def _live_bytes(self) -> np.ndarray:
    """``live[c]``: bytes of the values (not parameters or constants) alive across a cut before equation c."""
    eqns = self.jaxpr.eqns
    n = len(eqns)
    defined = {v: 0 for v in self.jaxpr.invars[self.n_params:]}
    for i, e in enumerate(eqns):
      for v in e.outvars:
        defined[v] = i + 1
    last = {}
    for i, e in enumerate(eqns):
      for v in e.invars:
        if isinstance(v, jex.core.Var) and v in defined:
          last[v] = i
    for v in self.jaxpr.outvars:
      if isinstance(v, jex.core.Var) and v in defined:
        last[v] = n
    diff = np.zeros(n + 2)
    for v, i in last.items():
      a = v.aval
      size = float(np.prod(a.shape)) * np.dtype(a.dtype).itemsize if hasattr(a, "shape") else 0.0
      diff[defined[v]] += size  # alive across cuts c with defined[v] <= c <= last[v]
      diff[i + 1] -= size
    return np.cumsum(diff)[:n + 1]

  def _aligned_last(self, prev: Segment, last: Segment) -> Optional[Segment]:
    """The last block, also writing what the block before it writes (same structure, same compiled code)."""
    eqns = self.jaxpr.eqns
    where = {}
    for k, e in enumerate(eqns[prev.start:prev.stop]):
      for j, v in enumerate(e.outvars):
        where[v] = (k, j)
    extra = []
    for i in prev.state_out:
      v = self._var(i)
      if v not in where:
        return None
      k, j = where[v]
      if last.start + k >= last.stop:
        return None
      extra.append(eqns[last.start + k].outvars[j])
    seg = self._segment(last.name, last.start, last.stop, extra)
    return seg if seg.key == prev.key else None

  def _segment(self, name, start, stop, extra_out=()) -> Segment:
    eqns = self.jaxpr.eqns
    params = set(self.jaxpr.invars[:self.n_params])
    consts = set(self.jaxpr.constvars)
    defined_before = set(self.jaxpr.invars[self.n_params:])
    for e in eqns[:start]:
      defined_before.update(e.outvars)
    used, defined, reads = set(), set(), []
    for e in eqns[start:stop]:
      for v in e.invars:
        if isinstance(v, jex.core.Var):
          if v in params:
            reads.append(v)
          elif v not in defined and v not in consts:
            used.add(v)
      defined.update(e.outvars)
    used_after = set()
    for e in eqns[stop:]:
      used_after.update(v for v in e.invars if isinstance(v, jex.core.Var))
    used_after.update(v for v in self.jaxpr.outvars if isinstance(v, jex.core.Var))
    state_in = [v for v in used if v in defined_before]
    state_out = [v for v in (defined | defined_before) if v in used_after]
    order = self._var_order
    state_out = set(state_out) | set(extra_out)
    # What flows past the segment untouched is read and written back by it.
    state_in = set(state_in) | {v for v in state_out if v in defined_before}
    state_in = tuple(sorted((order[v] for v in state_in)))
    state_out = tuple(sorted((order[v] for v in state_out)))
    pvars = {v: p for v, p in zip(self.jaxpr.invars[:self.n_params], self.param_paths)}
    paths = sorted({pvars[v] for v in reads})
    rel = [p[len(name) + 1:] if name not in ("prefix", "suffix") and _in_block(p, name) else "/" + p
           for p in paths]
    by_rel = sorted(zip(rel, paths))
    rel, paths = tuple(r for r, _ in by_rel), tuple(p for _, p in by_rel)
    jaxpr = self._sub_jaxpr(start, stop, [self._var(i) for i in state_in], paths,
                            [self._var(i) for i in state_out])
    shapes = tuple((tuple(self._var(i).aval.shape), str(self._var(i).aval.dtype)) for i in state_in)
    return Segment(name, start, stop, paths, rel, state_in, state_out, (str(jaxpr), rel, shapes))

  @functools.cached_property
  def _var_table(self):
    table = list(self.jaxpr.constvars) + list(self.jaxpr.invars)
    for e in self.jaxpr.eqns:
      table.extend(e.outvars)
    return table

  @functools.cached_property
  def _var_order(self):
    return {v: i for i, v in enumerate(self._var_table)}

  def _var(self, i):
    return self._var_table[i]

  def _sub_jaxpr(self, start, stop, state_in_vars, param_paths, state_out_vars):
    pv = [self.jaxpr.invars[self._index[p]] for p in param_paths]
    consts = list(self.jaxpr.constvars)
    args = (consts, pv + list(state_in_vars), list(state_out_vars), self.jaxpr.eqns[start:stop])
    if consts:
      # jax >= 0.12 counts constvars only when their values are attached; without them the constvars
      # become leading invars and every caller's zip(jaxpr.constvars, consts) would bind nothing.
      try:
        return jex.core.Jaxpr(*args, consts=list(self.closed.consts))
      except TypeError:  # older jax: constvars are kept as given
        pass
    return jex.core.Jaxpr(*args)

  # -- running --------------------------------------------------------------
  def _inputs_for(self, seg: Segment, params_by_path: dict, state: dict, record: bool):
    return [_as_view(params_by_path[p], p, record) for p in seg.params] + [state[i] for i in seg.state_in]

  def run(self, seg: Segment, params_by_path: dict, state: dict, *, record: bool = False):
    """Evaluates one segment.

    Args:
      seg: The segment.
      params_by_path: ``{full path: leaf}`` for at least ``seg.params``;
        leaves may be quantized (they run as in `jquant.quantized`).
      state: ``{var index: value}`` holding ``seg.state_in``.
      record: Also record the input of every matmul against a parameter.

    Returns:
      ``(state_out, inputs, axes, groups)``: the new state (``{index: value}``
      for ``seg.state_out``) and, with ``record``, what `jquant.capture` gives
      (keys are full parameter paths).
    """
    ctx = intercept._Context(record=record)
    sub = self._sub_jaxpr(seg.start, seg.stop, [self._var(i) for i in seg.state_in], seg.params,
                          [self._var(i) for i in seg.state_out])
    outs = intercept._eval(sub, self.closed.consts, self._inputs_for(seg, params_by_path, state, record), ctx)
    outs = [o.materialize("the block's outputs") if isinstance(o, intercept._View) else o for o in outs]
    return dict(zip(seg.state_out, outs)), ctx.inputs, ctx.axes, ctx.groups()

  @property
  def block_segments(self) -> tuple:
    return self.segments[1:-1]

  def jitted(self, seg: Segment, reduce: Optional[Callable] = None, *, record: bool = False) -> Callable:
    """A compiled ``f(rel_params, state_in, *extra)`` shared by all segments with ``seg.key``.

    ``rel_params`` is ``{relative path: leaf}`` (`block_params`), ``state_in``
    the list of ``seg.state_in`` values. Without ``reduce``, ``f`` returns
    ``(state_out list, inputs)``; with it, ``reduce(state_out, inputs, *extra)``
    (e.g. Hessian sums), so that activations need not leave the device.
    ``inputs`` (with ``record``) are keyed by relative paths.
    """
    key = (seg.key, reduce, record)
    f = self._jit_cache.get(key)
    if f is not None:
      return f
    sub = self._sub_jaxpr(seg.start, seg.stop, [self._var(i) for i in seg.state_in], seg.params,
                          [self._var(i) for i in seg.state_out])
    rels, consts = seg.rel, self.closed.consts

    def impl(rel_params, state_in, *extra):
      ctx = intercept._Context(record=record)
      vals = [_as_view(rel_params[r], r, record) for r in rels] + list(state_in)
      outs = intercept._eval(sub, consts, vals, ctx)
      outs = [o.materialize("the block's outputs") if isinstance(o, intercept._View) else o for o in outs]
      if reduce is None:
        return outs, ctx.inputs
      return reduce(outs, ctx.inputs, *extra)

    f = jax.jit(impl)
    self._jit_cache[key] = f
    return f

  def matmuls(self, seg: Segment, params_by_path: dict, state: dict):
    """``(axes, groups)`` of the segment's matmuls (relative paths), found abstractly."""
    found = []

    def probe(rel_params, state_in):
      ctx = intercept._Context(record=True)
      sub = self._sub_jaxpr(seg.start, seg.stop, [self._var(i) for i in seg.state_in], seg.params,
                            [self._var(i) for i in seg.state_out])
      vals = [_as_view(rel_params[r], r, True) for r in seg.rel] + list(state_in)
      intercept._eval(sub, self.closed.consts, vals, ctx)
      found.append((dict(ctx.axes), ctx.groups()))
      return 0

    jax.eval_shape(probe, self.block_params(params_by_path, seg), state_list(seg, state))
    return found[0]

  def segment(self, name: str) -> Segment:
    for s in self.segments:
      if s.name == name:
        return s
    raise KeyError(f"graph: no segment {name!r}; segments: {[s.name for s in self.segments]}.")

  def block_params(self, params_by_path: dict, seg: Segment) -> dict:
    """``{relative path: leaf}`` of a segment (the structure its compiled code is keyed on)."""
    return {r: params_by_path[p] for r, p in zip(seg.rel, seg.params)}

  def prefix(self, params, *inputs) -> dict:
    """The state entering the first block: ``{var index: value}``."""
    seg = self.segments[0]
    flat = dict(zip(self.param_paths, _flat_params(params)))
    state = self._input_state(inputs)
    return self.run(seg, flat, state)[0]

  def _input_state(self, inputs) -> dict:
    leaves = jax.tree_util.tree_leaves(inputs)
    first = len(self.jaxpr.constvars) + self.n_params
    return {first + i: x for i, x in enumerate(leaves)}

  def run_block(self, i: int, params, state: dict) -> dict:
    """Block ``i`` on ``state`` with ``params`` (a full tree; leaves may be quantized)."""
    flat = dict(zip(self.param_paths, _flat_params(params)))
    return self.run(self.segments[1 + i], flat, state)[0]

  def suffix(self, params, state: dict):
    """The model's outputs from the state after the last block."""
    seg = self.segments[-1]
    flat = dict(zip(self.param_paths, _flat_params(params)))
    out_state = self.run(seg, flat, state)[0]
    full = {**state, **out_state}
    outs = [v.val if isinstance(v, jex.core.Literal) else full[self._var_order[v]] for v in self.jaxpr.outvars]
    return jax.tree_util.tree_unflatten(self.out_tree, outs)


def _as_view(v, path, record):
  if intercept.is_quantized(v):
    s = intercept.logical_struct(v)
    return intercept._View(v, path, tuple(range(len(s.shape))), s.dtype, True)
  if record and intercept._is_weight(v):
    return intercept._View(v, path, tuple(range(jnp.ndim(v))), jnp.result_type(v), False)
  return v


def state_list(seg: Segment, state: dict) -> list:
  """The values a segment reads, in its order."""
  return [state[i] for i in seg.state_in]


def updated(seg: Segment, state: dict, outs) -> dict:
  """``state`` after a segment wrote ``outs`` (its ``state_out`` order)."""
  return {**state, **dict(zip(seg.state_out, outs))}


def _flat_params(params):
  return [leaf for _, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=intercept.is_quantized)[0]]


def batches(calib, batch_size: int = 8, *, fn: str = "calibration") -> list[tuple]:
  """Calibration data as a list of batches, each a tuple of positional model inputs.

  Args:
    calib: An array (or a pytree of arrays sharing a leading axis), split
      into batches of ``batch_size`` along axis 0 and passed as the model's
      one input; or a list/tuple of batches, each a tuple of positional
      inputs (or a single input), any pytree (token ids, embeddings, images).
    batch_size: Rows per batch when ``calib`` is split.
    fn: Name used in error messages.

  Raises:
    ValueError: empty calibration data, or a non-positive batch size.

  Example:
    >>> [b[0].shape for b in batches(jnp.zeros((10, 16), jnp.int32), 4)]
    [(4, 16), (4, 16), (2, 16)]
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"{fn}: batch_size={batch_size!r}; allowed: a positive int.")
  if isinstance(calib, list):
    out = [b if isinstance(b, tuple) else (b,) for b in calib]
  else:
    leaves = jax.tree_util.tree_leaves(calib)
    if not leaves:
      raise ValueError(f"{fn}: the calibration data is empty; allowed: an array of examples (N, ...) with "
                       "N >= 1, or a non-empty list of batches.")
    n = int(jnp.shape(leaves[0])[0]) if jnp.ndim(leaves[0]) else 0
    out = [(jax.tree_util.tree_map(lambda a: a[i:i + batch_size], calib),) for i in range(0, n, batch_size)]
  if not out:
    raise ValueError(f"{fn}: the calibration data is empty (0 examples); allowed: at least one example.")
  return out


def trace(fn: Callable, params, *inputs, blocks: Optional[str] = None) -> Program:
  """Traces ``fn(params, *inputs)`` into a `Program` cut at its blocks.

  Args:
    fn: ``fn(params, *inputs)``, e.g. ``lambda p, x: model.apply({"params": p}, x)``
      (see `as_apply` for Linen and NNX modules).
    params: The parameter tree (float or quantized leaves).
    *inputs: Example inputs (arrays or pytrees of arrays); only shapes matter.
    blocks: Optional regex naming the blocks (see `find_blocks`).

  Raises:
    GraphError: no blocks found, blocks that do not run in order, or blocks
      that read their parameters after the next block began.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=intercept.is_quantized)[0]
  paths = [path_str(kp) for kp, _ in leaves]
  p_structs = [intercept.logical_struct(v) if intercept.is_quantized(v)
               else jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for _, v in leaves]
  p_tree = jax.tree_util.tree_structure(params, is_leaf=intercept.is_quantized)
  in_leaves, in_tree = jax.tree_util.tree_flatten(inputs)
  in_structs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in in_leaves]

  def flat_fn(*flat):
    p = jax.tree_util.tree_unflatten(p_tree, flat[:len(p_structs)])
    xs = jax.tree_util.tree_unflatten(in_tree, flat[len(p_structs):])
    return fn(p, *xs)

  # Traced with jit disabled, so that a model whose forward is one jitted call (gemma's `nn.jit`-wrapped
  # Transformer) still shows its blocks at the top level, where the program is cut.
  with jax.disable_jit():
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*p_structs, *in_structs)
  block_keys = find_blocks([p for p, s in zip(paths, p_structs) if len(s.shape) >= 1], blocks)
  return Program(closed, paths, len(paths), in_tree, jax.tree_util.tree_structure(out_shape), block_keys)


def as_apply(model) -> tuple[Callable, Any]:
  """``(apply(params, *inputs), params or None)`` for a Linen module, an NNX module, or a function.

  * a Linen ``nn.Module``: ``apply = lambda p, *x: model.apply({"params": p}, *x)``; params must be given;
  * an NNX module: split once; ``apply`` merges the state and calls it; its
    state is returned as the params;
  * an object with ``.apply(params, *inputs)`` (jquant's models) or a plain function: used as is.
  """
  import flax.linen as nn
  from flax import nnx

  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    return (lambda s, *x: nnx.merge(graphdef, s)(*x)), state
  if isinstance(model, nn.Module):
    return (lambda p, *x: model.apply({"params": p}, *x)), None
  if hasattr(model, "apply") and callable(model.apply):
    return model.apply, getattr(model, "params", None)
  if callable(model):
    return model, None
  raise TypeError(f"as_apply: model must be a Linen or NNX module, an object with .apply, or a function; got "
                  f"{type(model).__name__}.")


__all__ = ["trace", "batches", "find_blocks", "as_apply", "state_list", "updated", "Program", "Segment", "GraphError"]
