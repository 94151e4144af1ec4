"""GPTQ over any model, one transformer block at a time.

`quantize_model` takes a model as data (`jquant.graph`): a Linen module with
its params, an NNX module, jquant's own models, or an apply function. The
model's program is traced once and cut into a prefix, one segment per block
(found from the parameter paths: ``layers_0..N``, ``blocks/3``, ``layer_0``,
or a user regex ``blocks=``) and a suffix. Then, for each block:

1. the block runs on the stored calibration state with every matmul input
   recorded (`jquant.capture`'s interpreter) and ``H = 2/N sum x x^T`` is
   accumulated in float32 on device, batch by batch, inside one compiled step
   shared by all alike blocks; layers that read the same array (q/k/v,
   gate/up) share one Hessian;
2. every rule-selected weight is solved by `jquant.gptq.solve_codes` on its
   ``(K, N)`` matrix view (`jquant.qarray.to_matrix` over the contraction
   axes the model's own ``dot_general`` uses, so ``nn.DenseGeneral`` and
   ``nn.Einsum`` kernels need no per-leaf axes); weights sharing a Hessian
   and a spec are solved as one matrix, their output columns side by side
   (columns are independent given H), and packed back into `QArray` s along
   those axes, which `jquant.quantized` runs packed;
3. the *quantized* block produces the next block's state (sequential GPTQ:
   later blocks calibrate on what they will see).

The walk itself (tracing, running the batches block by block, picking each
block's targets) is `jquant.blockpass`, shared with `jquant.blockwise`.

Memory stays near one block's activations for the calibration set. Leaves a
rule selects that no block matmul reads (an untied output head, an embedding)
are quantized by round-to-nearest (`jquant.quantize_params`, along the
contraction axes read from the model where it has them); the report lists
them.

With a ``mesh``, each batch's state is split over ``data_axis`` (the Hessian
sums reduce across devices in the compiled step) and each solve splits its
output columns over all mesh devices; the result equals the single-device one
up to the order of the Hessian's float sums. Parameters already sharded over
the mesh (FSDP / tensor parallel, `jquant.sharding.shard_params`) stay
sharded: the block steps run SPMD on them (XLA gathers inside a step what a
matmul needs), nothing is gathered onto one device, and each quantized
weight comes back laid out like its float weight
(`jquant.sharding.qarray_shardings`). Without ``mesh``, the mesh of sharded
``params`` is used.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jquant
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return x + nn.Dense(64, name="down")(jax.nn.gelu(nn.Dense(256, name="up")(nn.LayerNorm()(x))))
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for i in range(2):
    ...       x = Block(name=f"layers_{i}")(x)
    ...     return x
    >>> x = jax.random.normal(jax.random.key(0), (16, 32, 64))
    >>> net = Net()
    >>> params = net.init(jax.random.key(1), x)["params"]
    >>> spec = jquant.QuantSpec(bits=4, granularity="group", group_size=32)
    >>> qparams, report = jquant.gptq.quantize_model(net, params, x, [jquant.Rule("kernel", spec)],
    ...                                              progress=False, return_report=True)
    >>> report.total_loss < report.total_rtn_loss
    True
    >>> y = jax.jit(jquant.quantized(net.apply))({"params": qparams}, x)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jquant import blockpass, graph, intercept
from jquant.gptq import core
from jquant.qarray import QArray, dequantize, quantize, to_matrix
from jquant.spec import QuantSpec, Rule, first_match
from jquant.tree import shard_like
from jquant.tokens import check_calibration_tokens
from jquant.utils import check_finite, path_str

# The shared block pass's program cache and runner, under the names experiments/ instrument (bench_generic counts
# the compiled steps, scale_gptq times each block's forward).
_PROGRAMS = blockpass._PROGRAMS
_Runs = blockpass.Runs

SOLVER_OPTIONS = ("block_size", "damp", "act_order", "static_groups", "damp_tries", "damp_growth")
# quantize_model's defaults for the solver (measured on SmolLM2: README "GPTQ", experiments/gptq_sweep.py);
# `solve` itself keeps the paper's damp=0.01 and act_order=False.
MODEL_DEFAULTS = {"act_order": True, "damp": 0.1, "damp_tries": 4, "damp_growth": 10.0}


class LayerReport(NamedTuple):
  """One quantized weight.

  Attributes:
    path: Full parameter path, ``"layers_3/mlp/up/kernel"``.
    shape: The weight's logical shape (``(in, out)`` for a Dense kernel).
    spec: Short description of its `QuantSpec`.
    loss: GPTQ's ``sum_j (w-q)_j^T H (w-q)_j / 2`` over the columns of the
      ``(K, N)`` matrix view, on the block's calibration inputs.
    rtn_loss: The same for round-to-nearest with the same spec and H.
    damp: Relative dampening used.
    seconds: Solve time (shared solves split by column count).
    axes: The contraction axes the weight was quantized along.
  """

  path: str
  shape: tuple
  spec: str
  loss: float
  rtn_loss: float
  damp: float
  seconds: float
  axes: tuple = (0,)


@dataclasses.dataclass(frozen=True)
class GPTQReport:
  """Per-layer results of `quantize_model`; ``print(report)`` gives a table.

  Attributes:
    layers: `LayerReport` per solved weight, in block and call order.
    seconds: Wall time of the whole pass.
    rtn_leaves: Paths quantized by round-to-nearest (selected by a rule, but
      no block matmul reads them).
    tokens: Calibration rows per Hessian (positions with a non-zero weight).
  """

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
    shapes = ["x".join(str(s) for s in l.shape) + ("" if l.axes == (0,) else f" @{','.join(map(str, l.axes))}")
              for l in self.layers]
    sw = max([len(s) for s in shapes] + [11])
    lines = [f"GPTQ: {len(self.layers)} kernels, {self.tokens} calibration tokens per Hessian, "
             f"{self.seconds:.1f}s",
             f"| {'layer':<{w}} | {'shape':>{sw}} | {'spec':<16} | {'gptq loss':>10} | {'rtn loss':>10} | "
             f"{'ratio':>6} | {'damp':>6} |",
             f"|{'-' * (w + 2)}|{'-' * (sw + 2)}|{'-' * 18}|{'-' * 12}|{'-' * 12}|{'-' * 8}|{'-' * 8}|"]
    for l, shape in zip(self.layers, shapes):
      ratio = l.loss / l.rtn_loss if l.rtn_loss > 0 else float("nan")
      lines.append(f"| {l.path:<{w}} | {shape:>{sw}} | {l.spec:<16} | {l.loss:>10.4g} | {l.rtn_loss:>10.4g} | "
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


# ----------------------------------------------------------------------------------------------
# Packing and losses on the (K, N) matrix view
# ----------------------------------------------------------------------------------------------


def _group_layout(m, shape, k_axes):
  """Group parameters (G, N) of the matrix view -> the weight's layout with its contraction axes as one axis of G."""
  free_shape = tuple(d for a, d in enumerate(shape) if a not in k_axes)
  return jnp.moveaxis(jnp.reshape(m, (m.shape[0],) + free_shape), 0, k_axes[0])


@functools.partial(jax.jit, static_argnames=("spec", "shapes", "k_axes", "dtypes"))
def _split_pack(codes, scale, zero, *, spec, shapes, k_axes, dtypes):
  """Cuts a side-by-side solve (K, sum N) back into one packed `QArray` per weight, along its own axes."""
  out, start = [], 0
  for shape, ka, dtype in zip(shapes, k_axes, dtypes):
    width = int(np.prod([d for a, d in enumerate(shape) if a not in ka]))
    if spec.granularity == "tensor":  # never solved side by side
      c = codes
      lay = lambda x: None if x is None else x.reshape((1,) * (len(shape) - len(ka) + 1))
    else:
      c = codes[:, start:start + width]
      lay = lambda x: None if x is None else _group_layout(x[:, start:start + width], shape, ka)
    # Codes back to the weight's logical layout (the inverse of to_matrix).
    free = tuple(a for a in range(len(shape)) if a not in ka)
    c = jnp.transpose(c.reshape(tuple(shape[a] for a in ka + free)), np.argsort(ka + free))
    out.append(QArray.from_codes(c, lay(scale), lay(zero), blockpass.axis_spec(spec, ka), dtype))
    start += width
  return tuple(out)


@functools.partial(jax.jit, static_argnames=("spec", "k_axes"))
def _layer_losses(w, q, h, *, spec, k_axes):
  """GPTQ's and RTN's ``sum_j (w-q)_j^T H (w-q)_j / 2`` on the (K, N) view of ``w``."""
  w2 = to_matrix(w.astype(jnp.float32), k_axes)
  deq = to_matrix(dequantize(q, jnp.float32), k_axes)
  return core.quant_loss(w2, deq, h), core.quant_loss(w2, quantize(w2, spec.replace(axis=0)), h)


# ----------------------------------------------------------------------------------------------
# Hessians, accumulated inside the block's compiled step
# ----------------------------------------------------------------------------------------------


def _row_weights(path, x, row_w, pos_w, skip, cap=None):
  """Per-row Hessian weights shaped ``x.shape[:-1]`` (None: every row counts once)."""
  w = None
  if skip or pos_w is not None:
    if x.ndim < 3:
      raise ValueError(
          f"quantize_model: skip_positions/position_weights apply to axis -2 of the recorded (B, T, K) inputs, "
          f"but the input of {path!r} has shape {tuple(x.shape)} (no position axis); use skip_positions=0 and "
          "position_weights=None for this model.")
    t = x.shape[-2]
    if skip >= t:
      raise ValueError(f"quantize_model: skip_positions={skip}; allowed: an int in 0..{t - 1} (the input of "
                       f"{path!r} has {t} positions on axis -2).")
    pw = (jnp.arange(t) >= skip).astype(jnp.float32)
    if pos_w is not None:
      if pos_w.shape != (t,):
        raise ValueError(f"quantize_model: position_weights has shape {tuple(pos_w.shape)}; allowed: ({t},), one "
                         f"weight per position of axis -2 of the input of {path!r} (shape {tuple(x.shape)}).")
      pw = pw * pos_w
    w = jnp.broadcast_to(pw, x.shape[:-1])
  if row_w is not None:
    if x.ndim < 2 or x.shape[0] != row_w.shape[0]:
      raise ValueError(
          f"quantize_model: the calibration set was padded to whole batches of {row_w.shape[0]}, but the input "
          f"of {path!r} has shape {tuple(x.shape)}, without the batch on axis 0; pass a number of examples that "
          "batch_size divides, or a list of batches.")
    rw = jnp.reshape(row_w, (-1,) + (1,) * (x.ndim - 2))
    w = jnp.broadcast_to(rw, x.shape[:-1]) if w is None else w * rw
  if cap is not None:
    w = _cap_weights(x, w, cap)
  return w


def _cap_weights(x, w, cap):
  """Down-weights rows whose norm exceeds ``cap`` x the median norm of the counted rows, so that they add
  ``cap^2 median^2`` to the Hessian's trace, not their own (much larger) squared norm."""
  norms = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))
  counted = jnp.ones(norms.shape, bool) if w is None else w > 0
  med = jnp.nanmedian(jnp.where(counted, norms, jnp.nan))
  bound = cap * med
  down = jnp.where(norms > bound, jnp.square(bound / jnp.maximum(norms, 1e-30)), 1.0)
  return down if w is None else w * down


@functools.lru_cache(maxsize=None)
def _hessian_reduce(skip: int, cap: Optional[float] = None):
  """The reduction of a block's recorded inputs to Hessian sums (one object per ``(skip, cap)``: a stable
  jit key)."""

  def reduce(outs, inputs, sums, row_w, pos_w, active):
    del outs
    new = {}
    for r, (st, rows) in sums.items():
      x = inputs[r]
      w = _row_weights(r, x, row_w, pos_w, skip, cap)
      n = int(np.prod(x.shape[:-1])) if w is None else jnp.sum(w > 0)
      # Only the active groups accumulate (a real branch: the others cost nothing), so every stage of a
      # true-sequential pass shares one compiled step.
      new[r] = jax.lax.cond(active[r], lambda st=st, rows=rows, x=x, w=w, n=n: (core.hessian_update(st, x, w),
                                                                               rows + n),
                            lambda st=st, rows=rows: (st, rows))
    return new

  return reduce


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def _check_options(options):
  unknown = sorted(set(options) - set(SOLVER_OPTIONS))
  if unknown:
    raise TypeError(f"quantize_model: unknown solver options {unknown}; allowed: {list(SOLVER_OPTIONS)}.")


def _calibration(calib, batch_size, n_data):
  """``(batches, row weights per batch or None)``.

  An array (or pytree of arrays sharing axis 0) is split into batches of one
  size, the last one padded with copies of the first examples that get
  weight 0 (one compiled step; with a mesh, a multiple of the data axis).
  A list of batches is used as given.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"quantize_model: batch_size={batch_size!r}; allowed: a positive int.")
  if isinstance(calib, list):
    return graph.batches(calib, batch_size, fn="quantize_model"), None
  leaves, tree = jax.tree_util.tree_flatten(calib)
  if not leaves:
    graph.batches(calib, batch_size, fn="quantize_model")  # raises: empty
  leaves = [np.asarray(a) for a in leaves]
  if any(a.ndim == 0 for a in leaves) or len({a.shape[0] for a in leaves}) != 1 or leaves[0].shape[0] < 1:
    raise ValueError(f"quantize_model: calib must be an array of examples (N >= 1, ...), a pytree of such arrays "
                     f"sharing N, or a list of batches; got leaves of shapes {[a.shape for a in leaves]}.")
  n = leaves[0].shape[0]
  bsz = min(batch_size, n) if n_data == 1 else -(-batch_size // n_data) * n_data
  n_pad = -(-n // bsz) * bsz
  if n_pad > n:
    leaves = [np.concatenate([a, np.repeat(a[:1], n_pad - n, axis=0)]) for a in leaves]
  real = (np.arange(n_pad) < n).astype(np.float32)
  batches, weights = [], []
  for i in range(0, n_pad, bsz):
    batches.append((jax.tree_util.tree_unflatten(tree, [a[i:i + bsz] for a in leaves]),))
    weights.append(real[i:i + bsz])
  return batches, (weights if n_pad > n else None)


def _placer(mesh, data_axis):
  """Functions putting parameters (replicated) and batch data (split on axis 0 where it divides) on the mesh."""
  if mesh is None:
    return (lambda t: t), (lambda t: t)
  rep, n_data = NamedSharding(mesh, P()), mesh.shape[data_axis]
  split = NamedSharding(mesh, P(data_axis))

  def params(t):  # leaves already laid out over this mesh keep their shardings (FSDP / tensor-parallel)
    return jax.tree_util.tree_map(lambda a: a if _on_mesh(a, mesh) else jax.device_put(a, rep), t)

  def data(t):
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, split if np.ndim(a) and np.shape(a)[0] % n_data == 0 else rep), t)

  return params, data


_dequantize_jit = jax.jit(dequantize, static_argnames=("dtype",))


def _dequantized_like(q, like):
  """``q`` dequantized to ``like``'s dtype; on ``like``'s sharding when that is a multi-device `NamedSharding`
  (one compiled step per layout there, not one per eager op)."""
  s = getattr(like, "sharding", None)
  dtype = jnp.result_type(like)
  if isinstance(s, NamedSharding) and len(s.device_set) > 1:
    return jax.device_put(_dequantize_jit(q, dtype), s)
  return dequantize(q, dtype)


def _on_mesh(a, mesh) -> bool:
  s = getattr(a, "sharding", None)
  return isinstance(s, NamedSharding) and s.mesh == mesh


# ----------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------


def quantize_model(model, params, calib, rules: Sequence[Rule], *, blocks: Optional[str] = None,
                   batch_size: int = 8, mesh: Optional[Mesh] = None, data_axis: Optional[str] = None,
                   skip_positions: int = 0, position_weights=None, token_norm_cap: Optional[float] = 10.0,
                   true_sequential: bool = True, importance: Optional[Mapping[str, Any]] = None,
                   return_report: bool = False,
                   progress: bool = True, verbose: Optional[bool] = None, **solver_options):
  """GPTQ-quantizes every rule-selected weight of any model, block by block.

  Follows GPTQ (Frantar et al., 2022, arXiv:2210.17323): sequential over
  blocks, one Hessian ``H = 2/N sum x x^T`` per group of layers sharing an
  input, lazy-batch column updates in `jquant.gptq.solve_codes`.

  Args:
    model: A Linen module, an NNX module, an object with
      ``.apply(params, *inputs)`` (jquant's models), or a function
      ``f(params, *inputs)`` (see `jquant.graph.as_apply`). The model is not
      edited.
    params: Its float parameters: Linen's ``params`` collection (the inner
      tree, or ``{"params": tree}``), an ``nnx.State``; None for an NNX
      module or an object holding ``.params``.
    calib: Calibration inputs: an array of examples ``(N, ...)`` (int token
      windows ``(N, T)``, embeddings, images) or a pytree of arrays sharing
      ``N``, split into batches of ``batch_size``; or a list of batches, each
      a tuple of positional inputs (any pytree).
    rules: `jquant.Rule` list matched on full parameter paths
      (``layers_3/attn/q/kernel``, NNX ``layers/3/attn/q/kernel``); the first
      match decides, spec None keeps a leaf in float. Each weight is quantized
      along the contraction axes its matmul uses (read from the model), whatever
      the spec's ``axis``. Selected leaves that no matmul inside a block reads
      (the embedding, a head outside the blocks, norm scales) are rounded to
      nearest with their spec, as `jquant.quantize_params` would; a rule that
      matches no parameter at all, or an empty list, is an error.
    blocks: Optional regex naming the blocks on parameter paths (its match is
      the block key, e.g. ``r"decoder/layer_\\d+"``); default: repeated
      numbered submodules (`jquant.graph.find_blocks`).
    batch_size: Examples per compiled step.
    mesh: Optional `jax.sharding.Mesh` (``Auto`` axes): data-parallel
      Hessians over ``data_axis``, output columns of each solve over all
      mesh axes. Default: the mesh ``params`` are sharded over
      (`jquant.sharding.mesh_of`), if any. Leaves sharded over it keep their
      shardings (the returned `QArray` s are laid out like them); others are
      replicated on it, one block at a time.
    data_axis: Mesh axis the calibration batch is split over (default: the
      mesh's first axis).
    skip_positions: Leave the first positions (axis -2 of the recorded
      ``(B, T, K)`` inputs) out of the Hessians, e.g. 1 for an attention sink
      at position 0.
    position_weights: Optional non-negative weight per position ``(T,)`` for
      the Hessians (``H = 2 sum_t a_t x_t x_t^T / sum_t a_t``).
    token_norm_cap: Optional bound on each calibration row's influence: rows
      (tokens) whose input norm exceeds ``token_norm_cap`` times the median
      row norm of the batch are weighted down in that layer's Hessian so they
      count as a row of exactly that norm. A massive-activation attention
      sink (position 0 of windows without BOS, hundreds of times the other
      tokens' norm) then no longer dominates H. Works on any input layout
      (no position axis needed). None: no cap.
    true_sequential: Within a block, solve the groups of layers that share an
      input one after another in call order (q/k/v, then o, then gate/up,
      then down), each calibrated on inputs produced with the groups before
      it already quantized, as the GPTQ reference's ``--true-sequential``
      does. One block run per group; False: one capture with the float block
      for all groups (faster, calibrates later layers on inputs the
      quantized model never produces).
    importance: Optional ``{path: (K,) weights}`` over each weight's
      contraction (paths as in ``rules``, a leading ``params/`` allowed): the
      per-row error weights of the ``clip="mse"`` / ``"fit"`` searches of
      static group parameters (default: ``"fit"`` weighs by the diagonal of
      the Hessian GPTQ solves with, ``"mse"`` searches unweighted). E.g. the float model's mean squared inputs,
      ``jnp.diagonal(H)`` of `jquant.mixed.hessians` (llama.cpp's importance
      matrix, unaffected by ``token_norm_cap``). Weights that share an input
      share one vector: that of the first among them in the model's call
      order (q before k and v) that has one. Importance that would be
      ignored (a min-max spec, group parameters without ``static_groups``)
      raises ValueError. Leaves rounded to nearest
      (the tied embedding) use theirs in the same searches.
    return_report: Return a `GPTQResult` ``(params, report)`` instead of the
      params alone.
    progress: A tqdm bar over blocks.
    verbose: Print the per-layer loss table at the end (default: ``progress``).
    **solver_options: Passed to `jquant.gptq.solve_codes`: ``block_size``,
      ``damp``, ``act_order``, ``static_groups``, ``damp_tries``,
      ``damp_growth``. The model pass defaults to ``act_order=True,
      damp=0.1`` (`MODEL_DEFAULTS`; `solve` keeps the paper's 0.01 and no
      act-order): on SmolLM2 act-order is what makes GPTQ beat RTN, and the
      larger damp keeps it from overfitting the calibration text (README).

  Returns:
    The parameter tree (same structure as ``params``) with `QArray` weights,
    runnable with ``jquant.quantized(apply)``; or a `GPTQResult`.

  Raises:
    ValueError: bad calibration data or options; non-finite weights or
      calibration activations (naming the leaf); a Hessian that no dampening
      makes positive definite (naming the layers and the damps tried);
      weights contracted over non-adjacent axes; a mesh with non-``Auto``
      axes, or params on several meshes; a rule whose pattern matches no
      parameter (a mistyped pattern would leave weights float, silently).
    jquant.graph.GraphError: no blocks found, or blocks that cannot be run one
      at a time.
    TypeError: unknown solver options or rules that are not `jquant.Rule`.

  Example:
    >>> qparams = jquant.gptq.quantize_model(net, params, tokens, rules, act_order=True)
    >>> logits = jax.jit(jquant.quantized(net.apply))({"params": qparams}, tokens)
  """
  _check_options(solver_options)
  solver_options = {**MODEL_DEFAULTS, **solver_options}
  imp_by_path = {str(k).removeprefix("params/"): v for k, v in (importance or {}).items()}
  verbose = progress if verbose is None else verbose
  rules = blockpass.check_rules(rules, "gptq.quantize_model")
  if isinstance(skip_positions, bool) or not isinstance(skip_positions, (int, np.integer)) or skip_positions < 0:
    raise ValueError(f"quantize_model: skip_positions={skip_positions!r}; allowed: an int >= 0.")
  skip_positions = int(skip_positions)
  if token_norm_cap is not None:
    if isinstance(token_norm_cap, bool) or not isinstance(token_norm_cap, (int, float, np.integer, np.floating)) \
        or not np.isfinite(token_norm_cap) or token_norm_cap < 1:
      raise ValueError(f"quantize_model: token_norm_cap={token_norm_cap!r}; allowed: None or a finite float >= 1 "
                       "(a multiple of the median token norm).")
    token_norm_cap = float(token_norm_cap)
  if position_weights is not None:
    position_weights = np.asarray(position_weights, np.float32)
    if position_weights.ndim != 1 or not np.all(position_weights >= 0) or not position_weights.any():
      raise ValueError(f"quantize_model: position_weights must be non-negative floats, one per position, not all "
                       f"zero; got shape {position_weights.shape}.")
  if isinstance(calib, (np.ndarray, jax.Array)) and np.ndim(calib) == 2:
    length = np.shape(calib)[1]  # token windows (N, T): check the positions up front
    if skip_positions >= length:
      raise ValueError(f"quantize_model: skip_positions={skip_positions}; allowed: an int in 0..{length - 1}.")
    if position_weights is not None and position_weights.shape != (length,):
      raise ValueError(f"quantize_model: position_weights must be {length} non-negative floats (one per window "
                       f"position), not all zero; got shape {position_weights.shape}.")
  apply, params, wrapped = blockpass.model_params(model, params, "quantize_model")
  blockpass.check_rules_match(rules, [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=intercept.is_quantized)[0]], "gptq.quantize_model")
  check_finite(params, "gptq.quantize_model", "the float parameters",
               "A model with NaN or inf weights gives NaN outputs; fix or reload these leaves.",
               is_leaf=intercept.is_quantized)
  check_finite({"calib": calib}, "gptq.quantize_model", "the calibration inputs",
               "Clean the calibration data; every example must be finite.")
  check_calibration_tokens(model, calib, fn="gptq.quantize_model")  # ids vs config.vocab_size (jquant's models)
  start = time.perf_counter()

  n_data = 1
  from jquant.sharding import check_auto_axes, mesh_of
  if mesh is None:
    mesh = mesh_of(params)  # sharded params: their own mesh
  if mesh is not None:
    check_auto_axes(mesh, "gptq.quantize_model")
    data_axis = data_axis or mesh.axis_names[0]
    if data_axis not in mesh.axis_names:
      raise ValueError(f"quantize_model: data_axis={data_axis!r}; allowed: one of {mesh.axis_names}.")
    n_data = mesh.shape[data_axis]
  batches, row_ws = _calibration(calib, batch_size, n_data)
  row_ws = row_ws or [None] * len(batches)
  put_params, put_data = _placer(mesh, data_axis)
  pos_w = None if position_weights is None else put_params(jnp.asarray(position_weights))

  # One traced program per distinct batch shape (a list of batches may end with a short one).
  runs = blockpass.Runs(model, apply, params, batches, blocks, put_params)
  prog = runs.main.prog
  flat, treedef = runs.flat(params)
  unknown = sorted(set(imp_by_path) - set(flat))
  for path in sorted(set(imp_by_path) - set(unknown)):
    spec = first_match(rules, path)[1]
    if spec is None or spec.clip == "minmax":
      raise ValueError(f"quantize_model: importance is given for {path!r}, whose rule spec "
                       f"{'keeps it float' if spec is None else 'takes min-max ranges (clip=minmax)'}: it would be "
                       "ignored; use specs with clip='fit' (or 'mse') or drop that entry.")
    if spec.granularity == "group" and not solver_options.get("static_groups", False):
      raise ValueError(f"quantize_model: importance is given for {path!r}, but it weights static group "
                       "parameters only; pass static_groups=True (groups fixed from the original weights).")
  if unknown:
    raise ValueError(f"quantize_model: importance names {unknown[:4]}, not parameters of the model; allowed: "
                     f"weight paths such as {sorted(flat)[:3]}.")
  if not solver_options.get("static_groups", False):
    two_level = [p for p in sorted(flat) if getattr(first_match(rules, p)[1], "two_level", False)]
    if two_level:
      more = f" and {len(two_level) - 3} more" if len(two_level) > 3 else ""
      raise ValueError(f"quantize_model: static_groups=False, but the rules give {two_level[:3]}{more} two-level "
                       "specs (GGUF k-quant super-groups); pass static_groups=True: a super-group's scale depends "
                       "on all its groups, which GPTQ would otherwise fix one at a time.")
  new_flat = dict(flat)
  deq_flat = dict(flat)  # new_flat with its QArrays dequantized
  states = runs.prefix(flat, [put_data(b) for b in batches])
  row_ws = [None if w is None else put_data(jnp.asarray(w)) for w in row_ws]

  axis_names = None if mesh is None else tuple(mesh.axis_names)
  opts = {k: solver_options[k] for k in ("damp", "damp_tries", "damp_growth", "act_order")}
  reports, tokens, found_axes = [], None, {}
  segs = prog.block_segments
  bar = tqdm(segs, desc="GPTQ", disable=not progress)
  for i, seg in enumerate(bar):
    targets, groups = runs.targets(seg, flat, states[0], rules, found_axes)
    rel_float = prog.block_params(flat, seg)
    if groups:
      # True-sequential: each group of layers sharing an input is calibrated on what the block produces with
      # the groups before it already quantized (q/k/v, then o, then gate/up, then down); otherwise one
      # capture with the float block serves all groups. The block runs on `deq_flat` (quantized weights
      # dequantized: the same parameter structure at every stage, so one compiled step serves them all).
      reps = tuple(g[0] for g in groups)
      sums = {r: (core.hessian_init(_k_size(rel_float[r], targets[r][2])), jnp.zeros((), jnp.int32))
              for r in reps}
      stages = [[k] for k in range(len(groups))] if true_sequential else [list(range(len(groups)))]
      for n_stage, stage in enumerate(stages):
        active = {r: jnp.asarray(k in stage) for k, r in enumerate(reps)}
        sums = runs.record(i, deq_flat, states, _hessian_reduce(skip_positions, token_norm_cap), sums, row_ws,
                           pos_w, active)
        hessians = {k: core.hessian_finalize(sums[reps[k]][0]) for k in stage}
        if tokens is None:
          tokens = int(sums[reps[stage[0]]][1])
        if n_stage + 1 == len(stages):
          sums = None  # the running sums are done with: the last stage (the widest input, down) solves without them
        for k in stage:
          g, r = groups[k], reps[k]
          hess = hessians.pop(k)
          _check_finite_hessian(hess, [targets[p][0] for p in g])
          # One factorization per Hessian, shared by all its weights.
          fac = core.factor_hessian(hess, jnp.float32(opts["damp"]), act_order=bool(opts["act_order"]),
                                    damp_tries=int(opts["damp_tries"]), damp_growth=float(opts["damp_growth"]))
          # One solve per distinct spec: weights sharing H and spec go side by side.
          by_spec: dict = {}
          for p in g:
            by_spec.setdefault(targets[p][1].replace(axis=0), []).append(p)
          for spec, paths in by_spec.items():
            together = [paths] if spec.granularity != "tensor" else [[p] for p in paths]
            for part in together:
              imp = next((imp_by_path[f] for f in (targets[p][0] for p in part) if f in imp_by_path), None)
              reports.extend(_solve_part(part, targets, rel_float, hess, fac, spec, seg.name, opts, mesh,
                                         axis_names, dict(solver_options, importance=imp), new_flat))
              for p in part:
                full = targets[p][0]
                deq_flat[full] = _dequantized_like(new_flat[full], flat[full])
          del hess, fac  # freed before the next group's Hessian is factored
      ratio = sum(l.loss for l in reports) / max(sum(l.rtn_loss for l in reports), 1e-30)
      bar.set_postfix_str(f"loss/rtn {ratio:.3f}")
    if i + 1 < len(segs):
      # Sequential: the next block sees the quantized block's outputs.
      states = runs.forward(i, deq_flat, states)
    for r in targets:  # this block's dequantized copies are no longer needed: memory stays near one block's
      deq_flat[targets[r][0]] = flat[targets[r][0]]
  del states

  out = jax.tree_util.tree_unflatten(treedef, [new_flat[p] for p in prog.param_paths])
  out, rtn_leaves = blockpass.round_the_rest(out, new_flat, rules, found_axes, apply, params, batches[0],
                                             imp_by_path)
  report = GPTQReport(tuple(reports), time.perf_counter() - start, rtn_leaves, int(tokens or 0))
  if verbose:
    print(report)
  out = {"params": out} if wrapped else out
  return GPTQResult(out, report) if return_report else out


def _k_size(w, k_axes) -> int:
  """K of a weight's (K, N) view: the product of its contraction axes' sizes."""
  return int(np.prod([jnp.shape(w)[a] for a in k_axes]))


def _check_finite_hessian(hess, paths):
  if not bool(jnp.isfinite(hess).all()):
    raise ValueError(f"gptq.quantize_model: the Hessian of {paths} is non-finite (NaN or inf) although every "
                     "parameter and calibration input is finite: the float model's activations before these "
                     "layers, or their squares, overflow (float16/bfloat16 models, or huge activations). Run the "
                     "calibration in float32 or rescale the inputs. If the inputs are token ids, check they lie "
                     "in the embedding's vocabulary: Flax's nn.Embed gives NaN rows for ids outside it "
                     "(jquant.tokens.check_token_ids(tokens, vocab_size, fn=...) names them).")


def _solve_part(part, targets, rel_float, hess, fac, spec, name, opts, mesh, axis_names, solver_options, new_flat):
  """Solves weights sharing H and spec side by side; packs each along its own axes; returns their reports."""
  weights = [rel_float[p] for p in part]
  k_axes = [targets[p][2] for p in part]
  mats = [to_matrix(w, ka).astype(jnp.float32) for w, ka in zip(weights, k_axes)]
  widths = [m.shape[1] for m in mats]
  w_all = mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=1)
  full = [targets[p][0] for p in part]
  t0 = time.perf_counter()
  try:
    sol = core.solve_codes(w_all, hess, spec, mesh=mesh, axis_names=axis_names, factor=fac, **solver_options)
  except ValueError as e:
    raise ValueError(f"quantize_model: {name} {full}: {e}") from None
  ok = bool(sol.ok)
  secs = time.perf_counter() - t0
  if not ok:
    raise core.damp_error(opts["damp"], opts["damp_tries"], opts["damp_growth"],
                          where=f"quantize_model ({name}: {', '.join(full)})")
  qs = _split_pack(sol.codes, sol.scale, sol.zero_point, spec=spec,
                   shapes=tuple(tuple(jnp.shape(w)) for w in weights), k_axes=tuple(k_axes),
                   dtypes=tuple(np.dtype(jnp.result_type(w)).name for w in weights))
  reports = []
  offs = np.cumsum([0] + widths)
  for f, w, q, ka, a, b in zip(full, weights, qs, k_axes, offs[:-1], offs[1:]):
    loss, rtn = _layer_losses(w, q, hess, spec=spec, k_axes=ka)
    reports.append(LayerReport(f, tuple(jnp.shape(w)), _spec_str(spec), float(loss), float(rtn), float(sol.damp),
                               secs * (b - a) / offs[-1], ka))
    new_flat[f] = shard_like(q, getattr(w, "sharding", None))
  return reports


__all__ = ["quantize_model", "GPTQReport", "GPTQResult", "LayerReport", "SOLVER_OPTIONS"]
