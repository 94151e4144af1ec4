"""GPTQ over a whole model, one transformer block at a time.

`quantize_model` embeds the calibration windows once, then for each block:

1. records the input of every Dense layer with `jquant.capture` (inside a
   jitted step) and accumulates ``H = 2/N sum x x^T`` in float32, batch by
   batch; layers fed by the same array (q/k/v, gate/up) share one Hessian;
2. solves every kernel that a rule selects (`jquant.gptq.solve_codes`);
   kernels sharing a Hessian and a spec are solved as one matrix, their output
   columns side by side (columns are independent given H);
3. runs the *quantized* block on the stored inputs to produce the next block's
   inputs (sequential GPTQ: later blocks calibrate on what they will see).

Memory stays near one block's activations for the calibration set. Leaves a
rule selects outside the blocks' Dense kernels (e.g. an untied output head)
are quantized by round-to-nearest (`jquant.quantize_params`).

With a ``mesh``, the Hessian accumulation is data parallel (each device takes
a slice of the batch; the partial sums are ``psum``-ed) and each solve splits
its output columns over all mesh devices; the result equals the single-device
one.

Example:
    >>> import jax, jquant
    >>> m = jquant.models.llama_init(jquant.models.LlamaConfig(), jax.random.key(0))
    >>> calib = jax.random.randint(jax.random.key(1), (8, 64), 0, m.config.vocab_size)
    >>> spec = jquant.QuantSpec(bits=4, granularity="group", group_size=32)
    >>> rules = [jquant.Rule(r"layers_\\d+/(attn|mlp)/\\w+/kernel$", spec)]
    >>> qparams, report = jquant.gptq.quantize_model(m, m.params, calib, rules, progress=False,
    ...                                              return_report=True)
    >>> report.total_loss < report.total_rtn_loss
    True
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
import weakref
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from tqdm.auto import tqdm

from jquant.capture import capture_inputs
from jquant.gptq import core
from jquant.qarray import QArray, quantize
from jquant.spec import QuantSpec, Rule, first_match
from jquant.tree import quantize_params
from jquant.utils import get_path as _get, set_path as _set, path_str

SOLVER_OPTIONS = ("block_size", "damp", "act_order", "static_groups", "damp_tries", "damp_growth")


class LayerReport(NamedTuple):
  """One quantized kernel.

  Attributes:
    path: ``"layers_3/mlp/up/kernel"``.
    shape: Kernel shape ``(in, out)``.
    spec: Short description of its `QuantSpec`.
    loss: GPTQ's ``sum (w-q)^T H (w-q) / 2`` on the block's calibration inputs.
    rtn_loss: The same for round-to-nearest with the same spec and H.
    damp: Relative dampening used.
    seconds: Solve time (shared solves split by column count).
  """

  path: str
  shape: tuple
  spec: str
  loss: float
  rtn_loss: float
  damp: float
  seconds: float


@dataclasses.dataclass(frozen=True)
class GPTQReport:
  """Per-layer results of `quantize_model`; ``print(report)`` gives a table."""

  layers: tuple
  seconds: float
  rtn_leaves: tuple = ()
  tokens: int = 0

  @property
  def total_loss(self) -> float:
    return float(sum(l.loss for l in self.layers))

  @property
  def total_rtn_loss(self) -> float:
    return float(sum(l.rtn_loss for l in self.layers))

  def __str__(self):
    w = max([len(l.path) for l in self.layers] + [5])
    lines = [f"GPTQ: {len(self.layers)} kernels, {self.tokens} calibration tokens per Hessian, "
             f"{self.seconds:.1f}s",
             f"| {'layer':<{w}} | {'shape':>11} | {'spec':<16} | {'gptq loss':>10} | {'rtn loss':>10} | "
             f"{'ratio':>6} | {'damp':>6} |",
             f"|{'-' * (w + 2)}|{'-' * 13}|{'-' * 18}|{'-' * 12}|{'-' * 12}|{'-' * 8}|{'-' * 8}|"]
    for l in self.layers:
      ratio = l.loss / l.rtn_loss if l.rtn_loss > 0 else float("nan")
      shape = "x".join(str(s) for s in l.shape)
      lines.append(f"| {l.path:<{w}} | {shape:>11} | {l.spec:<16} | {l.loss:>10.4g} | {l.rtn_loss:>10.4g} | "
                   f"{ratio:>6.3f} | {l.damp:>6.3g} |")
    tot = self.total_loss / self.total_rtn_loss if self.total_rtn_loss > 0 else float("nan")
    lines.append(f"total loss {self.total_loss:.5g} vs RTN {self.total_rtn_loss:.5g} (ratio {tot:.3f})")
    if self.rtn_leaves:
      lines.append(f"round-to-nearest (no captured input): {', '.join(self.rtn_leaves)}")
    return "\n".join(lines)


class GPTQResult(NamedTuple):
  """``quantize_model(..., return_report=True)``: the quantized tree and its `GPTQReport`."""

  params: Any
  report: GPTQReport


def _spec_str(spec: QuantSpec) -> str:
  g = {"group": f"g{spec.group_size}", "channel": "chan", "tensor": "tensor"}[spec.granularity]
  return f"W{spec.bits} {g} {'sym' if spec.symmetric else 'asym'}{' mse' if spec.clip == 'mse' else ''}"


def _shared_groups(model, bp, hb) -> list[list[str]]:
  """Dense paths grouped by identity of the array they receive (found by tracing once)."""
  found = []

  def probe(bp, hb):
    out, xs = capture_inputs(model.block, bp, hb)
    xs = {k.removesuffix('/kernel'): v for k, v in xs.items()}
    groups: list[list[str]] = []
    for path, x in xs.items():
      for g in groups:
        if xs[g[0]] is x:
          g.append(path)
          break
      else:
        groups.append([path])
    found.append(groups)
    return out

  jax.eval_shape(probe, bp, hb)
  return found[0]


@functools.partial(jax.jit, static_argnames=("spec", "shapes", "dtypes"))
def _split_pack(codes, scale, zero, *, spec, shapes, dtypes):
  """Cuts a side-by-side solve back into one packed `QArray` per kernel."""
  out, start = [], 0
  for shape, dtype in zip(shapes, dtypes):
    width = int(np.prod(shape[1:]))
    if spec.granularity == "tensor":  # never solved side by side
      cut = lambda x: None if x is None else x.reshape((1,) * len(shape))
      c = codes.reshape(shape)
    else:
      cut = lambda x: None if x is None else x[:, start:start + width].reshape((x.shape[0],) + shape[1:])
      c = codes[:, start:start + width].reshape(shape)
    out.append(core.pack(core.Solution(c, cut(scale), cut(zero), None, None, None), spec, dtype))
    start += width
  return tuple(out)


@functools.partial(jax.jit, static_argnames=("spec",))
def _layer_losses(w, q, h, *, spec):
  return core.quant_loss(w, q, h), core.quant_loss(w, quantize(w, spec), h)


class _Steps(NamedTuple):
  embed: Any
  hess_step: Any
  block_fwd: Any


_STEPS: dict = {}


def _steps(model, mesh, data_axis) -> _Steps:
  """Jitted embed / Hessian / forward steps, cached per (model object, mesh).

  Repeated passes over one model (sweeps, tests) reuse the compiled steps. The
  functions hold the model only through a weak reference, and the cache entry
  goes away with the model.
  """
  key = (id(model), mesh, data_axis)
  hit = _STEPS.get(key)
  if hit is not None and hit[0]() is model:
    return hit[1]
  try:
    ref, cacheable = weakref.ref(model), True
  except TypeError:  # not weak-referenceable: no caching
    ref, cacheable = (lambda: model), False

  def data_parallel(fn, n_batch_args, out_specs):
    if mesh is None:
      return fn
    in_specs = (P(),) + (P(data_axis),) * n_batch_args
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

  embed = jax.jit(lambda p, t: ref().embed(p, t))

  @functools.partial(jax.jit, static_argnames=("reps",))
  def hess_step(bp, hb, wb, sums, reps):
    def local(bp, hb, wb):
      _, xs = capture_inputs(ref().block, bp, hb)
      xs = {k.removesuffix('/kernel'): v for k, v in xs.items()}
      out = {}
      for r in reps:
        st = core.hessian_update(core.hessian_init(xs[r].shape[-1]), xs[r], wb)
        out[r] = st if mesh is None else jax.tree_util.tree_map(lambda a: jax.lax.psum(a, data_axis), st)
      return out
    part = data_parallel(local, 2, P())(bp, hb, wb)
    return jax.tree_util.tree_map(jnp.add, sums, part)

  block_fwd = jax.jit(data_parallel(lambda bp, hb: ref().block(bp, hb), 1, P(data_axis)))
  steps = _Steps(embed, hess_step, block_fwd)
  if cacheable:
    weakref.finalize(model, _STEPS.pop, key, None)
    _STEPS[key] = (ref, steps)
  return steps


def _check_options(options):
  unknown = sorted(set(options) - set(SOLVER_OPTIONS))
  if unknown:
    raise TypeError(f"quantize_model: unknown solver options {unknown}; allowed: {list(SOLVER_OPTIONS)}.")


def quantize_model(model, params, calib_windows, rules: Sequence[Rule], *, batch_size: int = 8,
                   mesh: Optional[Mesh] = None, data_axis: Optional[str] = None, skip_positions: int = 0,
                   position_weights=None,
                   return_report: bool = False, progress: bool = True, verbose: Optional[bool] = None,
                   **solver_options):
  """GPTQ-quantizes every rule-selected Dense kernel of ``model``, block by block.

  Args:
    model: A jquant model with the block API (``embed``, ``block``,
      ``block_names``), e.g. `jquant.models.from_gguf()` or a toy
      `jquant.models.llama_init` model.
    params: Its float parameters.
    calib_windows: int token windows ``(N, T)``.
    rules: `jquant.Rule` list matched on paths like ``layers_3/attn/q/kernel``;
      the first match decides, spec None keeps a leaf in float.
    batch_size: Windows per jitted step.
    mesh: Optional `jax.sharding.Mesh`: data-parallel Hessians over
      ``data_axis``, output columns of each solve over all mesh axes.
    data_axis: Mesh axis the calibration batch is split over (default: the
      mesh's first axis).
    skip_positions: Leave the first positions of every window out of the
      Hessians (e.g. 1 for an attention sink at position 0).
    position_weights: Optional non-negative weight per window position
      ``(T,)`` for the Hessians (``H = 2 sum_t a_t x_t x_t^T / sum_t a_t``),
      e.g. a larger weight on position 0 to protect the attention sink.
    return_report: Return a `GPTQResult` ``(params, report)`` instead of the
      params alone.
    progress: A tqdm bar over blocks.
    verbose: Print the per-layer loss table at the end (default: ``progress``).
    **solver_options: Passed to `jquant.gptq.solve_codes`: ``block_size``,
      ``damp``, ``act_order``, ``static_groups``, ``damp_tries``,
      ``damp_growth``.

  Returns:
    The parameter tree with `QArray` kernels (or a `GPTQResult`).

  Raises:
    ValueError: bad windows or options, or a Hessian that no dampening makes
      positive definite (naming the layers and damp values tried).
  """
  _check_options(solver_options)
  verbose = progress if verbose is None else verbose
  rules = list(rules)
  for r in rules:
    if not isinstance(r, Rule):
      raise TypeError(f"quantize_model: rules must be jquant.Rule objects, got {type(r).__name__}.")
  calib = np.asarray(calib_windows)
  if calib.ndim != 2 or not np.issubdtype(calib.dtype, np.integer) or calib.shape[0] < 1:
    raise ValueError(f"quantize_model: calib_windows must be int tokens (N >= 1, T); got shape {calib.shape}, "
                     f"dtype {calib.dtype}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"quantize_model: batch_size={batch_size!r}; allowed: a positive int.")
  n, length = calib.shape
  if not isinstance(skip_positions, (int, np.integer)) or not 0 <= skip_positions < length:
    raise ValueError(f"quantize_model: skip_positions={skip_positions!r}; allowed: an int in 0..{length - 1}.")
  if position_weights is not None:
    position_weights = np.asarray(position_weights, np.float32)
    if position_weights.shape != (length,) or not np.all(position_weights >= 0) or not position_weights.any():
      raise ValueError(f"quantize_model: position_weights must be {length} non-negative floats (one per window "
                       f"position), not all zero; got shape {position_weights.shape}.")
  start = time.perf_counter()

  # Fixed batch shape (one compilation); with a mesh, a multiple of the data axis size.
  if mesh is not None:
    data_axis = data_axis or mesh.axis_names[0]
    if data_axis not in mesh.axis_names:
      raise ValueError(f"quantize_model: data_axis={data_axis!r}; allowed: one of {mesh.axis_names}.")
    n_data = mesh.shape[data_axis]
    batch_size = -(-batch_size // n_data) * n_data
  bsz = min(batch_size, n) if mesh is None else batch_size
  n_pad = -(-n // bsz) * bsz
  tokens = np.concatenate([calib, np.repeat(calib[:1], n_pad - n, axis=0)]).astype(np.int32)
  row_real = (np.arange(n_pad) < n).astype(np.float32)
  pos_w = (np.arange(length) >= skip_positions).astype(np.float32)
  if position_weights is not None:
    pos_w = pos_w * position_weights
  weights = jnp.asarray(row_real[:, None] * pos_w[None, :])  # (n_pad, T)
  batches = [slice(i, i + bsz) for i in range(0, n_pad, bsz)]

  steps = _steps(model, mesh, data_axis)
  embed, hess_step, block_fwd = steps.embed, steps.hess_step, steps.block_fwd
  h = jnp.concatenate([embed(params, tokens[sl]) for sl in batches])

  axis_names = None if mesh is None else tuple(mesh.axis_names)
  new_params = dict(params)
  reports = []
  names = list(model.block_names)
  bar = tqdm(names, desc="GPTQ", disable=not progress)
  for name in bar:
    bp = params[name]
    groups = _shared_groups(model, bp, h[:bsz])
    targets = {}
    for path in (p for g in groups for p in g):
      full = f"{name}/{path}/kernel"
      node = _get(bp, path)
      kernel = node.get("kernel") if isinstance(node, dict) else None
      if kernel is None or isinstance(kernel, QArray):
        continue
      matched, spec = first_match(rules, full)
      if matched and spec is not None:
        if not isinstance(spec, QuantSpec):
          raise TypeError(f"quantize_model: the rule for {full} gives a {type(spec).__name__}; "
                          "allowed: a jquant.QuantSpec or None.")
        targets[path] = spec
    groups = [[p for p in g if p in targets] for g in groups]
    groups = [g for g in groups if g]
    reps = tuple(g[0] for g in groups)

    qbp = bp
    if reps:
      sums = {r: core.hessian_init(_get(bp, r)["kernel"].shape[0]) for r in reps}
      for sl in batches:
        sums = hess_step(bp, h[sl], weights[sl], sums, reps=reps)
      opts = {k: solver_options.get(k, d) for k, d in (("damp", 0.01), ("damp_tries", 4), ("damp_growth", 10.0),
                                                       ("act_order", False))}
      for g, r in zip(groups, reps):
        hess = core.hessian_finalize(sums[r])
        # One factorization per Hessian, shared by all its kernels.
        fac = core.factor_hessian(hess, jnp.float32(opts["damp"]), act_order=bool(opts["act_order"]),
                                  damp_tries=int(opts["damp_tries"]), damp_growth=float(opts["damp_growth"]))
        # One solve per distinct spec: kernels sharing H and spec go side by side.
        by_spec: dict[QuantSpec, list[str]] = {}
        for p in g:
          by_spec.setdefault(targets[p], []).append(p)
        for spec, paths in by_spec.items():
          together = [paths] if spec.granularity != "tensor" else [[p] for p in paths]
          for part in together:
            kernels = [_get(bp, p)["kernel"] for p in part]
            widths = [int(np.prod(k.shape[1:])) for k in kernels]
            w_all = jnp.concatenate([k.reshape(k.shape[0], -1).astype(jnp.float32) for k in kernels], axis=1)
            t0 = time.perf_counter()
            try:
              sol = core.solve_codes(w_all, hess, spec, mesh=mesh, axis_names=axis_names, factor=fac,
                                     **solver_options)
            except ValueError as e:
              raise ValueError(f"quantize_model: {name} {part}: {e}") from None
            ok = bool(sol.ok)
            secs = time.perf_counter() - t0
            if not ok:
              raise core.damp_error(opts["damp"], opts["damp_tries"], opts["damp_growth"],
                                    where=f"quantize_model ({name}: {', '.join(part)})")
            offs = np.cumsum([0] + widths)
            qs = _split_pack(sol.codes, sol.scale, sol.zero_point, spec=spec,
                             shapes=tuple(tuple(k.shape) for k in kernels),
                             dtypes=tuple(np.dtype(k.dtype).name for k in kernels))
            for p, k, q, a, b in zip(part, kernels, qs, offs[:-1], offs[1:]):
              loss, rtn = _layer_losses(k, q, hess, spec=spec.replace(axis=0))
              reports.append(LayerReport(f"{name}/{p}/kernel", tuple(k.shape), _spec_str(spec), float(loss),
                                         float(rtn), float(sol.damp), secs * (b - a) / offs[-1]))
              qbp = _set(qbp, f"{p}/kernel", q)
      bar.set_postfix_str(f"loss/rtn {sum(l.loss for l in reports) / max(sum(l.rtn_loss for l in reports), 1e-30):.3f}")
    new_params[name] = qbp
    # Sequential: the next block sees the quantized block's outputs.
    h = jnp.concatenate([block_fwd(qbp, h[sl]) for sl in batches])

  # Whatever else the rules select (no captured input): round-to-nearest.
  before = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(
      new_params, is_leaf=lambda x: isinstance(x, QArray)) if isinstance(v, QArray)}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    out = quantize_params(new_params, rules)
  rtn_leaves = tuple(path_str(k) for k, v in jax.tree_util.tree_leaves_with_path(
      out, is_leaf=lambda x: isinstance(x, QArray)) if isinstance(v, QArray)
      and jax.tree_util.keystr(k) not in before)
  report = GPTQReport(tuple(reports), time.perf_counter() - start, rtn_leaves,
                      int(n * (length - skip_positions)))
  if verbose:
    print(report)
  return GPTQResult(out, report) if return_report else out
