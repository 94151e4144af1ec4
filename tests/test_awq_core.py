"""AWQ array math: statistics, scale search, clipping search, folding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant.awq import core

W3G32 = jquant.QuantSpec(bits=3, granularity="group", group_size=32)


def _data(n=256, d=64, out=48, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, d)), jax.random.normal(kw, (d, out))


def _rtn_loss(x, w, spec):
  return lambda s: core.output_error(x @ w, x @ core.scaled_fake_quant(w, s, spec))


def test_activation_stats_matches_numpy_and_skips_positions():
  x = jax.random.normal(jax.random.key(0), (3, 10, 8)).at[:, 0, :].multiply(1000.0)
  ref = np.abs(np.asarray(x, np.float64)[:, 1:, :]).reshape(-1, 8).mean(0)
  got = core.activation_stats(x, skip_positions=1)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert got.dtype == jnp.float32
  assert float(core.activation_stats(x).max()) > 100 * float(got.max())  # the sink dominates unless skipped


def test_candidate_scales_alpha_zero_is_identity_and_normalized():
  x_mean = jnp.array([0.1, 1.0, 10.0, 3.0])
  np.testing.assert_array_equal(core.candidate_scales(x_mean, 0.0), np.ones(4, np.float32))
  s = core.candidate_scales(x_mean, 0.5)
  np.testing.assert_allclose(float(s.max() * s.min()), 1.0, rtol=1e-6)
  np.testing.assert_allclose(s / s[1], np.sqrt(np.asarray(x_mean)), rtol=1e-6)


def test_search_picks_alpha_zero_for_uniform_activations():
  # Every channel has the same mean |x|: every candidate is the identity, RTN.
  kx, kw = jax.random.split(jax.random.key(1))
  x = 0.7 * jnp.sign(jax.random.normal(kx, (256, 64)))
  w = jax.random.normal(kw, (64, 32))
  res = core.search_scales(_rtn_loss(x, w, W3G32), core.activation_stats(x), n_grid=20)
  assert int(res.index) == 0 and float(res.alpha) == 0.0
  np.testing.assert_array_equal(res.scales, np.ones(64, np.float32))
  assert res.errors.shape == (20,)


def test_planted_outlier_channel_is_protected():
  x, w = _data(seed=2)
  x = x.at[:, 5].multiply(40.0)
  res = core.search_scales(_rtn_loss(x, w, W3G32), core.activation_stats(x), n_grid=20)
  rtn_err = float(core.output_error(x @ w, x @ jquant.fake_quant(w, W3G32)))
  assert float(res.alpha) > 0.0
  assert int(jnp.argmax(res.scales)) == 5
  # The chosen error is the real error of the scaled, quantized layer, and it beats RTN clearly.
  awq_err = float(core.output_error(x @ w, (x / res.scales) @ jquant.fake_quant(core.scale_rows(w, res.scales), W3G32)))
  np.testing.assert_allclose(awq_err, float(res.errors[res.index]), rtol=1e-4)
  np.testing.assert_allclose(float(res.errors[0]), rtn_err, rtol=1e-5)
  assert awq_err < 0.7 * rtn_err


def test_weight_variant_and_both_grids():
  x, w = _data(seed=3)
  x = x.at[:, 9].multiply(20.0)
  w_mean = core.weight_stats([w[:, :20], w[:, 20:]], W3G32)
  np.testing.assert_allclose(w_mean, core.weight_stats([w], W3G32), rtol=1e-6)
  both = core.search_scales(_rtn_loss(x, w, W3G32), core.activation_stats(x), w_mean, variant="both")
  act = core.search_scales(_rtn_loss(x, w, W3G32), core.activation_stats(x), variant="act")
  assert both.errors.shape == (40,) and bool(jnp.all(both.weighted_all[20:])) and not bool(jnp.any(both.weighted_all[:20]))
  assert float(both.errors[both.index]) <= float(act.errors[act.index])
  with pytest.raises(ValueError, match="variant"):
    core.candidate_grid(w_mean, variant="weights")


def test_no_nan_for_zero_channels_and_groups():
  x, w = _data(seed=4)
  x = x.at[:, 7].set(0.0)
  w = w.at[7].set(0.0).at[:32, 3].set(0.0)  # a zero input row and an all-zero group
  w_mean = core.weight_stats([w], W3G32)
  res = core.search_scales(_rtn_loss(x, w, W3G32), core.activation_stats(x), w_mean, variant="both")
  assert bool(jnp.all(jnp.isfinite(res.scales))) and bool(jnp.all(res.scales > 0))
  assert bool(jnp.all(jnp.isfinite(res.errors)))
  clip = core.search_clip(core.scale_rows(w, res.scales), x / res.scales, W3G32)
  assert bool(jnp.all(jnp.isfinite(clip.lo))) and bool(jnp.all(jnp.isfinite(clip.hi)))
  assert float(clip.shrink[0, 3]) == 1.0  # nothing to gain in an all-zero group
  zero = core.candidate_scales(jnp.zeros(8), 0.5, jnp.zeros(8))
  np.testing.assert_array_equal(zero, np.ones(8, np.float32))


_search_clip = jax.jit(core.search_clip, static_argnames=("spec", "n_grid", "max_shrink"))


def test_clip_search_never_worse_than_minmax_and_matches_numpy_per_group_error():
  x, w = _data(n=200, d=96, out=40, seed=5)
  w = w.at[3, 0].set(12.0)  # one big weight stretches its group's range
  for spec in (W3G32, W3G32.replace(symmetric=False), jquant.QuantSpec(bits=4, granularity="channel")):
    clip = _search_clip(w, x, spec=spec, n_grid=20, max_shrink=0.5)
    wc = core.apply_clip(w, clip, spec)
    base = core.output_error(x @ w, x @ jquant.fake_quant(w, spec))
    got = core.output_error(x @ w, x @ jquant.fake_quant(wc, spec))
    assert float(got) <= float(base) * (1 + 1e-6)
    assert float(jnp.min(clip.shrink)) >= 0.55 - 1e-6
  # Per-group error in float64 NumPy for the chosen and the unclipped range.
  spec = W3G32
  clip = _search_clip(w, x, spec=spec)
  xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
  qc = np.asarray(jquant.fake_quant(core.apply_clip(w, clip, spec), spec), np.float64)
  q1 = np.asarray(jquant.fake_quant(w, spec), np.float64)
  for g in range(3):
    sl = slice(32 * g, 32 * (g + 1))
    ref = xn[:, sl] @ wn[sl]
    e_clip = ((xn[:, sl] @ qc[sl] - ref) ** 2).mean(0)
    e_none = ((xn[:, sl] @ q1[sl] - ref) ** 2).mean(0)
    assert np.all(e_clip <= e_none * (1 + 1e-5) + 1e-9)


def test_clip_search_short_last_group():
  spec = jquant.QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32, pad_groups=True)
  x, w = _data(n=64, d=80, out=16, seed=6)
  clip = core.search_clip(w, x, spec)
  assert clip.lo.shape == (3, 16)
  assert core.apply_clip(w, clip, spec).shape == w.shape


def test_folding_is_exact_to_float32_rounding():
  kx, kn, k1, k2, kb = jax.random.split(jax.random.key(7), 5)
  x = jax.random.normal(kx, (32, 64))
  g = jax.random.uniform(kn, (64,), minval=0.5, maxval=1.5)
  b = jax.random.normal(kb, (64,))
  w1, w2 = jax.random.normal(k1, (64, 48)), jax.random.normal(k2, (48, 24))
  s_in = core.candidate_scales(jnp.abs(x).mean(0) * jnp.linspace(0.1, 30, 64), 0.6)
  s_mid = core.candidate_scales(jnp.linspace(0.01, 50, 48), 0.8)

  def net(g, b, w1, w2):
    xn = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
    return (xn * g + b) @ w1 @ w2

  g2, b2 = core.fold_into_norm(g, s_in, b)
  w1s, _ = core.fold_into_columns(core.scale_rows(w1, s_in), s_mid)
  w2s = core.scale_rows(w2, s_mid)
  ref = np.asarray(net(*(np.asarray(a, np.float64) for a in (g, b, w1, w2))))
  folded = np.asarray(net(g2, b2, w1s, w2s))
  plain = np.asarray(net(g, b, w1, w2))
  # Folding adds a few float32 roundings per product: bound both by the same multiple of eps.
  tol = 64 * np.finfo(np.float32).eps * np.abs(ref).max()
  assert np.abs(plain - ref).max() < tol
  assert np.abs(folded - ref).max() < tol


def test_fold_into_columns_checks_shapes():
  with pytest.raises(ValueError, match="output columns"):
    core.fold_into_columns(jnp.ones((4, 6)), jnp.ones(4))


def test_non_finite_inputs_are_rejected_naming_the_argument():
  x, w = _data(n=64, d=64, out=16)
  x_nan, w_inf = x.at[3, 5].set(jnp.nan), w.at[0, 1].set(jnp.inf)
  with pytest.raises(ValueError, match=r"awq\.activation_stats: activations hold non-finite .* at x \(1 value\)"):
    core.activation_stats(x_nan)
  with pytest.raises(ValueError, match=r"awq\.weight_stats: .* at kernels/1 \(1 value\)"):
    core.weight_stats([w, w_inf], W3G32)
  with pytest.raises(ValueError, match=r"awq\.candidate_grid: statistics .* at x_mean \(1 value\)"):
    core.search_scales(_rtn_loss(x, w, W3G32), jnp.ones(64).at[2].set(jnp.nan), n_grid=4)
  with pytest.raises(ValueError, match=r"awq\.search_clip: .* at kernel \(1 value\)"):
    core.search_clip(w_inf, x, W3G32)
  with pytest.raises(ValueError, match=r"awq\.search_clip: .* at x \(1 value\)"):
    core.search_clip(w, x_nan, W3G32)
  # Finite statistics but a loss that is NaN for every candidate: nothing to choose, no silent alpha = 0.
  with pytest.raises(ValueError, match=r"awq\.search_scales: every candidate's error is non-finite"):
    core.search_scales(lambda s: jnp.sum(s) * jnp.nan, core.activation_stats(x), n_grid=4)
