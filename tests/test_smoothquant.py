"""SmoothQuant on user-written Flax models: derived, verified folds; scores of the served int8 arithmetic.

(jquant's own Llama: tests/test_w8a8.py, which calibrates, smooths and serves it.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fold_models as M
import jquant
from jquant import capture, folds, observers, ops, smoothquant as sq
from jquant.calibrate import W8A8Spec, calibrate, convert

RTOL = folds.DEFAULT_RTOL


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def _chan_absmax(apply, params, x):
  """Per-channel max|x| of every matmul input (what a per-channel min-max calibration gives)."""
  _, xs = capture.capture_inputs(apply, params, x)
  return {k: jnp.max(jnp.abs(v.reshape(-1, v.shape[-1])), axis=0) for k, v in xs.items()}


@pytest.fixture(scope="module")
def mlp():
  m = M.LinenMLP("none")
  x = jax.random.normal(jax.random.key(0), (4, 8, M.D)).at[..., 5].multiply(30.0)
  params = M.random_biases(M.init(m, x))
  apply = lambda p, t: m.apply({"params": p}, t)
  return m, apply, params, x


def test_linear_source_with_bias_smooths_exactly(mlp):
  """The issue's up(+bias) -> down: the bias is divided with the kernel, so the float output stays put."""
  m, apply, params, x = mlp
  amax = _chan_absmax(apply, params, x)
  smoothed, factors = sq.smooth(m, params, x, amax, alpha=0.8)
  assert sorted(factors) == ["layers_0/norm", "layers_0/up", "layers_1/norm", "layers_1/up"]
  s = factors["layers_0/up"]
  assert float(s.max() / s.min()) > 1.5  # the factors really move channels
  assert not np.allclose(smoothed["layers_0"]["up"]["bias"], params["layers_0"]["up"]["bias"])
  assert _rel(apply(params, x), apply(smoothed, x)) < RTOL


def test_fold_across_gelu_is_never_applied():
  m = M.LinenMLP("gelu")
  x = jax.random.normal(jax.random.key(0), (4, 8, M.D))
  params = M.random_biases(M.init(m, x))
  apply = lambda p, t: m.apply({"params": p}, t)
  amax = _chan_absmax(apply, params, x)
  _, factors = sq.smooth(m, params, x, amax)
  assert sorted(factors) == ["layers_0/norm", "layers_1/norm"]  # derived: the GELU pair is refused by the check
  bad = folds.Fold("linear", "layers_0/up/kernel", ("layers_0/down/kernel",), bias="layers_0/up/bias")
  with pytest.raises(folds.FoldError, match=r"fold 'layers_0/up' \(linear"):
    sq.smooth(m, params, x, amax, folds=[bad])


def test_search_scores_exactly_the_served_int8_product(mlp):
  """fold_error is the squared error of what convert + jquant.quantized serve for that layer."""
  m, apply, params, x = mlp
  amax = _chan_absmax(apply, params, x)
  fold = next(f for f in sq.model_folds(m, params, x)[2] if f.name == "layers_1/up")
  s = sq.fold_factors(fold, {"layers_1/up/kernel": params["layers_1"]["up"]["kernel"],
                             "layers_1/down/kernel": params["layers_1"]["down"]["kernel"],
                             "layers_1/up/bias": params["layers_1"]["up"]["bias"]}, amax, 0.5)
  smoothed, _ = sq.smooth(m, params, x, amax, alpha=0.5, sites=["layers_1/up"])
  _, xs = capture.capture_inputs(apply, params, x)
  score = sq.fold_error(xs["layers_1/down/kernel"], [params["layers_1"]["down"]["kernel"]], [(0,)], s)
  # Serve: only the last matmul in int8 (static per-tensor scale from a min-max calibration of the same batch).
  rules = [jquant.Rule(r"layers_1/down/kernel", W8A8Spec(activations="static"))]
  stats = calibrate(m, smoothed, x, rules, progress=False)
  served = jquant.quantized(apply)(convert(smoothed, stats, rules), x)
  err = float(jnp.sum(jnp.square(served - apply(params, x))))
  np.testing.assert_allclose(float(score), err, rtol=1e-4)
  # Dynamic per-token activations score the per-token quantizer.
  dyn = sq.fold_error(xs["layers_1/down/kernel"], [params["layers_1"]["down"]["kernel"]], [(0,)], s, "dynamic")
  xs_s = xs["layers_1/down/kernel"].reshape(-1, M.F) / s
  wq = ops.W8A8Weight(jquant.quantize(params["layers_1"]["down"]["kernel"] * s[:, None], sq.WEIGHT_SPEC))
  ref = xs["layers_1/down/kernel"].reshape(-1, M.F) @ params["layers_1"]["down"]["kernel"]
  np.testing.assert_allclose(float(dyn), float(jnp.sum(jnp.square(ops.qdot(xs_s, wq) - ref))), rtol=1e-6)


def test_search_alpha_and_smooth_on_n_d_kernels():
  m = M.LinenLlama()
  tok = M.tokens(4, 12)
  params = M.outliers(M.init(m, tok), [f"layers_{i}/{n}/scale" for i in range(2) for n in ("attn_norm", "mlp_norm")])
  apply = lambda p, t: m.apply({"params": p}, t)
  amax = _chan_absmax(apply, params, tok)
  alphas = sq.search_alpha(m, params, tok, amax, alphas=(0.0, 0.5, 0.8), batch_size=3, progress=False)
  # Every derived fold gets an alpha, including v -> o with scales tied over the query heads of a kv head.
  assert sorted(alphas) == sorted(f"layers_{i}/{n}" for i in range(2) for n in ("attn_norm", "v", "mlp_norm", "up"))
  assert max(alphas.values()) > 0.0  # outlier channels: some smoothing wins
  smoothed, factors = sq.smooth(m, params, tok, amax, alphas)
  s = factors["layers_0/v"].reshape(M.KV, M.H // M.KV, M.HD)
  np.testing.assert_array_equal(s[:, 0], s[:, 1])
  assert _rel(apply(params, tok), apply(smoothed, tok)) < RTOL


def test_nnx_model_smooths_exactly():
  net = M.NNXLlama(nnx.Rngs(0))
  graphdef, state = nnx.split(net)
  tok = M.tokens(2, 8)
  apply = lambda s, t: nnx.merge(graphdef, s)(t)
  amax = _chan_absmax(apply, state, tok)
  smoothed, factors = sq.smooth(net, None, tok, amax, alpha={"attn_norm": 0.5, "mlp_norm": 0.5, "v": 0.7, "up": 0.3})
  assert len(factors) == 8
  assert _rel(apply(state, tok), apply(smoothed, tok)) < RTOL


def test_errors_are_clear(mlp):
  m, apply, params, x = mlp
  amax = _chan_absmax(apply, params, x)
  with pytest.raises(ValueError, match=r"alpha=1.5 for layers_0/norm; allowed: a float in \[0, 1\]"):
    sq.smooth(m, params, x, amax, alpha=1.5)
  with pytest.raises(ValueError, match="alpha has no entry for fold 'layers_0/norm'"):
    sq.smooth(m, params, x, amax, alpha={"up": 0.5})
  with pytest.raises(ValueError, match="no per-channel activation max for fold 'layers_0/norm'"):
    sq.smooth(m, params, x, {})
  per_tensor = {k: jnp.max(v) for k, v in amax.items()}
  with pytest.raises(ValueError, match=r"fold 'layers_0/norm' needs per-channel statistics .* got shapes \[\(\)\]"):
    sq.smooth(m, params, x, per_tensor)
  with pytest.raises(ValueError, match="site 'attn_norm' names no fold"):
    sq.smooth(m, params, x, amax, sites=["attn_norm"])
  with pytest.raises(ValueError, match="activations='weekly'"):
    sq.search_alpha(m, params, x, amax, activations="weekly")
  with pytest.raises(ValueError, match="alphas="):
    sq.search_alpha(m, params, x, amax, alphas=(0.5, 2.0))


def test_non_finite_statistics_and_weights_are_named(mlp):
  """A NaN max|x| would read as a dead channel (factor 1) and smooth nothing, silently."""
  m, apply, params, x = mlp
  amax = _chan_absmax(apply, params, x)
  bad = dict(amax, **{"layers_1/up/kernel": amax["layers_1/up/kernel"].at[3].set(jnp.nan)})
  with pytest.raises(ValueError, match=r"smooth: the activation statistics act_absmax hold non-finite .* at "
                                       r"layers_1/up/kernel \(1 value\)"):
    sq.smooth(m, params, x, bad)
  with pytest.raises(ValueError, match=r"search_alpha: the activation statistics .* at layers_1/up/kernel"):
    sq.search_alpha(m, params, x, bad, progress=False)
  p = jax.tree_util.tree_map(lambda a: a, params)
  p["layers_0"]["down"]["kernel"] = p["layers_0"]["down"]["kernel"].at[1, 1].set(jnp.inf)
  with pytest.raises(ValueError, match=r"smoothquant: params hold non-finite .* at layers_0/down/kernel \(1 value\)"):
    sq.smooth(m, p, x, amax)
  with pytest.raises(ValueError, match=r"smoothing_factors: statistics hold non-finite .* at w_absmax \(1 value\)"):
    sq.smoothing_factors(jnp.ones(4), jnp.ones(4).at[0].set(jnp.nan), 0.5)
