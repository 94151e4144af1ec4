"""GPTQ on one matrix: the second-order solver, and Hessian accumulation.

GPTQ (Frantar et al., 2022) quantizes a linear layer ``y = x @ W`` one input
row of ``W`` at a time and, after each row, moves the rounding error onto the
rows not yet quantized so that the layer's output on calibration data changes
as little as possible. With ``H = 2/N sum x x^T`` over calibration inputs and
``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), quantizing row
``j`` to ``q`` and setting ``e = (w_j - q) / U[j, j]`` updates every later row
``k`` by ``-U[j, k] e``. Updates are applied lazily in blocks of
``block_size`` rows (and sub-blocks of 16 inside them), so that most of the
work is matrix products.

Layout: a Flax ``Dense`` kernel is ``(in, out)``, the Hessian is ``(in, in)``
and rows along ``in`` (the contraction axis, ``spec.axis`` 0) are quantized;
output columns are independent given ``H``, which is what `solve` shards.

Group parameters (scale, zero point) come from `jquant.compute_scale_zero`, the
same function that round-to-nearest (RTN) uses, applied to the group's current
(error-updated) weights at the moment its first row is quantized; with
``static_groups=True`` they come from the original weights instead. Groups are
always contiguous along ``in``, so a `QArray` needs no index permutation at
inference, with or without ``act_order`` (see `solve`).

Example:
    >>> import jax, jax.numpy as jnp, jquant
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> x = jax.random.normal(k1, (2048, 256))
    >>> w = jax.random.normal(k2, (256, 128)) / 16
    >>> h = jquant.gptq.hessian(x)                   # 2/N x^T x
    >>> spec = jquant.QuantSpec(bits=4, granularity="group", group_size=64)
    >>> q, loss = jquant.gptq.solve(w, h, spec)
    >>> float(loss) <= float(jquant.gptq.quant_loss(w, jquant.quantize(w, spec), h))
    True
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jquant.qarray import QArray, compute_scale_zero, dequantize, dequantize_values, quantize_values
from jquant.spec import QuantSpec
from jquant.utils import check_finite

_HI = lax.Precision.HIGHEST  # TPU/GPU would otherwise use reduced-precision passes for f32
_SUB_BLOCK = 16  # rows per inner sub-block: rank-1 updates stay in cache
_COL_CHUNK = 1024  # output columns per solve call on one device: a block's rows stay in cache (3x at 4096)


# ----------------------------------------------------------------------------------------------
# Hessians
# ----------------------------------------------------------------------------------------------


class HessianState(NamedTuple):
  """A running ``sum x x^T`` (float32) and the number of rows it holds."""

  xtx: jax.Array
  count: jax.Array


def hessian_init(size: int) -> HessianState:
  """An empty accumulator for inputs with ``size`` features."""
  return HessianState(jnp.zeros((size, size), jnp.float32), jnp.zeros((), jnp.float32))


def hessian_update(state: HessianState, x, weights=None) -> HessianState:
  """Adds the rows of ``x`` (..., K) to ``state`` (pure; jit it with the caller).

  Args:
    state: The accumulator.
    x: Layer inputs; all leading axes are rows (batch, positions).
    weights: Optional 0/1 (or real) weight per row, shaped ``x.shape[:-1]``:
      e.g. a mask that leaves out attention-sink positions.

  Raises:
    ValueError: concrete ``x`` or ``weights`` holding NaN or inf (naming
      which). Under ``jax.jit`` they are tracers and cannot be checked: a
      non-finite input then makes the Hessian non-finite, which `solve`
      rejects.
  """
  check_finite({"x": x, "weights": weights}, "gptq.hessian_update", "inputs",
               "Check the calibration data and the activations before this layer (e.g. float16 overflow).")
  x = jnp.asarray(x, jnp.float32).reshape(-1, state.xtx.shape[0])
  if weights is None:
    n = jnp.float32(x.shape[0])
    xw = x
  else:
    w = jnp.asarray(weights, jnp.float32).reshape(-1)
    n = jnp.sum(w)
    xw = x * w[:, None]
  xtx = state.xtx + jnp.matmul(xw.T, x, precision=_HI)
  return HessianState(xtx, state.count + n)


@jax.jit
def hessian_finalize(state: HessianState) -> jax.Array:
  """``H = 2/N sum x x^T`` (all zeros if no row was added)."""
  return state.xtx * (2.0 / jnp.maximum(state.count, 1.0))


def hessian(x, weights=None) -> jax.Array:
  """``2/N sum x x^T`` (K, K) float32 of the rows of ``x`` (..., K) in one go.

  Raises:
    ValueError: concrete ``x`` or ``weights`` holding NaN or inf, naming
      which (under ``jax.jit`` tracers cannot be checked).

  Example:
    >>> hessian(jnp.ones((4, 2)))
    Array([[2., 2.],
           [2., 2.]], dtype=float32)
  """
  check_finite({"x": x, "weights": weights}, "gptq.hessian", "inputs",
               "Check the calibration data and the activations before this layer (e.g. float16 overflow).")
  x = jnp.asarray(x)
  return hessian_finalize(hessian_update(hessian_init(x.shape[-1]), x, weights))


# ----------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------


class Solution(NamedTuple):
  """What `solve_codes` returns (arrays; nothing packed yet).

  Attributes:
    codes: int32 codes, shape of ``w``, in [spec.qmin, spec.qmax].
    scale: float32 scales, ``w``'s shape with axis 0 replaced by the group
      count (``(1, 1)`` for per-tensor), already rounded to
      ``spec.scale_dtype``.
    zero_point: float32 integer zero points like ``scale``, or None.
    loss: ``sum over outputs of (w - q)^T H (w - q) / 2`` with the given H.
    damp: The relative dampening that worked (``damp * growth^tries``).
    ok: False if every dampening tried left the factorization non-finite.
  """

  codes: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array]
  loss: jax.Array
  damp: jax.Array
  ok: jax.Array


def quant_loss(w, q, hessian) -> jax.Array:
  """``sum_j (w - q)[:, j]^T H (w - q)[:, j] / 2`` for a kernel (K, ...) and its quantized ``q``.

  ``q`` is a `QArray` or a float array. With ``H = 2/N sum x x^T`` this is the
  mean over calibration rows of ``||x (w - q)||^2``.
  """
  deq = dequantize(q, jnp.float32) if isinstance(q, QArray) else jnp.asarray(q, jnp.float32)
  w = jnp.asarray(w, jnp.float32)
  return _loss(w.reshape(w.shape[0], -1), deq.reshape(w.shape[0], -1), jnp.asarray(hessian, jnp.float32))


def _loss(w2, q2, h):
  e = w2 - q2
  return 0.5 * jnp.sum(e * jnp.matmul(h, e, precision=_HI))


def _damped_cholesky(a, mean_diag, damp, damp_tries: int, damp_growth: float):
  """Lower Cholesky factor of ``a + d mean_diag I`` for the first d in damp * growth^t that is finite.

  The first attempt runs before the loop, which only runs on failure; the
  damping is added on the diagonal in place, so ``a``, one factor and XLA's
  work space are all that is live.
  """
  idx = jnp.arange(a.shape[0])

  def attempt(t):
    d = damp * damp_growth ** t.astype(jnp.float32)
    return jnp.linalg.cholesky(a.at[idx, idx].add(d * mean_diag))

  def finite(lower):
    return jnp.all(jnp.isfinite(jnp.diagonal(lower)))  # a failed factorization is NaN throughout

  def cond(c):
    t, _, ok = c
    return jnp.logical_and(~ok, t + 1 < damp_tries)

  def body(c):
    t, _, _ = c
    lower = attempt(t + 1)
    return t + 1, lower, finite(lower)

  first = attempt(jnp.int32(0))
  t, lower, ok = lax.while_loop(cond, body, (jnp.int32(0), first, finite(first)))
  return lower, ok, damp * damp_growth ** t.astype(jnp.float32)


def _upper_factor_of_inverse(lower):
  """Upper-triangular U with ``a^-1 = U^T U``, given ``lower`` = L with ``J a J = L L^T`` (J: the reversal).

  Then ``a = R R^T`` for the upper ``R = J L J``, so ``a^-1 = R^-T R^-1`` and
  ``U = R^-1``: one triangular inverse, no explicit inverse of ``a``. (Reversing
  L before the solve, not its inverse after, keeps two K x K matrices live.)
  A NaN factor gives a NaN U.
  """
  r = lower[::-1, ::-1]
  # The identity is built from ``r`` (a data dependence), so it is made when the solve needs it, not hoisted to
  # the program's start where it would sit beside the Hessian and the factor.
  eye = jnp.eye(lower.shape[0], dtype=lower.dtype) + 0.0 * r[:1, :1]
  return lax.linalg.triangular_solve(r, eye, left_side=True, lower=False)


class _Layout(NamedTuple):
  """Static sizes of one solve."""

  k: int  # rows (contraction size)
  k_pad: int  # rows padded to whole blocks
  block: int
  sub: int
  group: int  # rows per group (k for channel / tensor granularity)
  n_groups: int


def _layout(k: int, spec: QuantSpec, block_size: int) -> _Layout:
  block = min(block_size, k)
  sub = max(d for d in range(1, min(_SUB_BLOCK, block) + 1) if block % d == 0)
  k_pad = -(-k // block) * block
  if spec.granularity == "group":
    n_groups = spec.num_groups(k)  # raises unless group_size divides k or pad_groups
    group = spec.group_size
  else:
    n_groups, group = 1, k
  return _Layout(k, k_pad, block, sub, group, n_groups)


def _channel_spec(spec: QuantSpec) -> QuantSpec:
  """The spec of one group seen alone: one range per output column over axis 0."""
  return spec.replace(granularity="channel", group_size=None, pad_groups=False, axis=0)


def _round_scale(scale, spec):
  return scale.astype(spec.jnp_scale_dtype).astype(jnp.float32)


def _group_params(vals, spec):
  """(1, N) scale and zero point of one group's rows ``vals`` (L, N), as RTN computes them."""
  s, z = compute_scale_zero(vals, _channel_spec(spec))
  return _round_scale(s, spec), z


def _static_params(w, spec, lay: _Layout, importance=None):
  """Parameters of every group from ``w`` (K, N) as RTN computes them, as (G, N); the ``"mse"`` and
  ``"fit"`` searches weight each row's error by ``importance`` (K, 1): the Hessian's diagonal."""
  s, z = compute_scale_zero(w, spec.replace(axis=0), importance=importance)
  n = w.shape[1]
  s = jnp.broadcast_to(_round_scale(s, spec), (lay.n_groups, n))
  z = None if z is None else jnp.broadcast_to(z, (lay.n_groups, n))
  return s, z


def _sweep(w, u, perm, scale0, zero0, *, spec: QuantSpec, lay: _Layout, dynamic: bool, aligned: bool):
  """The GPTQ sweep over the rows of ``w`` in processing order.

  Args:
    w: (k_pad, N) weights, rows permuted into processing order, zero padding.
    u: (k_pad, k_pad) upper factor of the permuted, damped inverse Hessian
      (identity on the padding).
    perm: (k,) original row of each processing position.
    scale0, zero0: (G + 1, N) group parameters (row G: the padding's dummy
      group, scale 1 / zero 0); filled in during the sweep when ``dynamic``.
    spec: The quantization spec.
    lay: Static sizes.
    dynamic: Compute each group's parameters when its first row is reached.
    aligned: Groups start on sub-block boundaries in processing order (no
      act-order, ``sub`` divides the group size): parameters are then
      computed once per sub-block instead of checked at every row.

  Returns:
    (k_pad, N) int32 codes in processing order, and the final (scale, zero).
  """
  k, k_pad, blk, sub, gsz, n_groups = lay
  n = w.shape[1]
  chan = _channel_spec(spec)
  sym = zero0 is None
  orig = jnp.concatenate([perm, jnp.arange(k, k_pad, dtype=perm.dtype)])
  gidx = jnp.where(orig < k, orig // gsz, n_groups)
  invperm = jnp.argsort(perm)
  zero0 = jnp.zeros_like(scale0) if sym else zero0
  visited0 = jnp.arange(n_groups + 1) >= (n_groups if dynamic else 0)
  u_in = u

  def block_body(i1, carry):
    w_all, codes, scale, zero, visited = carry
    # ``u`` passes through a barrier with the carry: its row panels are sliced when their block runs, not all
    # hoisted to the start of the (unrolled) loop, where together they would be a second K x K matrix.
    u, w_all = lax.optimization_barrier((u_in, w_all))
    w1 = lax.dynamic_slice_in_dim(w_all, i1, blk, 0)
    u_rows = lax.dynamic_slice_in_dim(u, i1, blk, 0)  # (blk, k_pad)
    u1 = lax.dynamic_slice_in_dim(u_rows, i1, blk, 1)  # (blk, blk)

    def sub_body(si, c):
      w1, err1, codes1, scale, zero, visited = c
      j1 = si * sub
      w2 = lax.dynamic_slice_in_dim(w1, j1, sub, 0)
      u_sub_rows = lax.dynamic_slice_in_dim(u, i1 + j1, sub, 0)  # (sub, k_pad)
      u2 = lax.dynamic_slice_in_dim(lax.dynamic_slice_in_dim(u1, j1, sub, 0), j1, sub, 1)

      def current_rows(pos, err2):
        # Present value of rows ``pos`` (none quantized yet): stored value minus
        # the lazy updates still pending at block and sub-block level.
        in_blk = (pos >= i1) & (pos < i1 + blk)
        beyond = w_all[pos] - jnp.matmul(u_rows[:, pos].T, err1, precision=_HI)
        base = jnp.where(in_blk[:, None], w1[jnp.clip(pos - i1, 0, blk - 1)], beyond)
        if err2 is None:  # at a sub-block start nothing is pending inside it
          return base
        return base - jnp.matmul(u_sub_rows[:, pos].T, err2, precision=_HI)

      def group_init(g, err2):
        def init(args):
          scale, zero, visited = args
          # Rows of group g in original order; a short last group repeats its
          # last row, exactly as compute_scale_zero pads it.
          rows = jnp.minimum(g * gsz + jnp.arange(gsz), k - 1)
          s, z = _group_params(current_rows(invperm[rows], err2), spec)
          zero = zero if sym else zero.at[g].set(z[0])
          return scale.at[g].set(s[0]), zero, visited.at[g].set(True)
        return init

      if dynamic and aligned:
        g0 = gidx[i1 + j1]
        scale, zero, visited = lax.cond(visited[g0], lambda a: a, group_init(g0, None), (scale, zero, visited))

      def col_body(i, c2):
        w2, err2, codes2, scale, zero, visited = c2
        g = gidx[i1 + j1 + i]
        if dynamic and not aligned:
          scale, zero, visited = lax.cond(visited[g], lambda a: a, group_init(g, err2), (scale, zero, visited))
        x = w2[i]
        s, z = scale[g][None], None if sym else zero[g][None]
        c, _, _ = quantize_values(x[None], chan, scale=s, zero_point=z)
        cf = c[0].astype(jnp.float32)
        q = dequantize_values(cf, s[0], None if sym else z[0], chan)  # float mins: s * q - m
        e = (x - q) / u2[i, i]
        w2 = w2 - u2[i][:, None] * e[None, :]  # u2 is upper: earlier rows untouched
        return w2, err2.at[i].set(e), codes2.at[i].set(c[0]), scale, zero, visited

      init2 = (w2, jnp.zeros((sub, n), jnp.float32), jnp.zeros((sub, n), jnp.int32), scale, zero, visited)
      _, err2, codes2, scale, zero, visited = lax.fori_loop(0, sub, col_body, init2)
      w1 = w1 - jnp.matmul(lax.dynamic_slice_in_dim(u1, j1, sub, 0).T, err2, precision=_HI)
      err1 = lax.dynamic_update_slice_in_dim(err1, err2, j1, 0)
      codes1 = lax.dynamic_update_slice_in_dim(codes1, codes2, j1, 0)
      return w1, err1, codes1, scale, zero, visited

    init1 = (w1, jnp.zeros((blk, n), jnp.float32), jnp.zeros((blk, n), jnp.int32), scale, zero, visited)
    _, err1, codes1, scale, zero, visited = lax.fori_loop(0, blk // sub, sub_body, init1)
    # Lazy batch update of the rows after this block only (``i1`` is static: the
    # block loop is unrolled so this slice shrinks, half the work of a full update).
    i2 = i1 + blk
    if i2 < k_pad:
      w_all = w_all.at[i2:].add(-jnp.matmul(u[i1:i2, i2:].T, err1, precision=_HI))
    codes = lax.dynamic_update_slice_in_dim(codes, codes1, i1, 0)
    return w_all, codes, scale, zero, visited

  carry = (w, jnp.zeros((k_pad, n), jnp.int32), scale0, zero0, visited0)
  for i1 in range(0, k_pad, blk):
    carry = block_body(i1, carry)
  _, codes, scale, zero, _ = carry
  return codes, scale, (None if sym else zero)


class Factor(NamedTuple):
  """The Hessian side of a solve, shared by every kernel with the same H.

  Attributes:
    u: Upper factor of the permuted, damped inverse Hessian (``H^-1 = U^T U``).
    perm: Processing order (original row index per position).
    dead: Rows whose ``diag(H)`` is 0.
    ok: Whether some dampening gave a finite factor.
    damp: The relative dampening used.
  """

  u: jax.Array
  perm: jax.Array
  dead: jax.Array
  ok: jax.Array
  damp: jax.Array


def factor_hessian(h, damp, *, act_order: bool = False, damp_tries: int = 4, damp_growth: float = 10.0) -> Factor:
  """Dead-input handling, act-order permutation and the damped inverse factor of ``h`` (K, K).

  Args:
    h: (K, K) Hessian (float32; e.g. `hessian` or `hessian_finalize`).
    damp: Relative dampening: ``damp * mean(diag(h))`` is added to the
      diagonal (float >= 0; 0.01 in the paper).
    act_order: Process rows by descending ``diag(h)`` (``perm``); else in order.
    damp_tries: Attempts in all (int >= 1): when a Cholesky factorization
      fails (H not positive definite), the dampening grows by
      ``damp_growth`` (float > 1) and it is tried again.

  Returns:
    A `Factor`. If every attempt failed, ``ok`` is False, ``damp`` is the
    last dampening tried and ``u`` is not finite (`solve` raises then).

  Raises:
    ValueError: ``damp`` (when concrete) negative or not finite,
      ``damp_tries`` < 1 or ``damp_growth`` <= 1, naming the argument.

  Memory: besides ``h`` and the factor returned, the compiled program's
  temporaries are about 2.25 K x K float32 matrices on XLA CPU and 1.2 on
  TPU v5e at K = 2048 (`experiments/scale_gptq.py --tpu-aot`).

  Example:
    >>> fac = jquant.gptq.factor_hessian(jnp.eye(4), 0.01)
    >>> bool(fac.ok), fac.u.shape
    (True, (4, 4))
  """
  if not isinstance(damp, jax.core.Tracer) and not (np.isfinite(float(damp)) and float(damp) >= 0):
    raise ValueError(f"gptq.factor_hessian: damp={damp!r}; allowed: a finite float >= 0 (a fraction of "
                     "mean(diag(H))).")
  if isinstance(damp_tries, bool) or not isinstance(damp_tries, (int, np.integer)) or damp_tries < 1:
    raise ValueError(f"gptq.factor_hessian: damp_tries={damp_tries!r}; allowed: an int >= 1.")
  if not float(damp_growth) > 1:
    raise ValueError(f"gptq.factor_hessian: damp_growth={damp_growth!r}; allowed: a float > 1.")
  return _factor_jit(h, jnp.float32(damp), act_order=bool(act_order), damp_tries=int(damp_tries),
                     damp_growth=float(damp_growth))


@functools.partial(jax.jit, static_argnames=("act_order", "damp_tries", "damp_growth"))
def _factor_jit(h, damp, *, act_order: bool = False, damp_tries: int = 4, damp_growth: float = 10.0) -> Factor:
  h0 = h.astype(jnp.float32)
  k = h0.shape[0]
  # Dead inputs (never active in calibration): H[i, i] = 1 and the row zeroed,
  # as in the paper's reference; they then neither get nor give updates.
  diag = jnp.diagonal(h0)
  dead = diag == 0
  diag = jnp.where(dead, 1.0, diag)
  if act_order:  # largest diag(H) first; ties keep their order
    perm = jnp.argsort(-diag, stable=True).astype(jnp.int32)
  else:
    perm = jnp.arange(k, dtype=jnp.int32)
  # The factor is taken of the permuted Hessian in reverse processing order (J H_perm J), gathered once.
  rev = perm[::-1]
  a = jnp.take(jnp.take(h0, rev, axis=0), rev, axis=1)
  a = a.at[jnp.arange(k), jnp.arange(k)].add(dead[rev].astype(jnp.float32))
  lower, ok, d_used = _damped_cholesky(a, jnp.mean(diag), damp, damp_tries, damp_growth)
  u = _upper_factor_of_inverse(lower)  # NaN when every dampening failed
  ok = ok & jnp.all(jnp.isfinite(jnp.diagonal(u)))
  return Factor(u, perm, dead, ok, d_used)


@functools.partial(jax.jit, static_argnames=("spec", "block_size", "act_order", "static_groups", "mesh",
                                             "axis_names"))
def _solve_jit(w, h, fac: Factor, importance=None, *, spec, block_size, act_order, static_groups, mesh,
               axis_names):
  k = w.shape[0]
  rest = w.shape[1:]
  w0 = w.reshape(k, -1).astype(jnp.float32)
  h0 = h.astype(jnp.float32)
  n = w0.shape[1]
  lay = _layout(k, spec, block_size)
  u, perm, dead = fac.u, fac.perm, fac.dead
  wf = jnp.where(dead[:, None], 0.0, w0)
  pad = lay.k_pad - k
  if pad:  # identity on the padding (no K x K temporary when the blocks divide K)
    tail = jnp.arange(k, lay.k_pad)
    u = jnp.pad(u, ((0, pad), (0, pad))).at[tail, tail].set(1.0)
  wp = jnp.pad(wf[perm], ((0, pad), (0, 0)))

  sym = spec.symmetric
  dynamic = spec.granularity == "group" and not static_groups
  if dynamic:
    scale0 = jnp.ones((lay.n_groups, n), jnp.float32)
    zero0 = None if sym else jnp.zeros((lay.n_groups, n), jnp.float32)
  else:  # per-tensor / per-channel ranges, or static groups: from the original weights
    # "fit" weighs each row's error by the Hessian's diagonal unless told otherwise; "mse" by default
    # searches unweighted, as GPTQ's reference quantizer does.
    imp = jnp.diagonal(h0) if importance is None and spec.clip == "fit" else importance
    scale0, zero0 = _static_params(wf, spec, lay, None if imp is None else jnp.maximum(imp, 0.0)[:, None])
  scale0 = jnp.concatenate([scale0, jnp.ones((1, n), jnp.float32)])
  zero0 = None if sym else jnp.concatenate([zero0, jnp.zeros((1, n), jnp.float32)])

  aligned = not act_order and lay.group % lay.sub == 0
  sweep = functools.partial(_sweep, spec=spec, lay=lay, dynamic=dynamic, aligned=aligned)
  if mesh is None:
    codes, scale, zero = sweep(wp, u, perm, scale0, zero0)
  else:
    # Output columns are independent given H: split them over the devices.
    ndev = math.prod(mesh.shape[a] for a in axis_names)
    npad = -n % ndev
    cols = P(None, axis_names)
    wp_, s_, z_ = (None if a is None else jnp.pad(a, ((0, 0), (0, npad)), constant_values=c)
                   for a, c in ((wp, 0.0), (scale0, 1.0), (zero0, 0.0)))
    wp_ = jax.lax.with_sharding_constraint(wp_, NamedSharding(mesh, cols))
    z_specs = None if sym else cols
    sharded = jax.shard_map(sweep, mesh=mesh, in_specs=(cols, P(), P(), cols, z_specs),
                            out_specs=(cols, cols, z_specs), check_vma=False)
    codes, scale, zero = sharded(wp_, u, perm, s_, z_)
    codes, scale = codes[:, :n], scale[:, :n]
    zero = None if sym else zero[:, :n]

  codes = codes[:k][jnp.argsort(perm)]
  scale, zero = scale[:lay.n_groups], (None if sym else zero[:lay.n_groups])
  if spec.granularity == "tensor":
    scale, zero = scale[:1, :1], (None if sym else zero[:1, :1])
  # Loss against the caller's H and weights (dead rows carry no weight in H).
  gs = lay.group if spec.granularity == "group" else k
  rows_g = jnp.arange(k) // gs
  s_rows = jnp.broadcast_to(scale, (lay.n_groups, n))[rows_g] if spec.granularity != "tensor" else scale
  deq = codes.astype(jnp.float32)
  if not sym:
    z_rows = jnp.broadcast_to(zero, (lay.n_groups, n))[rows_g] if spec.granularity != "tensor" else zero
    deq = deq - z_rows
  deq = deq * s_rows
  loss = _loss(w0, deq, h0)
  p_shape = (1,) * (1 + len(rest)) if spec.granularity == "tensor" else (scale.shape[0],) + rest
  return Solution(codes.reshape((k,) + rest), scale.reshape(p_shape),
                  None if sym else zero.reshape(p_shape), loss, fac.damp, fac.ok)


def _check_args(w, hessian, spec, block_size, damp, damp_tries, damp_growth, fn="gptq.solve"):
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"gptq.solve: spec must be a jquant.QuantSpec, got {type(spec).__name__}.")
  w = jnp.asarray(w)
  h = jnp.asarray(hessian)
  if w.ndim < 2:
    raise ValueError(f"gptq.solve: w must be a kernel of rank >= 2 (in, out...), got shape {w.shape}.")
  if spec.axis not in (0, -w.ndim):
    raise ValueError(f"gptq.solve: spec.axis={spec.axis} but GPTQ quantizes along the input axis 0 of a "
                     f"(in, out) kernel; allowed: 0 (or {-w.ndim}).")
  if spec.rounding != "nearest":
    raise ValueError(f"gptq.solve: spec.rounding={spec.rounding!r}; allowed: 'nearest' (GPTQ decides the "
                     "rounding itself).")
  if h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"gptq.solve: hessian has shape {h.shape}; allowed: ({w.shape[0]}, {w.shape[0]}) for "
                     f"w of shape {w.shape}.")
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"gptq.solve: block_size={block_size!r}; allowed: a positive int.")
  if not float(damp) >= 0:
    raise ValueError(f"gptq.solve: damp={damp!r}; allowed: a float >= 0 (a fraction of mean(diag(H))).")
  if not isinstance(damp_tries, (int, np.integer)) or damp_tries < 1:
    raise ValueError(f"gptq.solve: damp_tries={damp_tries!r}; allowed: an int >= 1.")
  if not float(damp_growth) > 1:
    raise ValueError(f"gptq.solve: damp_growth={damp_growth!r}; allowed: a float > 1.")
  if spec.granularity == "group":
    spec.num_groups(w.shape[0])  # raises with the pad_groups hint
  # Concrete inputs only: tracers (under an outer jit) are skipped by check_finite.
  check_finite({"w": w, "hessian": h}, fn, "inputs",
               "A NaN weight would leave its column all code 0 and the loss NaN; a non-finite Hessian comes from "
               "non-finite calibration activations. Fix them, or keep the layer in float.")
  return w, h


def solve_codes(w, hessian, spec: QuantSpec, *, block_size: int = 128, damp: float = 0.01,
                act_order: bool = False, static_groups: bool = False, damp_tries: int = 4,
                damp_growth: float = 10.0, mesh: Optional[Mesh] = None, axis_names=None,
                factor: Optional[Factor] = None, importance=None, _fn: str = "gptq.solve_codes") -> Solution:
  """`solve` without packing or error checks on the result: returns a `Solution`.

  Usable under an outer ``jax.jit``; inspect ``Solution.ok`` yourself there.
  ``factor``: a `factor_hessian` of ``hessian`` computed with the same
  ``damp``, ``act_order`` and retry schedule, to share it between kernels.
  ``importance``: see `solve`.

  Raises:
    ValueError: bad arguments (as `solve`), or concrete ``w`` / ``hessian``
      holding NaN or inf (the message names which and how many values).
      Under an outer ``jax.jit`` they are tracers and cannot be checked: a
      non-finite ``hessian`` then shows as ``ok == False``, a non-finite
      ``w`` as a NaN ``loss``.
  """
  w, h = _check_args(w, hessian, spec, block_size, damp, damp_tries, damp_growth, fn=_fn)
  if spec.two_level and not static_groups:
    raise ValueError(f"{_fn}: static_groups=False with a two-level spec (scale_bits={spec.scale_bits}, GGUF "
                     "k-quant super-groups); allowed: static_groups=True, since a super-group's scale depends on "
                     "all its groups, which GPTQ would otherwise fix one at a time as the sweep reaches them.")
  if importance is not None:
    importance = jnp.asarray(importance, jnp.float32)
    if importance.shape != (h.shape[0],):
      raise ValueError(f"{_fn}: importance has shape {tuple(importance.shape)}; allowed: ({h.shape[0]},), one "
                       "weight per input row of w (e.g. the mean square of the inputs, llama.cpp's importance "
                       "matrix).")
    check_finite({"importance": importance}, _fn, "inputs", "pass finite importance weights >= 0.")
    if not isinstance(importance, jax.core.Tracer) and bool(jnp.any(importance < 0)):
      raise ValueError(f"{_fn}: importance has negative entries; allowed: weights >= 0.")
  if mesh is not None and axis_names is None:
    axis_names = tuple(mesh.axis_names)
  elif axis_names is not None:
    axis_names = tuple([axis_names] if isinstance(axis_names, str) else axis_names)
  fac = factor
  if fac is None:
    fac = factor_hessian(h, jnp.float32(damp), act_order=bool(act_order), damp_tries=int(damp_tries),
                         damp_growth=float(damp_growth))
  run = functools.partial(_solve_jit, h=h, fac=fac, importance=importance, spec=spec.replace(axis=0),
                          block_size=int(block_size),
                          act_order=bool(act_order), static_groups=bool(static_groups), mesh=mesh,
                          axis_names=axis_names)
  n = w.shape[1] if w.ndim == 2 else 0
  if mesh is not None or spec.granularity == "tensor" or n <= _COL_CHUNK:
    return run(w)
  # Output columns are independent given H (per-tensor ranges aside): wide kernels are solved in chunks
  # of _COL_CHUNK columns, the last one zero-padded so that every chunk shares one compilation.
  parts = []
  for c0 in range(0, n, _COL_CHUNK):
    chunk = w[:, c0:c0 + _COL_CHUNK]
    parts.append(run(jnp.pad(chunk, ((0, 0), (0, _COL_CHUNK - chunk.shape[1])))))
  cat = lambda xs: jnp.concatenate(xs, axis=1)[:, :n]
  zero = None if parts[0].zero_point is None else cat([p.zero_point for p in parts])
  return Solution(cat([p.codes for p in parts]), cat([p.scale for p in parts]), zero,
                  sum(p.loss for p in parts), fac.damp, fac.ok)


def damp_error(damp: float, damp_tries: int, damp_growth: float, where: str = "gptq.solve") -> ValueError:
  tried = ", ".join(f"{damp * damp_growth ** t:g}" for t in range(damp_tries))
  return ValueError(
      f"{where}: the damped Hessian H + d*mean(diag(H))*I is not positive definite (or not finite) for "
      f"every damp tried: d in [{tried}]. Check the Hessian for NaN/inf or negative eigenvalues, or pass a "
      "larger damp= or damp_tries=.")


def solve(w, hessian, spec: QuantSpec, *, block_size: int = 128, damp: float = 0.01,
          act_order: bool = False, static_groups: bool = False, damp_tries: int = 4,
          damp_growth: float = 10.0, mesh: Optional[Mesh] = None, axis_names=None, importance=None):
  """GPTQ-quantizes one kernel ``w`` (in, out...) given the Hessian of its inputs.

  Args:
    w: Float kernel, Flax layout ``(in, out)`` (more trailing output axes are
      allowed); rows along ``in`` are quantized.
    hessian: ``(in, in)`` float Hessian ``2/N sum x x^T`` (see `hessian`).
      Zero diagonal entries mark dead inputs: their rows become 0.
    spec: `jquant.QuantSpec` with ``axis=0``; tensor, channel or group
      granularity, symmetric or not, ``clip`` "minmax", "mse" or "fit".
    block_size: Rows per lazy-update block (speed only; results equal up to
      float rounding).
    damp: ``damp * mean(diag(H))`` is added to the diagonal. If the Cholesky
      factor is not finite, ``damp * damp_growth^t`` is tried for
      ``t < damp_tries`` (inside the compiled function).
    act_order: Quantize rows by decreasing ``diag(H)``. Groups stay contiguous
      along ``in`` either way, so the result needs no permutation at inference;
      the permutation only changes the order in which rows are decided.
    static_groups: Group parameters from the original weights (as RTN) rather
      than from the error-updated weights when a group's first row is reached.
      The reference implementation's act-order without static groups forms
      groups of consecutive *permuted* rows, which would need a per-row group
      index at inference; here a group is always contiguous, and without
      ``static_groups`` its parameters are fixed when its first row (in
      processing order) is reached, from the group's weights at that moment.
    damp_tries, damp_growth: Dampening retry schedule.
    mesh: Optional `jax.sharding.Mesh`; output columns are split over
      ``axis_names`` (default: all mesh axes). Same result as without a mesh.
    axis_names: Mesh axis name or names to split the output columns over.
    importance: Optional ``(in,)`` non-negative weights of each input row's
      error in the ``clip="mse"`` / ``"fit"`` searches of static (and
      per-channel) group parameters; by default ``"fit"`` weighs by the
      Hessian's diagonal and ``"mse"`` searches unweighted (as GPTQ's
      reference quantizer). E.g.
      the mean square of the float model's inputs (llama.cpp's importance
      matrix) when ``hessian`` is computed with capped or re-weighted tokens.

  Returns:
    ``(QArray, loss)``: the packed kernel and ``sum_j (w - q)_j^T H (w - q)_j / 2``
    (a float32 scalar array).

  Raises:
    ValueError: bad arguments; ``w`` or ``hessian`` holding NaN or inf (the
      message names which; checked on concrete arrays only, not under an
      outer ``jax.jit``, where tracers cannot be read); or no dampening made
      the factorization finite (the message lists the damp values tried).

  Example:
    >>> h = jquant.gptq.hessian(x)                   # x: (tokens, 256)
    >>> spec = jquant.QuantSpec(bits=3, granularity="group", group_size=128)
    >>> q, loss = jquant.gptq.solve(w, h, spec, act_order=True, static_groups=True)
    >>> jquant.dequantize(q).shape == w.shape
    True
  """
  sol = solve_codes(w, hessian, spec, block_size=block_size, damp=damp, act_order=act_order,
                    static_groups=static_groups, damp_tries=damp_tries, damp_growth=damp_growth,
                    mesh=mesh, axis_names=axis_names, importance=importance, _fn="gptq.solve")
  if not isinstance(sol.ok, jax.core.Tracer) and not bool(sol.ok):
    raise damp_error(damp, damp_tries, damp_growth)
  return pack(sol, spec, jnp.asarray(w).dtype), sol.loss


def pack(sol: Solution, spec: QuantSpec, dtype=jnp.float32) -> QArray:
  """Packs a `Solution` into a `QArray` (dequantizes to ``dtype``)."""
  return _pack(sol.codes, sol.scale, sol.zero_point, spec=spec.replace(axis=0), dtype=np.dtype(dtype).name)


@functools.partial(jax.jit, static_argnames=("spec", "dtype"))
def _pack(codes, scale, zero, *, spec, dtype):
  return QArray.from_codes(codes, scale, zero, spec, dtype)
