"""W8A8 post-training quantization: `calibrate` activations, then `convert`.

The flow, as pure functions over parameter trees:

1. ``stats = calibrate(model, params, windows, rules, observer=...)`` runs the
   model block by block on calibration windows, records every selected Dense
   input with `jquant.capture.capture_inputs`, and folds it into an observer
   state (see `jquant.observers`).
2. ``qparams = convert(params, stats, rules)`` replaces each selected kernel
   by a `jquant.ops.W8A8Weight`: int8 per-channel weights plus a static
   per-tensor activation scale (``amax / 127`` from the observer), or no scale
   for dynamic per-token activations. The models' ``qdot`` then runs an
   int8 x int8 -> int32 matmul.
3. ``jquant.footprint(qparams)``, ``jquant.save(path, qparams)``.

A rule says what to do per Dense layer: its spec is a `W8A8Spec` (int8 weights
plus ``activations="static"`` or ``"dynamic"``), or ``None`` to keep the layer
in float.

Example:
  >>> import jax, jquant
  >>> from jquant.calibrate import W8A8Spec, calibrate, convert
  >>> m = jquant.models.llama_init(jquant.models.LlamaConfig(), jax.random.key(0))
  >>> windows = jax.random.randint(jax.random.key(1), (4, 32), 0, m.config.vocab_size)
  >>> rules = [jquant.Rule(r"(attn|mlp)/\\w+/kernel$", W8A8Spec(activations="static"))]
  >>> stats = calibrate(m, m.params, windows, rules)
  >>> qparams = convert(m.params, stats, rules)
  >>> logits = m.apply(qparams, windows)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jquant import observers as obs_lib
from jquant.ops import W8A8Weight
from jquant.qarray import QArray, quantize
from jquant.spec import QuantSpec, Rule, first_match
from jquant.utils import path_str

ACTIVATIONS = ("static", "dynamic")
_MIN_AMAX = 1e-8  # a layer whose input was all zeros still gets a finite, positive scale


@dataclasses.dataclass(frozen=True)
class W8A8Spec(QuantSpec):
  """A `QuantSpec` for int8 weights that also says how activations are quantized.

  The weight fields are those of `QuantSpec` (defaults: symmetric int8, per
  output channel, contraction axis 0). Weights must stay symmetric 8-bit
  per-channel or per-tensor so that the matmul can run on int8 codes.

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
  """Observer states of Dense inputs, keyed by kernel path (``layers_0/attn/q/kernel``).

  A pytree (the observer is static), so stats from several hosts or shards can
  be merged with `merge` or with the observer's collectives.

  Attributes:
    observer: The observer that produced ``states``.
    states: ``{kernel path: observer state}``.
  """

  observer: Any
  states: Mapping[str, Any]

  def tree_flatten(self):
    keys = tuple(sorted(self.states))
    return tuple(self.states[k] for k in keys), (self.observer, keys)

  @classmethod
  def tree_unflatten(cls, aux, children):
    observer, keys = aux
    return cls(observer, dict(zip(keys, children)))

  def __len__(self):
    return len(self.states)

  def __contains__(self, path):
    return path in self.states

  def __getitem__(self, path):
    return self.states[path]

  def keys(self):
    return self.states.keys()

  def amax(self) -> dict:
    """``{kernel path: clipping value}`` (scalar per tensor, ``(K,)`` per channel)."""
    return {k: self.observer.amax(s) for k, s in self.states.items()}

  def merge(self, other: "ActivationStats") -> "ActivationStats":
    """Stats of this data followed by ``other``'s (same observer, same layers)."""
    if other.observer != self.observer or set(other.states) != set(self.states):
      raise ValueError("ActivationStats.merge: both stats need the same observer and the same layers; got "
                       f"{self.observer} / {other.observer} over {len(self)} / {len(other)} layers.")
    return ActivationStats(self.observer, {k: self.observer.merge(s, other.states[k])
                                           for k, s in self.states.items()})

  def with_observer(self, observer) -> "ActivationStats":
    """Reads the same states through another observer of the same state type.

    One histogram pass serves min-max (``PercentileObserver(percentile=100)``),
    any percentile and the MSE range.
    """
    if type(observer.init((1,))) is not type(self.observer.init((1,))):
      raise ValueError(f"ActivationStats.with_observer: {observer} does not read the states of "
                       f"{self.observer}; allowed: an observer with the same state type.")
    return ActivationStats(observer, self.states)


def _check_windows(model, windows, fn: str):
  if windows is None:
    raise ValueError(f"{fn}: windows is None; allowed: an int array (n_windows, length) with n_windows >= 1.")
  w = np.asarray(windows)
  if w.ndim != 2:
    raise ValueError(f"{fn}: windows has shape {w.shape}; allowed: an int array (n_windows, length).")
  if w.shape[0] == 0:
    raise ValueError(f"{fn}: windows is empty (shape {w.shape}); allowed: at least one calibration window.")
  if not np.issubdtype(w.dtype, np.integer):
    raise ValueError(f"{fn}: windows has dtype {w.dtype}; allowed: integer token ids.")
  max_len = _context_length(model)
  if max_len is not None and w.shape[1] > max_len:
    raise ValueError(f"{fn}: windows have length {w.shape[1]}, longer than the model's context "
                     f"({max_len} tokens); allowed: length <= {max_len}.")
  if w.shape[1] == 0:
    raise ValueError(f"{fn}: windows have length 0; allowed: length >= 1.")
  return w


def _context_length(model) -> Optional[int]:
  cfg = getattr(model, "config", None)
  for name in ("max_seq_len", "max_len", "max_length", "context_length", "max_position_embeddings"):
    v = getattr(cfg, name, None)
    if v is not None:
      return int(v)
  return None


def _block_rules(rules, block: str, keys) -> tuple:
  """Capture keys (``attn/q``) of ``block`` whose kernel a rule quantizes."""
  out = []
  for k in keys:
    matched, spec = first_match(rules, f"{block}/{k}/kernel")
    if matched and spec is not None:
      out.append(k)
  return tuple(out)


def _check_rules(rules, fn: str):
  rules = list(rules)
  for r in rules:
    if not isinstance(r, Rule):
      raise TypeError(f"{fn}: rules must be jquant.Rule objects, got {type(r).__name__}.")
  return rules


def _dense_keys(inputs):
  return {k.removesuffix("/kernel"): v for k, v in inputs.items()}


def _dense_capture(capture, fn, *args):
  out, inputs = capture.capture_inputs(fn, *args)
  return out, _dense_keys(inputs)


def _capture():
  from jquant import capture  # the one Dense-input capture mechanism of the library
  return capture


def calibrate(model, params, windows, rules: Sequence[Rule], *, observer=None, batch_size: int = 8,
              skip_positions: int = 0, progress: bool = True) -> ActivationStats:
  """Runs ``model`` on calibration windows and observes the selected Dense inputs.

  The model runs one block at a time (``embed``, ``block`` for every name in
  ``block_names``), with `jquant.capture.capture_inputs` recording the
  inputs of the block's Dense layers; observer updates run inside the same
  jitted step, so no activation leaves the device.

  Args:
    model: A jquant model (``embed``, ``block``, ``block_names``, ``config``).
    params: Its float parameters.
    windows: Int token ids (n_windows, length), length at most the model's
      context.
    rules: `jquant.Rule` list; a Dense layer is observed when the first rule
      matching ``<block>/<layer>/kernel`` has a spec (not ``None``).
    observer: A `jquant.observers` observer; default per-tensor min-max.
    batch_size: Windows per step.
    skip_positions: Leave the first ``skip_positions`` positions of every window out of
      the statistics (position 0 is an attention sink with massive
      activations when windows start without BOS).
    progress: Show a tqdm bar.

  Returns:
    `ActivationStats` keyed by kernel path.

  Raises:
    ValueError: empty windows, windows longer than the context, or rules that
      select no Dense layer.
  """
  rules = _check_rules(rules, "calibrate")
  w = _check_windows(model, windows, "calibrate")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"calibrate: batch_size={batch_size!r}; allowed: a positive int.")
  if not isinstance(skip_positions, (int, np.integer)) or not 0 <= skip_positions < w.shape[1]:
    raise ValueError(f"calibrate: skip_positions={skip_positions!r}; allowed: an int in [0, {w.shape[1]}).")
  observer = obs_lib.MinMaxObserver() if observer is None else observer
  capture = _capture()
  names = list(model.block_names)

  # Which Dense inputs each block has: trace one block abstractly.
  h_shape = jax.eval_shape(model.embed, params, jnp.asarray(w[:1]))
  _, in_shapes = jax.eval_shape(lambda bp, h: _dense_capture(capture, model.block, bp, h), params[names[0]],
                                h_shape)
  observed = {b: _block_rules(rules, b, sorted(in_shapes)) for b in names}
  if not any(observed.values()):
    raise ValueError(f"calibrate: rules {[r.pattern for r in rules]} select no Dense layer; paths look like "
                     f"{names[0]}/{sorted(in_shapes)[0]}/kernel.")

  def init_states(keys):
    return {k: observer.init(in_shapes[k].shape) for k in keys}

  states = {b: init_states(observed[b]) for b in names}

  @jax.jit
  def embed(p, tokens):
    return model.embed(p, tokens)

  @jax.jit
  def step(block_params, h, st):
    out, inputs = capture.capture_inputs(model.block, block_params, h)
    inputs = _dense_keys(inputs)
    new = {}
    for k, s in st.items():
      x = inputs[k]
      if skip_positions:
        x = x[:, skip_positions:]
      new[k] = observer.update(s, x)
    return out, new

  n = w.shape[0]
  starts = range(0, n, batch_size)
  bar = tqdm(total=len(starts) * len(names), desc="calibrate", unit="block", disable=not progress)
  for s0 in starts:
    h = embed(params, jnp.asarray(w[s0:s0 + batch_size]))
    for b in names:
      h, states[b] = step(params[b], h, states[b])
      bar.update(1)
  bar.close()
  flat = {f"{b}/{k}/kernel": s for b in names for k, s in states[b].items()}
  return ActivationStats(observer, flat)


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
  """Per-tensor static int8 scale ``max(amax) / 127`` (float32 scalar)."""
  a = jnp.max(jnp.asarray(amax, jnp.float32))
  return jnp.maximum(a, _MIN_AMAX) / 127.0


def convert(params, stats: Optional[ActivationStats], rules: Sequence[Rule]):
  """Replaces the selected Dense kernels by int8 `jquant.ops.W8A8Weight` s.

  Args:
    params: Float parameters (the same tree `calibrate` saw, or a smoothed one
      whose stats were taken after smoothing).
    stats: `ActivationStats` from `calibrate` (may be None when every rule is
      dynamic). Per-channel stats are reduced to one per-tensor scale.
    rules: `jquant.Rule` list with `W8A8Spec` (or plain symmetric int8)
      specs; ``None`` keeps a leaf in float.

  Returns:
    The tree with selected kernels replaced by `W8A8Weight(weight, act_scale)`
    (``act_scale`` None for dynamic).

  Raises:
    ValueError: a static layer has no statistics, or a spec is not int8.
  """
  rules = _check_rules(rules, "convert")
  amax = stats.amax() if stats is not None else {}
  n_done = [0]

  def visit(keypath, leaf):
    if isinstance(leaf, (QArray, W8A8Weight)) or not (hasattr(leaf, "dtype") and
                                                      jnp.issubdtype(leaf.dtype, jnp.floating)):
      return leaf
    path = path_str(keypath)
    matched, spec = first_match(rules, path)
    if not matched or spec is None:
      return leaf
    if leaf.ndim != 2:
      raise ValueError(f"convert: leaf {path!r} has shape {tuple(leaf.shape)}; allowed: a 2-D Dense kernel "
                       "(in, out). Narrow the rule patterns to kernels.")
    q = quantize(leaf, _weight_spec(spec, path))
    n_done[0] += 1
    if _spec_activations(spec) == "dynamic":
      return W8A8Weight(q, None)
    if path not in amax:
      raise ValueError(f"convert: no activation statistics for static layer {path!r}; run calibrate with the "
                       "same rules (or give it a dynamic W8A8Spec).")
    return W8A8Weight(q, act_scale_from_amax(amax[path]))

  out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: isinstance(x, (QArray, W8A8Weight)))
  if n_done[0] == 0:
    raise ValueError(f"convert: rules {[r.pattern for r in rules]} selected no float 2-D kernel.")
  return out
