"""GPTQ solver tests: against a float64 NumPy implementation of the published algorithm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import gptq
from jquant.gptq import core


# ------------------------------------------------------------------ float64 reference (NumPy)


def _np_group_params(vals, bits, sym):
  """Min-max group parameters, jquant's conventions (see jquant.qarray)."""
  lo, hi = vals.min(0), vals.max(0)
  if sym:  # the default symmetric_scale="signed": the largest magnitude, with its sign, maps to -2^(b-1)
    extreme = np.where(np.abs(hi) >= np.abs(lo), hi, lo)
    s = extreme / -(2 ** (bits - 1))
    return np.where(np.abs(s) > 1e-30, s, 1.0), None
  qmax = 2 ** bits - 1
  lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
  s = (hi - lo) / qmax
  s = np.where(s > 1e-30, s, 1.0)
  return s, np.clip(np.round(-lo / s), 0, qmax)


def ref_gptq(w, h, bits, sym, group, *, damp=0.01, act_order=False, static_groups=False, with_deq=False):
  """Algorithm 1 of the paper, one row at a time (no lazy batches), float64.

  Groups are contiguous along the input axis; a group's parameters are taken
  from its current (error-updated) rows when its first row is reached (or from
  the original rows with static groups). Returns (codes, ratio x/scale, loss),
  and the dequantized weights after them if ``with_deq``.
  """
  w = np.array(w, np.float64)
  h = np.array(h, np.float64)
  w_orig, h_orig = w.copy(), h.copy()
  k, n = w.shape
  group = group or k
  qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  n_groups = -(-k // group)
  rows_of = lambda g: np.minimum(g * group + np.arange(group), k - 1)
  params = [_np_group_params(w[rows_of(g)], bits, sym) if static_groups else None for g in range(n_groups)]
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
  inv = np.argsort(perm)
  hp = h[perm][:, perm] + damp * np.mean(np.diag(h)) * np.eye(k)
  u = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper, H^-1 = U^T U
  wp = w[perm].copy()
  codes = np.zeros((k, n), np.int64)
  ratio = np.zeros((k, n))
  deq = np.zeros((k, n))
  for j in range(k):
    g = perm[j] // group
    if params[g] is None:
      params[g] = _np_group_params(wp[inv[rows_of(g)]], bits, sym)
    s, z = params[g]
    z = 0.0 if z is None else z
    v = wp[j] / s
    c = np.clip(np.round(v) + z, qmin, qmax)
    q = (c - z) * s
    codes[perm[j]], ratio[perm[j]], deq[perm[j]] = c, v, q
    e = (wp[j] - q) / u[j, j]
    wp[j:] -= np.outer(u[j, j:], e)
  err = w_orig - deq
  loss = 0.5 * np.sum(err * (h_orig @ err))
  return (codes, ratio, loss, deq) if with_deq else (codes, ratio, loss)


@functools.partial(jax.jit, static_argnames=("spec",))
def _rtn_loss(w, h, spec):
  return gptq.quant_loss(w, jquant.quantize(w, spec), h)


def _problem(k, n, seed, tokens=512):
  """Correlated inputs (a realistic, far from diagonal H) and a kernel."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tokens, k)) @ rng.normal(size=(k, k)) * 0.3 + rng.normal(size=(tokens, k))
  x *= np.linspace(0.2, 2.0, k)  # uneven channel scales make act-order matter
  w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
  h = (2.0 / tokens * x.T @ x).astype(np.float32)
  return w, h


def _assert_codes_match(codes, ref_codes, ratio, min_exact_cols=0.8):
  """Same integers, except after a rounding tie: per output column, the first
  mismatch must sit on a near-tie of the reference (x/scale within 1e-3 of a
  half-integer); the rest of that column then legitimately diverges."""
  codes = np.asarray(codes)
  exact = 0
  for j in range(codes.shape[1]):
    bad = np.nonzero(codes[:, j] != ref_codes[:, j])[0]
    if bad.size == 0:
      exact += 1
      continue
    frac = np.abs(np.abs(ratio[bad, j] - np.floor(ratio[bad, j])) - 0.5)
    assert frac.min() < 1e-3, f"column {j}: codes differ at rows {bad[:5]} with no rounding tie there"
  assert exact >= min_exact_cols * codes.shape[1], f"only {exact}/{codes.shape[1]} columns match exactly"


CASES = [
    # (k, n, bits, sym, granularity, group, act_order, static_groups, block)
    (96, 24, 4, True, "group", 32, False, False, 32),
    (96, 24, 3, False, "group", 32, True, False, 32),
    (100, 24, 3, False, "group", 32, True, True, 32),  # short last group (pad_groups) + padded block
    (64, 16, 4, True, "channel", None, True, False, 128),
    (96, 24, 2, False, "group", 32, False, False, 16),
    # act-order with groups set on the fly, several blocks of 128 (8 sub-blocks each): pending sub-block
    # updates must come from the right rows of the factor.
    (320, 48, 3, False, "group", 32, True, False, 128),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_solver_matches_float64_reference(case):
  k, n, bits, sym, gran, group, act_order, static_groups, block = case
  w, h = _problem(k, n, seed=k + bits)
  spec = jquant.QuantSpec(bits=bits, symmetric=sym, granularity=gran, group_size=group, pad_groups=True)
  sol = gptq.solve_codes(w, h, spec, block_size=block, act_order=act_order, static_groups=static_groups)
  ref_codes, ratio, ref_loss = ref_gptq(w, h, bits, sym, group, act_order=act_order, static_groups=static_groups)
  assert bool(sol.ok) and float(sol.damp) == pytest.approx(0.01)
  _assert_codes_match(sol.codes, ref_codes, ratio)
  np.testing.assert_allclose(float(sol.loss), ref_loss, rtol=1e-3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_gptq_loss_never_above_rtn(case):
  k, n, bits, sym, gran, group, act_order, static_groups, block = case
  spec = jquant.QuantSpec(bits=bits, symmetric=sym, granularity=gran, group_size=group, pad_groups=True)
  for seed in range(3):
    w, h = _problem(k, n, seed=1000 + seed)
    q, loss = gptq.solve(w, h, spec, block_size=block, act_order=act_order, static_groups=static_groups)
    assert float(loss) <= float(_rtn_loss(w, h, spec)), (case, seed)
    # The reported loss is the dequantized QArray's.
    np.testing.assert_allclose(float(loss), float(gptq.quant_loss(w, q, h)), rtol=1e-5)


def test_mse_clipping_ranges_beat_rtn_with_mse():
  spec = jquant.QuantSpec(bits=3, granularity="channel", clip="mse", mse_grid=20)
  for seed in range(2):
    w, h = _problem(64, 16, seed=2000 + seed)
    q, loss = gptq.solve(w, h, spec, act_order=True)
    assert float(loss) <= float(_rtn_loss(w, h, spec))
    # Per-channel ranges are fixed up front: RTN's MSE-searched scales (to float rounding).
    np.testing.assert_allclose(np.asarray(q.scale), np.asarray(jquant.compute_scale_zero(w, spec)[0]), rtol=1e-6)


@pytest.mark.parametrize("static_groups", [True, False])
def test_act_order_groups_dequantize_consistently(static_groups):
  w, h = _problem(96, 24, seed=7)
  spec = jquant.QuantSpec(bits=3, symmetric=False, granularity="group", group_size=32, pad_groups=True)
  sol = gptq.solve_codes(w, h, spec, act_order=True, static_groups=static_groups, block_size=32)
  q = gptq.pack(sol, spec)
  # Contiguous groups: no permutation needed; the payload decodes to the solver's integers.
  assert q.shape == w.shape and q.scale.shape == (3, 24)
  np.testing.assert_array_equal(np.asarray(q.codes()), np.asarray(sol.codes))
  expected = (np.asarray(sol.codes) - np.repeat(np.asarray(sol.zero_point), 32, 0)) * np.repeat(
      np.asarray(sol.scale), 32, 0)
  np.testing.assert_allclose(np.asarray(jquant.dequantize(q)), expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(sol.loss), float(gptq.quant_loss(w, q, h)), rtol=1e-5)
  if static_groups:  # the same grid as round-to-nearest
    scale, zero = jquant.compute_scale_zero(w, spec)
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(scale))
    np.testing.assert_array_equal(np.asarray(q.zero_point), np.asarray(zero).astype(np.uint8))


def test_non_positive_definite_hessian_retries_damp():
  w, h = _problem(96, 24, seed=3)
  h64 = h.astype(np.float64)
  lam = np.linalg.eigvalsh(h64)[0]
  mean_diag = np.mean(np.diag(h64))
  # Smallest eigenvalue -0.03 mean(diag): damp 0.01 fails, 0.1 succeeds.
  h_bad = (h64 - (lam + 0.03 * mean_diag) * np.eye(96)).astype(np.float32)
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=32, pad_groups=True)
  sol = gptq.solve_codes(w, h_bad, spec, block_size=32)
  assert bool(sol.ok) and float(sol.damp) == pytest.approx(0.1)
  assert np.isfinite(float(sol.loss))
  with pytest.raises(ValueError, match=r"d in \[0.01, 0.1, 1, 10\]"):
    gptq.solve(w, -np.eye(96, dtype=np.float32), spec, block_size=32)


def test_dead_inputs_become_zero_rows():
  w, h = _problem(96, 24, seed=4)
  dead = np.array([0, 5, 50])
  h[dead, :] = 0.0
  h[:, dead] = 0.0
  spec = jquant.QuantSpec(bits=3, symmetric=False, granularity="group", group_size=32, pad_groups=True)
  q, loss = gptq.solve(w, h, spec, act_order=True, block_size=32)
  deq = np.asarray(jquant.dequantize(q))
  assert np.all(deq[dead] == 0.0) and np.isfinite(deq).all() and np.isfinite(float(loss))
  ref_codes, ratio, ref_loss = ref_gptq(w, h, 3, False, 32, act_order=True)
  _assert_codes_match(q.codes(), ref_codes, ratio)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-3)


def test_sharded_solve_equals_single_device(cpu_mesh):
  spec = jquant.QuantSpec(bits=3, symmetric=False, granularity="group", group_size=32, pad_groups=True)
  w, h = _problem(96, 36, seed=5)  # 36 columns: not a multiple of the 8 devices
  a = gptq.solve_codes(w, h, spec, act_order=True, block_size=32)
  b = gptq.solve_codes(w, h, spec, act_order=True, block_size=32, mesh=cpu_mesh)
  # Same integers; group parameters computed from error-updated rows may differ in the last bit
  # (the column shards' matrix products may round differently).
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  np.testing.assert_allclose(np.asarray(a.scale), np.asarray(b.scale), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point))
  np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-5)


def _k2_units(compiled, k):
  """A compiled program's temporaries in units of one K x K float32 matrix."""
  return compiled.memory_analysis().temp_size_in_bytes / (4 * k * k)


def test_factor_and_sweep_keep_few_k_by_k_temporaries(cpu_mesh):
  # The K x K matrices are what bound a large model's GPTQ per device (70B: 3.3 GB each). The factor keeps
  # its gathered Hessian and one Cholesky factor, then the identity of the triangular solve (XLA CPU: 2.25;
  # it was 4.25 with the identity hoisted to the program start and the damped retry carrying a NaN factor
  # beside each attempt); the column-split sweep slices U's row panels as it goes (0.37; 2.7 when the
  # unrolled loop hoisted all panels and the padding built a K x K diagonal).
  k, n = 1024, 256
  sds = jax.ShapeDtypeStruct
  h = sds((k, k), np.float32)
  factor = core._factor_jit.lower(h, sds((), np.float32), act_order=True).compile()
  assert _k2_units(factor, k) <= 2.5
  fac = jax.eval_shape(lambda h: gptq.factor_hessian(h, np.float32(0.01), act_order=True), h)
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=128)
  sweep = core._solve_jit.lower(sds((k, n), np.float32), h, fac, spec=spec, block_size=128, act_order=True,
                                static_groups=False, mesh=cpu_mesh, axis_names=tuple(cpu_mesh.axis_names)).compile()
  assert _k2_units(sweep, k) <= 0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(damp_tries=0), r"damp_tries=0; allowed: an int >= 1"),
    (dict(damp_tries=2.5), r"damp_tries=2.5; allowed: an int >= 1"),
    (dict(damp=-0.1), r"damp=-0.1; allowed: a finite float >= 0"),
    (dict(damp=float("nan")), r"damp=nan; allowed: a finite float >= 0"),
    (dict(damp_growth=1.0), r"damp_growth=1.0; allowed: a float > 1"),
    (dict(damp_growth=-1.0), r"damp_growth=-1.0; allowed: a float > 1")])
def test_factor_hessian_rejects_bad_dampening(kwargs, match):
  # The direct entry point checks what `solve` checks (values from a new user's report).
  kw = dict(dict(damp=0.01), **kwargs)
  with pytest.raises(ValueError, match=r"gptq.factor_hessian: " + match):
    gptq.factor_hessian(jnp.eye(4), kw.pop("damp"), **kw)
  fac = gptq.factor_hessian(jnp.eye(4), 0.01)
  assert bool(fac.ok) and float(fac.damp) == pytest.approx(0.01)


def test_hessian_helpers_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 10, 8)).astype(np.float32)
  x64 = x.reshape(-1, 8).astype(np.float64)
  np.testing.assert_allclose(np.asarray(gptq.hessian(x)), 2 / 30 * x64.T @ x64, rtol=1e-5, atol=1e-6)
  mask = np.ones((3, 10), np.float32)
  mask[:, 0] = 0.0  # leave position 0 out
  kept = x[:, 1:].reshape(-1, 8).astype(np.float64)
  np.testing.assert_allclose(np.asarray(gptq.hessian(x, mask)), 2 / 27 * kept.T @ kept, rtol=1e-5, atol=1e-6)
  st = gptq.hessian_update(gptq.hessian_update(gptq.hessian_init(8), x[:1]), x[1:])
  np.testing.assert_allclose(np.asarray(gptq.hessian_finalize(st)), 2 / 30 * x64.T @ x64, rtol=1e-5, atol=1e-6)


def test_argument_errors_name_the_argument():
  w, h = _problem(64, 8, seed=0)
  spec = jquant.QuantSpec(bits=4)
  with pytest.raises(ValueError, match="spec.axis=1"):
    gptq.solve(w, h, spec.replace(axis=1))
  with pytest.raises(ValueError, match="rounding='stochastic'"):
    gptq.solve(w, h, spec.replace(rounding="stochastic"))
  with pytest.raises(ValueError, match=r"hessian has shape \(8, 8\)"):
    gptq.solve(w, h[:8, :8], spec)
  with pytest.raises(ValueError, match="pad_groups"):
    gptq.solve(w, h, jquant.QuantSpec(bits=4, granularity="group", group_size=48))
  with pytest.raises(ValueError, match="block_size=0"):
    gptq.solve(w, h, spec, block_size=0)


@pytest.mark.parametrize("sym, gran", [(True, "group"), (False, "channel")])
def test_column_chunks_equal_one_solve(monkeypatch, sym, gran):
  """Wide kernels are solved in column chunks (cache-friendly on CPU); the result is the same solve."""
  from jquant.gptq import core
  w, h = _problem(96, 40, seed=11)
  spec = jquant.QuantSpec(bits=3, symmetric=sym, granularity=gran, group_size=32 if gran == "group" else None)
  whole = gptq.solve_codes(w, h, spec, block_size=32, act_order=True)
  monkeypatch.setattr(core, "_COL_CHUNK", 16)  # 40 columns: chunks of 16, 16 and 8 (zero-padded to 16)
  parts = gptq.solve_codes(w, h, spec, block_size=32, act_order=True)
  np.testing.assert_array_equal(np.asarray(parts.codes), np.asarray(whole.codes))
  # Scales come from updated float rows; matmuls of another width may round the last bit differently.
  np.testing.assert_allclose(np.asarray(parts.scale), np.asarray(whole.scale), rtol=1e-6)
  if not sym:
    np.testing.assert_array_equal(np.asarray(parts.zero_point), np.asarray(whole.zero_point))
  np.testing.assert_allclose(float(parts.loss), float(whole.loss), rtol=1e-5)


def test_non_finite_inputs_are_rejected_naming_the_argument():
  """The reported case: a NaN weight gave loss NaN and its column all code 0, with no error."""
  k1, k2 = jax.random.split(jax.random.key(0))
  w = (jax.random.normal(k1, (64, 32)) / 8).at[5, 7].set(jnp.nan)
  h = gptq.hessian(jax.random.normal(k2, (512, 64)))
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=16)
  with pytest.raises(ValueError, match=r"gptq\.solve: inputs hold non-finite values \(NaN or inf\) at w \(1 value\)"):
    gptq.solve(w, h, spec)
  with pytest.raises(ValueError, match=r"gptq\.solve_codes: .* at w \(1 value\)"):
    gptq.solve_codes(w, h, spec)
  w = jnp.nan_to_num(w)
  with pytest.raises(ValueError, match=r"gptq\.solve: .* at hessian \(2 values\)"):
    gptq.solve(w, h.at[3, 4].set(jnp.inf).at[4, 3].set(jnp.inf), spec)
  x = np.ones((16, 64), np.float32)
  x[2, 9] = np.nan
  with pytest.raises(ValueError, match=r"gptq\.hessian: inputs hold non-finite .* at x \(1 value\)"):
    gptq.hessian(x)
  row_w = np.ones(16, np.float32)
  row_w[3] = np.inf
  with pytest.raises(ValueError, match=r"gptq\.hessian_update: .* at weights \(1 value\)"):
    gptq.hessian_update(gptq.hessian_init(64), np.ones((16, 64), np.float32), row_w)


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_groups_fit_uses_hessian_diagonal(symmetric):
  """With ``clip="fit"`` static groups are the importance-weighted least-squares fit, the importance being
  the Hessian's diagonal (bit for bit `compute_scale_zero(w, spec, importance=diag(H))`), and GPTQ's layer
  loss drops below the min-max static groups' on inputs whose channels differ in scale."""
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(k1, (1024, 128)) * jnp.exp(jax.random.normal(k2, (128,)))
  w = jax.random.normal(k3, (128, 48)) * 0.05
  h = gptq.hessian(x)
  spec = jquant.QuantSpec(bits=3, symmetric=symmetric, granularity="group", group_size=32,
                          **({} if symmetric else dict(offset="min")))
  fit = gptq.solve_codes(w, h, spec.replace(clip="fit"), static_groups=True)
  s, z = jquant.compute_scale_zero(w, spec.replace(clip="fit"), importance=jnp.diagonal(h)[:, None])
  np.testing.assert_array_equal(np.asarray(fit.scale), np.asarray(s))
  if not symmetric:
    np.testing.assert_array_equal(np.asarray(fit.zero_point), np.asarray(z))
  minmax = gptq.solve_codes(w, h, spec, static_groups=True)
  assert float(fit.loss) < 0.95 * float(minmax.loss)
  # importance= replaces the Hessian's diagonal in the search (e.g. the float model's mean squared inputs).
  imp = jnp.linspace(0.0, 2.0, 128) ** 2
  own = gptq.solve_codes(w, h, spec.replace(clip="fit"), static_groups=True, importance=imp)
  s, _ = jquant.compute_scale_zero(w, spec.replace(clip="fit"), importance=imp[:, None])
  np.testing.assert_array_equal(np.asarray(own.scale), np.asarray(s))
  with pytest.raises(ValueError, match=r"importance has shape \(127,\); allowed: \(128,\)"):
    gptq.solve(w, h, spec.replace(clip="fit"), static_groups=True, importance=imp[:127])
  with pytest.raises(ValueError, match="importance has negative entries"):
    gptq.solve(w, h, spec.replace(clip="fit"), static_groups=True, importance=-imp)
