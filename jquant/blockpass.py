"""The sequential block pass shared by the block-by-block quantizers (`jquant.gptq`, `jquant.blockwise`).

Both quantizers walk a model (as data: `jquant.graph`) the same way: the
program is traced once per distinct calibration batch shape and cut into a
prefix, one segment per block and a suffix; the calibration batches run
through the prefix; then, block after block, the block's matmuls are read
(their contraction axes and the groups of weights sharing an input), the
rule-selected weights among them are quantized by the algorithm (GPTQ's
solve, block-wise reconstruction's learned quantizers), and the *quantized*
block produces the next block's inputs. Rule-selected leaves no block matmul
reads (an untied output head) are rounded to nearest at the end.

This module holds that walk, not the algorithms:

* `check_rules`, `check_rules_match`, `model_params`: arguments as both
  passes take them (a rule list, a model with or without its own params);
* `traced`: `graph.trace` cached per model (weakly) and input structure, so
  repeated passes reuse the compiled block steps;
* `Runs`: the calibration batches through the prefix, a block's forward step
  and a block's recording step (matmul inputs reduced on device, e.g. to
  Hessian sums), block by block;
* `Runs.targets`: a block's rule-selected float weights, with their
  contraction axes and groups;
* `round_the_rest`: round-to-nearest for the selected leaves no block read.

Example:
    >>> import flax.linen as nn, jax, jquant
    >>> from jquant import blockpass
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for i in range(2):
    ...       x = nn.Dense(16, name=f"layers_{i}")(x)
    ...     return x
    >>> x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    >>> apply, params, _ = blockpass.model_params(Net(), Net().init(jax.random.key(1), x), "demo")
    >>> runs = blockpass.Runs(Net(), apply, params, [(x,)], None)
    >>> flat, treedef = runs.flat(params)
    >>> states = runs.prefix(flat, [(x,)])
    >>> rules = [jquant.Rule("kernel", jquant.QuantSpec(bits=4))]
    >>> seg = runs.main.prog.block_segments[0]
    >>> targets, groups = runs.targets(seg, flat, states[0], rules, {})
    >>> targets["kernel"][0], groups
    ('layers_0/kernel', [['kernel']])
    >>> states = runs.forward(0, flat, states)      # block 0's outputs: block 1's inputs
"""

from __future__ import annotations

import difflib
import warnings
import weakref
from collections.abc import Mapping
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jquant import graph, intercept
from jquant.spec import QuantSpec, Rule, first_match
from jquant.tree import quantize_params


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def check_rules(rules, fn: str) -> list:
  """``rules`` as a list, each a `jquant.Rule`.

  Raises:
    TypeError: ``rules`` is one `jquant.Rule` or a string instead of a
      list, or an element that is not a `jquant.Rule` (naming ``fn`` and its type).
    ValueError: no rules (nothing would be quantized).
  """
  if isinstance(rules, (Rule, str)):
    raise TypeError(f"{fn}: rules must be a list of jquant.Rule objects; got one {type(rules).__name__}: wrap it as "
                    "[rule].")
  rules = list(rules)
  if not rules:
    raise ValueError(f"{fn}: rules is empty; allowed: jquant.Rule(pattern, QuantSpec) objects selecting the weights "
                     "to quantize (with none the result would be the float tree).")
  for r in rules:
    if not isinstance(r, Rule):
      raise TypeError(f"{fn}: rules must be jquant.Rule objects, got {type(r).__name__}.")
  return rules


def check_rules_match(rules: Sequence[Rule], paths: Sequence[str], fn: str) -> None:
  """Raises naming every rule whose pattern matches none of ``paths`` (the model's float parameter paths).

  A rule that matches nothing is a mistyped pattern or a rule for another
  model; accepting it would silently leave in float what it meant to quantize.

  Raises:
    ValueError: naming each such rule (its index and pattern) and the paths
      nearest to its pattern.
  """
  bad = [(i, r) for i, r in enumerate(rules) if not any(r.matches(p) for p in paths)]
  if not bad:
    return
  paths = list(paths)
  parts = []
  for i, r in bad:
    near = difflib.get_close_matches(r.pattern, paths, n=3, cutoff=0.0)
    parts.append(f"rules[{i}] (pattern {r.pattern!r}, nearest paths {near})")
  example = f" such as {paths[0]!r}" if paths else ""
  raise ValueError(f"{fn}: {'; '.join(parts)} match{'es' if len(bad) == 1 else ''} no parameter of the model; "
                   f"allowed: rules whose pattern re.search-es at least one '/'-joined parameter path{example}. "
                   "Fix the pattern or drop the rule.")


def is_linen(model) -> bool:
  import flax.linen as nn
  return isinstance(model, nn.Module)


def model_params(model, params, fn: str) -> tuple:
  """``(apply, params, wrapped)``: the model's apply function (`graph.as_apply`) and its float parameter tree.

  ``params=None`` takes the model's own (an NNX module, jquant's models); a
  Linen ``{"params": tree}`` variables dict is unwrapped (``wrapped`` True:
  return the result wrapped the same way).

  Raises:
    ValueError: ``params=None`` and the model holds none.
  """
  apply, own = graph.as_apply(model)
  wrapped = False
  if params is None:
    params = own
    if params is None:
      raise ValueError(f"{fn}: params=None, but {type(model).__name__} holds no parameters; pass the float "
                       "parameter tree (Linen: model.init(...)['params']).")
  elif is_linen(model) and isinstance(params, Mapping) and list(params) == ["params"]:
    params, wrapped = params["params"], True
  return apply, params, wrapped


def axis_spec(spec: QuantSpec, k_axes: tuple) -> QuantSpec:
  """``spec`` along the contraction axes ``k_axes`` its matmul uses (an int for one axis)."""
  return spec.replace(axis=k_axes if len(k_axes) > 1 else k_axes[0])


# ----------------------------------------------------------------------------------------------
# The traced program, cached per model
# ----------------------------------------------------------------------------------------------


class Traced(NamedTuple):
  """A model's traced program and the matmuls of its segments (read once per segment structure)."""

  prog: graph.Program
  matmuls: dict  # seg.key -> (axes, groups), relative paths


_PROGRAMS: dict = {}


def _struct(x):
  if intercept.is_quantized(x):
    s = intercept.logical_struct(x)
    return (type(x).__name__, tuple(s.shape), str(s.dtype))
  return (tuple(np.shape(x)), str(jnp.result_type(x)))


def input_signature(batch) -> tuple:
  """The tree structure, shapes and dtypes of a batch: batches with one signature share one traced program."""
  leaves, tree = jax.tree_util.tree_flatten(batch)
  return tree, tuple(_struct(v) for v in leaves)


def traced(model, apply, params, example, blocks) -> Traced:
  """`graph.trace` of ``apply``, cached per (model object, parameter and input structure, blocks).

  Repeated passes over one model (sweeps, tests) reuse the program and with
  it the compiled block steps. The cache holds the model only weakly; its
  entry goes away with the model.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=intercept.is_quantized)
  in_leaves, in_tree = jax.tree_util.tree_flatten(example)
  key = (id(model), treedef, tuple(_struct(v) for v in leaves), in_tree, tuple(_struct(v) for v in in_leaves),
         blocks)
  try:
    hit = _PROGRAMS.get(key)
  except TypeError:  # an unhashable tree definition: no caching
    key, hit = None, None
  if hit is not None and hit[0]() is model:
    return hit[1]
  entry = Traced(graph.trace(apply, params, *example, blocks=blocks), {})
  if key is not None:
    try:
      ref = weakref.ref(model)
    except TypeError:  # not weak-referenceable: no caching
      return entry
    weakref.finalize(model, _PROGRAMS.pop, key, None)
    _PROGRAMS[key] = (ref, entry)
  return entry


def _matmuls(t: Traced, seg, flat, state):
  """``(axes, groups)`` of a segment's matmuls, found once per segment structure."""
  hit = t.matmuls.get(seg.key)
  if hit is None:
    hit = t.matmuls[seg.key] = t.prog.matmuls(seg, flat, state)
  return hit


# ----------------------------------------------------------------------------------------------
# Running the calibration batches block by block
# ----------------------------------------------------------------------------------------------


class Runs:
  """Runs the calibration batches through the traced program(s), block by block.

  Batches of one input shape share one `graph.Program` (its jaxpr has fixed
  shapes) and so one compiled step per alike block; batches of another shape
  get their own program, whose blocks line up with the first one's.

  Args:
    model, apply, params: The model, its apply function and float params
      (`model_params`).
    batches: The calibration batches, each a tuple of positional inputs.
    blocks: Optional regex naming the blocks (`jquant.graph.find_blocks`).
    put_params: Places a block's parameters (e.g. replicated on a mesh);
      default: as they are.
    fn: The caller's name, for errors.

  Raises:
    jquant.graph.GraphError: batches of different shapes that trace to
      different blocks.
  """

  def __init__(self, model, apply, params, batches, blocks, put_params=None, fn: str = "quantize_model"):
    self.put_params = put_params or (lambda t: t)
    by_sig: dict = {}
    self.of_batch = []
    for b in batches:
      sig = input_signature(b)
      if sig not in by_sig:
        by_sig[sig] = traced(model, apply, params, b, blocks)
      self.of_batch.append(by_sig[sig])
    self.main = self.of_batch[0]
    for t in by_sig.values():
      if t.prog.blocks != self.main.prog.blocks or [s.rel for s in t.prog.block_segments] != [
          s.rel for s in self.main.prog.block_segments]:
        raise graph.GraphError(
            f"{fn}: calibration batches of different shapes trace to different blocks "
            f"({self.main.prog.blocks} vs {t.prog.blocks}); pass batches of one shape.")

  def flat(self, params) -> tuple:
    """``({full path: leaf}, treedef)`` of ``params`` in the program's order (quantized leaves kept whole)."""
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=intercept.is_quantized)
    return dict(zip(self.main.prog.param_paths, leaves)), treedef

  def _params(self, cache, t, seg, flat):
    key = id(t)
    if key not in cache:
      cache[key] = self.put_params(t.prog.block_params(flat, seg))
    return cache[key]

  def prefix(self, flat, batches) -> list:
    """The state entering the first block, per batch."""
    states, cache = [], {}
    for b, t in zip(batches, self.of_batch):
      seg = t.prog.segments[0]
      outs, _ = t.prog.jitted(seg)(self._params(cache, t, seg, flat),
                                   graph.state_list(seg, t.prog._input_state(b)))
      states.append(dict(zip(seg.state_out, outs)))
    return states

  def record(self, i, flat, states, reduce, carry, per_batch, *shared):
    """Block ``i`` run on every batch with its matmul inputs recorded and folded into ``carry`` on device.

    Each batch's compiled step returns ``reduce(outs, inputs, carry,
    per_batch[b], *shared)`` (`graph.Program.jitted` with ``record=True``),
    the next batch's ``carry``; the last one is returned.
    """
    cache = {}
    for st, extra, t in zip(states, per_batch, self.of_batch):
      seg = t.prog.block_segments[i]
      step = t.prog.jitted(seg, reduce, record=True)
      carry = step(self._params(cache, t, seg, flat), graph.state_list(seg, st), carry, extra, *shared)
    return carry

  def forward(self, i, flat, states) -> list:
    """The states after block ``i`` run with ``flat``'s (quantized) params."""
    out, cache = [], {}
    for st, t in zip(states, self.of_batch):
      seg = t.prog.block_segments[i]
      outs, _ = t.prog.jitted(seg)(self._params(cache, t, seg, flat), graph.state_list(seg, st))
      out.append(dict(zip(seg.state_out, outs)))
    return out

  def targets(self, seg, flat, state, rules, found_axes: dict, fn: str = "quantize_model") -> tuple:
    """A block's rule-selected float weights: ``({relative path: (full path, spec, contraction axes)}, groups)``.

    ``groups`` lists the relative paths of targets that read one input
    (q/k/v, gate/up), in call order. The contraction axes of every matmul of
    the block are added to ``found_axes`` (``{full path: axes}``, for
    `round_the_rest`).

    Raises:
      TypeError: a rule whose spec is not a `QuantSpec`.
      ValueError: a selected weight contracted over non-adjacent axes.
    """
    axes, groups = _matmuls(self.main, seg, flat, state)
    found_axes.update({f: axes[r] for r, f in zip(seg.rel, seg.params) if r in axes})
    return _targets(seg, flat, axes, groups, rules, fn)


def _targets(seg, flat, axes, groups, rules, fn):
  full_of = dict(zip(seg.rel, seg.params))
  targets = {}
  for r in (p for g in groups for p in g):
    if r.startswith("/"):  # a parameter outside the block (e.g. tied weights): not solved here
      continue
    full = full_of[r]
    leaf = flat[full]
    if intercept.is_quantized(leaf) or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      continue
    matched, spec = first_match(rules, full)
    if not matched or spec is None:
      continue
    if not isinstance(spec, QuantSpec):
      raise TypeError(f"{fn}: the rule for {full} gives a {type(spec).__name__}; "
                      "allowed: a jquant.QuantSpec or None.")
    ka = tuple(axes[r])
    if ka != tuple(range(ka[0], ka[-1] + 1)):
      raise ValueError(
          f"{fn}: {full!r} (shape {tuple(jnp.shape(leaf))}) is contracted over axes {ka}, which are not "
          "adjacent; a QArray packs adjacent contraction axes only. Keep it in float (a rule with spec None "
          "before the others) or lay the weight out with its contraction axes together.")
    targets[r] = (full, spec, ka)
  groups = [[r for r in g if r in targets] for g in groups]
  return targets, [g for g in groups if g]


def round_the_rest(out, new_flat, rules, found_axes, apply, params, example, importance=None) -> tuple:
  """Round-to-nearest for rule-selected float leaves no block matmul read; returns the tree and their paths.

  Each is quantized along the contraction axes its matmul uses where the
  model has one (``found_axes`` from the blocks, else read from the whole
  model: an untied head); a leaf no matmul contracts stays float.
  ``importance`` (``{path: weights}``, `jquant.quantize_params`) weights the
  searches of leaves whose spec searches (``clip`` "mse" / "fit").
  """
  rest = [p for p, v in new_flat.items()
          if not intercept.is_quantized(v) and hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating)
          and first_match(rules, p)[1] is not None]
  if not rest:
    return out, ()
  axes = dict(found_axes)
  if any(p not in axes for p in rest):
    # Contraction axes of the prefix's and suffix's matmuls (e.g. an untied head), read abstractly.
    from jquant.capture import CaptureError, contraction_axes
    try:
      axes = {**contraction_axes(apply, params, *example), **axes}
    except (CaptureError, intercept.InterceptError):
      pass  # a model capture cannot read as a whole: the rules' own axes apply
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    imp = {p: v for p, v in (importance or {}).items() if p in rest and first_match(rules, p)[1].clip != "minmax"}
    out = quantize_params(out, rules, axes={p: axes[p] for p in rest if p in axes}, importance=imp)
  return out, tuple(rest)


__all__ = ["check_rules", "check_rules_match", "model_params", "is_linen", "axis_spec", "Traced", "traced",
           "input_signature", "Runs", "round_the_rest"]
