"""W8A8 post-training quantization of any model: `calibrate` activations, then `convert`.

The flow, as pure functions over parameter trees, for any model (a Linen
module with its params, an NNX module, jquant's own models, or a function
``apply(params, *inputs)``):

1. ``stats = calibrate(model, params, calib, rules, observer=...)`` traces the
   model into its prefix, transformer blocks and suffix (`jquant.graph`;
   blocks are found from the parameter paths, ``blocks=`` names them with a
   regex), runs it piece by piece on calibration batches and folds the input
   of every matmul whose weight a rule selects into an observer state (see
   `jquant.observers`). Observer updates run inside the jitted step of each
   piece (alike blocks share one compiled step), so no activation leaves the
   device and memory stays near one block's activations. Statistics are keyed
   by the weight's full parameter path (``layers_0/attn/q/kernel``) and also
   record the axes each weight is contracted over, read from the model's own
   ops (``nn.Dense``: ``(0,)``; a ``DenseGeneral`` output projection
   ``(heads, head_dim, d)``: ``(0, 1)``; Gemma's query einsum
   ``(heads, d, head_dim)``: ``(1,)``).
2. ``qparams = convert(params, stats, rules)`` replaces each selected kernel
   by a `jquant.ops.W8A8Weight`: int8 weights quantized along the contraction
   axes, with one scale per output channel (per position of the free axes),
   and a static per-tensor activation scale (`jquant.ops.static_activation_scale`
   of the observer's ``amax``), or none for dynamic per-token activations.
3. Serve with ``jax.jit(jquant.quantized(apply))``: every matmul against a
   `W8A8Weight` runs int8 x int8 -> int32 through `jquant.ops.qdot` (the
   weight viewed as its (K, N) matrix), activations quantized by
   `jquant.ops.quantize_activations_per_token` / `quantize_activations_static`.

A rule says what to do per weight: its spec is a `W8A8Spec` (int8 weights
plus ``activations="static"`` or ``"dynamic"``), or ``None`` to keep the
weight in float.

Example:
  >>> import flax.linen as nn, jax, jquant
  >>> from jquant.calibrate import W8A8Spec, calibrate, convert
  >>> model = nn.Sequential([nn.Dense(64), nn.gelu, nn.Dense(16)])     # any Linen / NNX model, unmodified
  >>> x = jax.random.normal(jax.random.key(0), (32, 16))                 # calibration inputs: any pytree
  >>> params = model.init(jax.random.key(1), x)["params"]
  >>> rules = [jquant.Rule(r"kernel$", W8A8Spec(activations="static"))]
  >>> stats = calibrate(model, params, x, rules, progress=False)
  >>> sorted(stats.keys()), stats.axes["layers_2/kernel"]
  (['layers_0/kernel', 'layers_2/kernel'], (0,))
  >>> y = jax.jit(jquant.quantized(model.apply))({"params": convert(params, stats, rules)}, x)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jquant import blockpass, graph, intercept
from jquant import observers as obs_lib
from jquant.ops import W8A8Weight, static_activation_scale
from jquant.qarray import quantize
from jquant.spec import QuantSpec, Rule, first_match
from jquant.tokens import check_calibration_tokens
from jquant.tree import shard_like
from jquant.utils import check_finite, path_str

ACTIVATIONS = ("static", "dynamic")


@dataclasses.dataclass(frozen=True)
class W8A8Spec(QuantSpec):
  """A `QuantSpec` for int8 weights that also says how activations are quantized.

  The weight fields are those of `QuantSpec` (defaults: symmetric int8, per
  output channel). Weights must stay symmetric 8-bit per-channel or
  per-tensor so that the matmul can run on int8 codes. `convert` quantizes
  each weight along the axes the model contracts it over (recorded by
  `calibrate`, or given with ``axes=``), whatever ``axis`` says.

  Attributes:
    activations: ``"static"``: one per-tensor scale calibrated offline, a
      constant of the serving program; ``"dynamic"``: per-token scales
      computed at run time (no calibration needed).

  Example:
    >>> rules = [jquant.Rule(r"mlp/down", W8A8Spec(activations="dynamic")),
    ...          jquant.Rule(r"(attn|mlp)/\\w+/kernel$", W8A8Spec())]
  """

  activations: str = "static"

  def __post_init__(self):
    super().__post_init__()
    if self.activations not in ACTIVATIONS:
      raise ValueError(f"W8A8Spec: activations={self.activations!r}; allowed: {ACTIVATIONS}.")
    if self.bits != 8 or not self.symmetric or self.granularity == "group" or self.rounding != "nearest":
      raise ValueError(
          f"W8A8Spec: weights must be symmetric 8-bit, per-channel or per-tensor, nearest rounding; got "
          f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity!r}, "
          f"rounding={self.rounding!r}.")

  def weight_spec(self) -> QuantSpec:
    """The plain `QuantSpec` of the weights (what the stored `QArray` carries)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(QuantSpec)}
    return QuantSpec(**fields)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class ActivationStats:
  """Observer states of matmul inputs, keyed by the weight's parameter path (``layers_0/attn/q/kernel``).

  A pytree (the observer and the axes are static), so stats from several
  hosts or shards can be merged with `merge` or with the observer's
  collectives.

  Attributes:
    observer: The observer that produced ``states``.
    states: ``{weight path: observer state}``; the observed inputs are shaped
      ``(..., K)`` with the contracted axes flattened last (as
      `jquant.capture` records them), so per-channel states have ``(K,)``.
    axes: ``{weight path: the axes the model contracts the weight over}``
      (ascending), read from the model's own ops; `convert` quantizes along
      them.
  """

  observer: Any
  states: Mapping[str, Any]
  axes: Mapping[str, tuple] = dataclasses.field(default_factory=dict)

  def tree_flatten(self):
    keys = tuple(sorted(self.states))
    return tuple(self.states[k] for k in keys), (self.observer, keys, tuple(sorted(self.axes.items())))

  @classmethod
  def tree_unflatten(cls, aux, children):
    observer, keys, axes = aux
    return cls(observer, dict(zip(keys, children)), dict(axes))

  def __len__(self):
    return len(self.states)

  def __contains__(self, path):
    return path in self.states

  def __getitem__(self, path):
    return self.states[path]

  def keys(self):
    return self.states.keys()

  def amax(self) -> dict:
    """``{weight path: clipping value}`` (scalar per tensor, ``(K,)`` per channel)."""
    return {k: self.observer.amax(s) for k, s in self.states.items()}

  def merge(self, other: "ActivationStats") -> "ActivationStats":
    """Stats of this data followed by ``other``'s (same observer, same layers)."""
    if other.observer != self.observer or set(other.states) != set(self.states):
      raise ValueError("ActivationStats.merge: both stats need the same observer and the same layers; got "
                       f"{self.observer} / {other.observer} over {len(self)} / {len(other)} layers.")
    clash = sorted(k for k in set(self.axes) & set(other.axes) if tuple(self.axes[k]) != tuple(other.axes[k]))
    if clash:
      raise ValueError(f"ActivationStats.merge: the two stats contract {clash[:4]} over different axes "
                       f"({[self.axes[k] for k in clash[:4]]} vs {[other.axes[k] for k in clash[:4]]}); "
                       "allowed: stats of the same model.")
    return ActivationStats(self.observer, {k: self.observer.merge(s, other.states[k])
                                           for k, s in self.states.items()}, {**other.axes, **self.axes})

  def with_observer(self, observer) -> "ActivationStats":
    """Reads the same states through another observer of the same state type.

    One histogram pass serves min-max (``PercentileObserver(percentile=100)``),
    any percentile and the MSE range.
    """
    if type(observer.init((1,))) is not type(self.observer.init((1,))):
      raise ValueError(f"ActivationStats.with_observer: {observer} does not read the states of "
                       f"{self.observer}; allowed: an observer with the same state type.")
    return ActivationStats(observer, self.states, self.axes)


# ---------------------------------------------------------------------------
# Checks.


def _context_length(model) -> Optional[int]:
  cfg = getattr(model, "config", None)
  for name in ("max_seq_len", "max_len", "max_length", "context_length", "max_position_embeddings"):
    v = getattr(cfg, name, None)
    if v is not None:
      return int(v)
  return None


def _check_context(model, tokens, fn: str):
  """Token windows (int, (n, length)) must fit the model's context, where its config says it."""
  shape, dtype = np.shape(tokens), getattr(tokens, "dtype", None)
  if dtype is None or not np.issubdtype(np.dtype(dtype), np.integer) or len(shape) != 2:
    return
  max_len = _context_length(model)
  if max_len is not None and shape[1] > max_len:
    raise ValueError(f"{fn}: windows have length {shape[1]}, longer than the model's context "
                     f"({max_len} tokens); allowed: length <= {max_len}.")


def _selected(rules, path: str) -> bool:
  matched, spec = first_match(rules, path)
  return matched and spec is not None


def _norm(path: str) -> str:
  """Stats keys are relative to the parameters: a leading Linen ``params/`` collection is dropped."""
  return path.removeprefix("params/")


def _weight_k(leaf, axes) -> int:
  shape = intercept.logical_struct(leaf).shape if intercept.is_quantized(leaf) else jnp.shape(leaf)
  return int(np.prod([shape[a] for a in axes]))


# ---------------------------------------------------------------------------
# calibrate.


def calibrate(model, params, calib, rules: Sequence[Rule], *, observer=None, batch_size: int = 8,
              blocks: Optional[str] = None, skip_positions: int = 0, progress: bool = True) -> ActivationStats:
  """Runs any model on calibration data and observes the inputs of the selected matmuls.

  The model is traced (`jquant.graph.trace`, once per distinct batch shape:
  a shorter last batch gets its own program) and run piece by piece:
  its prefix (embedding...), each transformer block, and its suffix (only
  when a selected weight lives there). Each piece is one jitted step that
  records the inputs of its matmuls (`jquant.capture`'s mechanism) and folds
  them into the observer states on device; alike blocks share the compiled
  step. A model without repeated blocks (one ``nn.Dense``, a small MLP) runs
  as one piece.

  Args:
    model: A Linen module (with ``params``), an NNX module (its state is the
      params), jquant's own model, or a function ``apply(params, *inputs)``.
    params: Its float parameters (for Linen, ``model.init(...)["params"]``;
      a ``{"params": ...}`` variables dict is unwrapped); None for an NNX
      module or a model holding its own (``.params``).
    calib: Calibration inputs: an array (or a pytree of arrays sharing a
      leading axis) split into batches of ``batch_size`` along axis 0, or a
      list of batches, each a tuple of the model's positional inputs (token
      ids, embeddings, images; see `jquant.graph.batches`). Integer token
      windows ``(n, length)`` must fit the model's context where its
      ``config`` says it.
    rules: `jquant.Rule` list; a matmul's input is observed when the first
      rule matching its weight's path has a spec (not ``None``).
    observer: A `jquant.observers` observer; default per-tensor min-max.
    batch_size: Examples per step when ``calib`` is split.
    blocks: Optional regex naming the transformer blocks on parameter paths
      (see `jquant.graph.find_blocks`); by default repeated numbered
      submodules (``layers_0..N``, ``blocks/3``, ``layer_0``) are found.
    skip_positions: Leave the first ``skip_positions`` positions (axis 1 of
      inputs shaped ``(batch, positions, K)``) out of the statistics
      (position 0 is an attention sink with massive activations when windows
      start without BOS).
    progress: Show a tqdm bar.

  Returns:
    `ActivationStats` keyed by the weights' full parameter paths, with the
    contraction axes of each.

  Raises:
    ValueError: empty calibration data, windows longer than the context,
      rules that select no matmul weight (the message lists the weights
      found), a bad ``batch_size`` / ``skip_positions``; parameters holding
      NaN or inf (naming every such leaf, checked up front); observed
      activations holding NaN or inf (counted on device inside the compiled
      steps, then raised naming every layer whose input held them, in model
      order); token ids outside the model's vocabulary (jquant's models).
    jquant.graph.GraphError: ``blocks`` matches nothing, or the blocks do not
      run one after the other.

  Example:
    >>> stats = calibrate(model, params, tokens, [jquant.Rule(r"kernel$", W8A8Spec())], batch_size=4)
    >>> stats.axes["layers_0/attn/o/kernel"]       # a DenseGeneral (heads, head_dim, d) output projection
    (0, 1)
  """
  rules = blockpass.check_rules(rules, "calibrate")
  apply, params, _ = blockpass.model_params(model, params, "calibrate")  # a Linen {"params": ...} unwrapped
  check_finite(params, "calibrate", "params", "Fix these weights before calibrating.")
  check_calibration_tokens(model, calib, fn="calibrate")
  check_finite({"calib": calib}, "calibrate", "the calibration inputs",
               "Clean the calibration data; every example must be finite.")
  data = graph.batches(calib, batch_size, fn="calibrate")
  for leaf in jax.tree_util.tree_leaves(data[0]):
    _check_context(model, leaf, "calibrate")
  if isinstance(skip_positions, bool) or not isinstance(skip_positions, (int, np.integer)) or skip_positions < 0:
    raise ValueError(f"calibrate: skip_positions={skip_positions!r}; allowed: an int >= 0.")
  observer = obs_lib.MinMaxObserver() if observer is None else observer

  def observed(path, x):
    if skip_positions:
      if x.ndim < 3 or x.shape[1] <= skip_positions:
        raise ValueError(f"calibrate: skip_positions={skip_positions} needs inputs shaped (batch, positions, K) "
                         f"with more than {skip_positions} positions; the input of {path!r} has shape "
                         f"{tuple(x.shape)}.")
      x = x[:, skip_positions:]
    return x

  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=intercept.is_quantized)[0]
  paths = [path_str(kp) for kp, leaf in leaves if jnp.ndim(intercept.logical_struct(leaf)
                                                           if intercept.is_quantized(leaf) else leaf) >= 1]
  try:
    graph.find_blocks(paths, blocks)
    whole = False
  except graph.GraphError:
    if blocks is not None:
      raise
    whole = True
  if whole:
    states, axes, bad = _calibrate_whole(apply, params, data, rules, observer, observed, progress)
  else:
    states, axes, bad = _calibrate_blocks(apply, params, data, rules, observer, observed, blocks, progress)
  _raise_nonfinite(bad)
  return ActivationStats(observer, {_norm(k): v for k, v in states.items()},
                         {_norm(k): v for k, v in axes.items()})


def _observe(observer, observed):
  """``(state, non-finite count), path, x -> (updated state, count)``: observes ``x`` and counts its NaN/inf on device.

  Observers drop or zero non-finite values (`MinMaxObserver.amax` maps them to 0), so the count is what
  lets `calibrate` refuse them instead of calibrating a silently wrong scale.
  """

  def update(entry, path, x):
    state, bad = entry
    x = observed(path, x)
    n = jnp.sum(~jnp.isfinite(x)).astype(jnp.int32) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32(0)
    return observer.update(state, x), bad + n

  return update


def _raise_nonfinite(bad: dict):
  """Raises naming every observed input that held NaN or inf (``bad``: {path: count}), in model order."""
  found = [(p, int(n)) for p, n in bad.items() if int(n)]
  if found:
    where = ", ".join(f"{p} ({n} value{'s' if n > 1 else ''})" for p, n in found[:8])
    more = f" and {len(found) - 8} more" if len(found) > 8 else ""
    raise ValueError(f"calibrate: the calibration activations hold non-finite values (NaN or inf) at the inputs of "
                     f"{where}{more}; allowed: finite values only. The first layer listed is where they start: check "
                     "the calibration data, the weights before it and float16/bfloat16 overflow.")


def _no_selection(rules, found: dict):
  return ValueError(f"calibrate: rules {[r.pattern for r in rules]} select no matmul weight; the model's "
                    f"matmul weights are {sorted(found)[:8]}{' ...' if len(found) > 8 else ''}. Patterns are "
                    "re.search-ed on '/'-joined parameter paths.")


def _calibrate_blocks(apply, params, data, rules, observer, observed, blocks, progress):
  """Piece by piece; one traced program per distinct batch shape (a shorter last batch gets its own)."""

  update = _observe(observer, observed)

  def reduce(outs, inputs, st):
    return outs, {r: update(e, r, inputs[r]) for r, e in st.items()}

  programs: dict = {}
  states, axes, found, bad = {}, {}, {}, {}
  bar = None
  for batch in data:
    sig = blockpass.input_signature(batch)
    entry = programs.get(sig)
    if entry is None:
      prog = graph.trace(apply, params, *batch, blocks=blocks)
      flat = dict(zip(prog.param_paths, graph._flat_params(params)))
      # What each piece reads after it: state entries no later piece needs are dropped.
      needed_after, acc = [], set()
      for seg in reversed(prog.segments):
        needed_after.append(set(acc))
        acc |= set(seg.state_in)
      entry = programs[sig] = {"prog": prog, "flat": flat, "needed": needed_after[::-1], "plan": None}
    prog, flat, segs = entry["prog"], entry["flat"], entry["prog"].segments
    if bar is None:
      bar = tqdm(total=len(data) * len(segs), desc="calibrate", unit="piece", disable=not progress)
    planning = entry["plan"] is None
    if planning:
      entry["plan"], by_key = [], {}
    state = prog._input_state(batch)
    for i, seg in enumerate(segs):
      if planning:  # which matmuls this piece has and which the rules select (one abstract pass per kind)
        if seg.key not in by_key:
          by_key[seg.key] = prog.matmuls(seg, flat, state)[0]
        full = dict(zip(seg.rel, seg.params))
        sel = {}
        for rel, ax in by_key[seg.key].items():
          path = full.get(rel, rel.lstrip("/"))
          found[path] = tuple(ax)
          if _selected(rules, path):
            sel[rel] = path
            axes[path] = tuple(ax)
            if path not in states:
              states[path] = observer.init((_weight_k(flat[path], ax),))
              bad[path] = jnp.int32(0)
        entry["plan"].append(sel)
        if i == len(segs) - 1 and not states:
          bar.close()
          raise _no_selection(rules, found)
      sel = entry["plan"][i]
      if seg.name == "suffix" and not sel:
        bar.update(1)
        continue
      run = prog.jitted(seg, reduce, record=True)
      outs, new = run(prog.block_params(flat, seg), graph.state_list(seg, state),
                      {rel: (states[p], bad[p]) for rel, p in sel.items()})
      for rel, p in sel.items():
        states[p], bad[p] = new[rel]
      state = graph.updated(seg, state, outs)
      state = {k: v for k, v in state.items() if k in entry["needed"][i]}
      bar.update(1)
  bar.close()
  return states, axes, bad


def _calibrate_whole(apply, params, data, rules, observer, observed, progress):
  from jquant import capture

  found = {k: tuple(v) for k, v in capture.contraction_axes(apply, params, *data[0]).items()}
  flat = {_norm(path_str(kp)): leaf for kp, leaf in
          jax.tree_util.tree_flatten_with_path(params, is_leaf=intercept.is_quantized)[0]}
  found = {k: v for k, v in found.items() if k in flat}  # float inputs of rank >= 2 are not weights
  axes = {k: v for k, v in found.items() if _selected(rules, k)}
  if not axes:
    raise _no_selection(rules, found)
  entries = {k: (observer.init((_weight_k(flat[k], ax),)), jnp.int32(0)) for k, ax in axes.items()}
  update = _observe(observer, observed)

  @jax.jit
  def step(p, st, *inputs):
    c = capture.capture(apply, p, *inputs)
    return {k: update(e, k, c.inputs[k]) for k, e in st.items()}

  for batch in tqdm(data, desc="calibrate", unit="batch", disable=not progress):
    entries = step(params, entries, *batch)
  return {k: e[0] for k, e in entries.items()}, axes, {k: e[1] for k, e in entries.items()}


# ---------------------------------------------------------------------------
# convert.


def _spec_activations(spec: QuantSpec) -> str:
  return spec.activations if isinstance(spec, W8A8Spec) else "static"


def _weight_spec(spec: QuantSpec, path: str) -> QuantSpec:
  if isinstance(spec, W8A8Spec):
    return spec.weight_spec()
  if spec.bits != 8 or not spec.symmetric or spec.granularity == "group":
    raise ValueError(f"convert: leaf {path!r} has spec {spec}; allowed: W8A8Spec, or a symmetric 8-bit "
                     "per-channel/per-tensor QuantSpec (use jquant.quantize_params for weight-only specs).")
  return spec


def act_scale_from_amax(amax) -> jax.Array:
  """Per-tensor static int8 scale from an observed ``max|x|``: `jquant.ops.static_activation_scale`."""
  return static_activation_scale(amax)


def convert(params, stats: Optional[ActivationStats], rules: Sequence[Rule], *,
            axes: Optional[Mapping[str, Any]] = None):
  """Replaces the selected kernels by int8 `jquant.ops.W8A8Weight` s.

  Each weight is quantized along the axes the model contracts it over: from
  ``axes``, else from ``stats`` (`calibrate` records them), else, for a 2-D
  kernel, along the spec's ``axis`` (0: a Dense ``(in, out)`` kernel). The
  per-channel scales then run over the weight's free axes (one per output
  feature; for ``DenseGeneral``'s ``(d, heads, head_dim)`` one per
  ``(head, dim)``), which is what `jquant.quantized` needs to run the weight
  as its int8 (K, N) matrix.

  Args:
    params: Float parameters (the same tree `calibrate` saw, or a smoothed one
      whose stats were taken after smoothing); a Linen ``{"params": ...}``
      dict is fine (paths may carry a leading ``params/``).
    stats: `ActivationStats` from `calibrate` (may be None when every rule is
      dynamic). Per-channel stats are reduced to one per-tensor scale.
    rules: `jquant.Rule` list with `W8A8Spec` (or plain symmetric int8)
      specs; ``None`` keeps a leaf in float.
    axes: Optional ``{path: contraction axes}``, e.g.
      ``jquant.capture.contraction_axes(apply, params, *example_inputs)``;
      needed for N-D kernels when ``stats`` is None (all-dynamic rules).

  Returns:
    The tree with selected kernels replaced by `W8A8Weight(weight, act_scale)`
    (``act_scale`` None for dynamic). Run it with
    ``jax.jit(jquant.quantized(apply))``. A kernel sharded over a mesh gives
    int8 weights laid out like it (`jquant.sharding.qarray_shardings`).

  Raises:
    ValueError: a static layer has no statistics, a spec is not int8, an N-D
      kernel has no known contraction axes, or the rules select nothing;
      a selected weight or a statistic holding NaN or inf (naming its path).

  Example:
    >>> qparams = convert(params, stats, rules)
    >>> y = jax.jit(jquant.quantized(model.apply))({"params": qparams}, x)
  """
  rules = blockpass.check_rules(rules, "convert")
  if stats is not None and not isinstance(stats, ActivationStats):
    raise TypeError(f"convert: stats must be jquant.calibrate.ActivationStats or None, got "
                    f"{type(stats).__name__}.")
  amax = stats.amax() if stats is not None else {}
  check_finite(amax, "convert", "the activation statistics (stats.amax())",
               "Calibrate on finite data (jquant.calibrate refuses NaN/inf activations).")
  known = dict(stats.axes) if stats is not None else {}
  known.update({str(k).removeprefix("params/"): tuple(v) for k, v in (axes or {}).items()})
  n_done = [0]

  def visit(keypath, leaf):
    if intercept.is_quantized(leaf) or not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)):
      return leaf
    path = path_str(keypath)
    key = path.removeprefix("params/")
    matched, spec = first_match(rules, path)
    if not matched or spec is None:
      return leaf
    wspec = _weight_spec(spec, path)
    k_axes = known.get(key)
    if k_axes is not None:
      wspec = wspec.replace(axis=tuple(k_axes) if len(k_axes) > 1 else k_axes[0])
    elif leaf.ndim != 2:
      raise ValueError(f"convert: leaf {path!r} has shape {tuple(leaf.shape)} and no known contraction axes; "
                       "allowed: a 2-D (in, out) kernel, or pass axes=jquant.capture.contraction_axes(apply, "
                       "params, *example_inputs) (calibrate's stats carry them too). Narrow the rule patterns "
                       "to kernels otherwise.")
    try:
      q = shard_like(quantize(leaf, wspec), getattr(leaf, "sharding", None))  # a sharded kernel: laid out alike
    except (ValueError, TypeError) as e:
      raise type(e)(f"convert: leaf {path!r} (shape {tuple(leaf.shape)}): {e}") from None
    n_done[0] += 1
    if _spec_activations(spec) == "dynamic":
      return W8A8Weight(q, None)
    if key not in amax:
      raise ValueError(f"convert: no activation statistics for static layer {path!r}; run calibrate with the "
                       "same rules (or give it a dynamic W8A8Spec).")
    return W8A8Weight(q, static_activation_scale(amax[key]))

  out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=intercept.is_quantized)
  if n_done[0] == 0:
    raise ValueError(f"convert: rules {[r.pattern for r in rules]} selected no float kernel.")
  return out


__all__ = ["W8A8Spec", "ActivationStats", "calibrate", "convert", "act_scale_from_amax", "ACTIVATIONS"]
