"""W8A8: int8 matmul exactness, calibrate -> convert -> save -> load, SmoothQuant folding, static scales."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
import jquant.capture  # noqa: F401  (registers the submodule)
import jquant.models
from jquant import observers as O
from jquant import smoothquant as sq
from jquant.calibrate import ActivationStats, W8A8Spec, calibrate, convert
from jquant.ops import W8A8Weight, int8_matmul, qdot, quantize_activations_per_token

DENSE = r"(attn|mlp)/\w+/kernel$"
STATIC = [jquant.Rule(DENSE, W8A8Spec(activations="static"))]
DYNAMIC = [jquant.Rule(DENSE, W8A8Spec(activations="dynamic"))]


@dataclasses.dataclass(frozen=True)
class _CtxConfig(jquant.models.LlamaConfig):
  max_seq_len: int = 32  # a context limit for the too-long-window test


@pytest.fixture(scope="module")
def toy():
  cfg = _CtxConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
  m = jquant.models.llama_init(cfg, jax.random.key(0))
  # Persistent outlier channels after the norms, as real LLMs have, so smoothing has work to do.
  p = dict(m.params)
  for b in m.block_names:
    bp = dict(p[b])
    for n in ("attn_norm", "mlp_norm"):
      bp[n] = {"scale": bp[n]["scale"].at[7].multiply(40.0).at[19].multiply(15.0)}
    p[b] = bp
  m = dataclasses.replace(m, params=p)
  calib = jax.random.randint(jax.random.key(1), (6, 32), 0, cfg.vocab_size)
  evalw = jax.random.randint(jax.random.key(2), (4, 32), 0, cfg.vocab_size)
  return m, calib, evalw


@pytest.fixture(scope="module")
def toy_stats(toy):
  """Per-tensor min-max and per-channel max|x| stats of the toy, computed once for the module."""
  m, calib, _ = toy
  static = calibrate(m, m.params, calib, STATIC, batch_size=3, progress=False)
  chan = calibrate(m, m.params, calib, STATIC, observer=O.MinMaxObserver("channel"), batch_size=3,
                   progress=False)
  return static, chan


def _count(jaxpr, names) -> int:
  """Occurrences of primitives named in ``names``, through every sub-jaxpr."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in names
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          n += _count(inner, names)
  return n


def _int8_dots(jaxpr) -> list:
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and all(v.aval.dtype == jnp.int8 for v in eqn.invars):
      out.append(eqn.params["preferred_element_type"])
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += _int8_dots(inner)
  return out


# ---------------------------------------------------------------------------
# The int8 matmul.


@pytest.mark.parametrize("static", [True, False])
def test_int8_matmul_is_bit_exact_against_int32_numpy(static):
  kx, kw = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (3, 5, 96)) * 4.0
  w = jax.random.normal(kw, (96, 40))
  q = jquant.quantize(w, W8A8Spec().weight_spec())
  if static:
    xs = jnp.float32(12.0 / 127.0)
    xq = jquant.ops.quantize_activations_static(x, xs)
  else:
    xq, xs = quantize_activations_per_token(x)
  acc = int8_matmul(xq, q.qvalue)
  assert acc.dtype == jnp.int32
  ref = np.asarray(xq).astype(np.int32) @ np.asarray(q.qvalue).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(acc), ref)
  # qdot through the wrapper runs exactly this product, then scales it.
  y = qdot(x, W8A8Weight(q, xs if static else None))
  want = ref.astype(np.float32) * np.asarray(xs) * np.asarray(q.scale).reshape(-1)
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-7, atol=0)
  # The XLA product is int8 x int8 -> int32 (other backends' kernels are checked in pallas_kernels' tests).
  with jquant.ops.force_xla():
    jaxpr = jax.make_jaxpr(lambda a: qdot(a, W8A8Weight(q, xs if static else None)))(x).jaxpr
  assert _int8_dots(jaxpr) == [jnp.int32]


# ---------------------------------------------------------------------------
# calibrate -> convert -> footprint -> save -> load -> serve.


def test_calibrate_convert_save_load_serve(toy, toy_stats, tmp_path):
  m, calib, evalw = toy
  stats = toy_stats[0]
  assert sorted(stats.keys()) == sorted(f"{b}/{l}/kernel" for b in m.block_names for l in
                                        ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"))
  # min-max per tensor over all calibration windows equals max|x| of the captured inputs.
  h = m.embed(m.params, calib)
  _, xs = jquant.capture.capture_inputs(m.block, m.params["layers_0"], h)
  assert float(stats.amax()["layers_0/attn/q/kernel"]) == float(jnp.max(jnp.abs(xs["attn/q/kernel"])))

  qparams = convert(m.params, stats, STATIC)
  k = qparams["layers_0"]["attn"]["q"]["kernel"]
  assert isinstance(k, W8A8Weight) and k.weight.qvalue.dtype == jnp.int8
  assert float(k.act_scale) == pytest.approx(float(stats.amax()["layers_0/attn/q/kernel"]) / 127.0)
  fp, fp_float = jquant.footprint(qparams), jquant.footprint(m.params)
  dense_float = sum(l.nbytes for l in fp_float.leaves if "kernel" in l.path)
  assert fp_float.total_bytes - fp.total_bytes >= 0.7 * dense_float  # int8 kernels: ~1/4 of float

  ref = m.apply(m.params, evalw)
  out = jax.jit(m.apply)(qparams, evalw)
  assert bool(jnp.all(jnp.isfinite(out)))
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 0.5, rel  # loose: the toy has x40 outlier channels by construction (see the SmoothQuant tests)

  # Static and dynamic layers in one tree; load rebuilds the W8A8Weight wrappers with or without a target.
  qparams["layers_1"]["mlp"]["down"]["kernel"] = W8A8Weight(qparams["layers_1"]["mlp"]["down"]["kernel"].weight)
  out = jax.jit(m.apply)(qparams, evalw)
  path = jquant.save(tmp_path / "w8a8", qparams)
  for restored in (jquant.load(path, target=qparams), jquant.load(path)):
    q = restored["layers_0"]["attn"]["q"]["kernel"]
    assert isinstance(q, W8A8Weight) and float(q.act_scale) == float(k.act_scale)
    assert restored["layers_1"]["mlp"]["down"]["kernel"].act_scale is None
    np.testing.assert_array_equal(np.asarray(jax.jit(m.apply)(restored, evalw)), np.asarray(out))


def test_dynamic_needs_no_stats_and_mixes_with_static(toy, toy_stats):
  m, calib, evalw = toy
  mixed = [jquant.Rule(r"mlp/down/kernel$", W8A8Spec(activations="dynamic")), jquant.Rule(r"mlp/down", None)] \
      + STATIC
  q_dyn = convert(m.params, None, DYNAMIC)
  assert q_dyn["layers_1"]["mlp"]["down"]["kernel"].act_scale is None
  q_mix = convert(m.params, toy_stats[0], mixed)
  assert q_mix["layers_0"]["mlp"]["down"]["kernel"].act_scale is None
  assert q_mix["layers_0"]["mlp"]["up"]["kernel"].act_scale is not None
  with pytest.raises(ValueError, match="no activation statistics for static layer"):
    convert(m.params, None, STATIC)


def test_static_scales_are_constants_of_the_serving_function(toy, toy_stats):
  """Static activations are quantized with stored scales: no range reduction per call."""
  m, calib, evalw = toy
  q_static = convert(m.params, toy_stats[0], STATIC)
  q_dyn = convert(m.params, None, DYNAMIC)
  reductions = ("reduce_max", "reduce_min", "argmax", "argmin")

  def serving(params):  # params closed over: they are constants of the compiled function
    with jquant.ops.force_xla():  # the CPU path; one trace instead of one branch per platform
      return jax.make_jaxpr(jax.jit(lambda t: m.apply(params, t)))(evalw).jaxpr

  n_float = _count(serving(m.params), reductions)  # softmax's max only
  assert _count(serving(q_static), reductions) == n_float
  assert _count(serving(q_dyn), reductions) == n_float + 14  # one per-token max per Dense input
  assert len(_int8_dots(serving(q_static))) == 14
  # A single static qdot has no reduction at all, and its scale is a literal constant in the HLO.
  wq = q_static["layers_0"]["attn"]["q"]["kernel"]
  x = jax.random.normal(jax.random.key(4), (2, 8, 64))
  with jquant.ops.force_xla():
    one = jax.make_jaxpr(lambda a: qdot(a, wq))(x).jaxpr
    hlo = jax.jit(lambda a: qdot(a, wq)).lower(x).as_text()
  assert _count(one, reductions + ("reduce_sum",)) == 0
  assert "reduce" not in hlo and "constant" in hlo


# ---------------------------------------------------------------------------
# SmoothQuant.


def test_smoothquant_folding_with_power_of_two_factors_is_bit_exact(toy, toy_stats):
  """Scaling by powers of two is exact in float, so the smoothed model must be bit-identical."""
  m, calib, evalw = toy
  amax = toy_stats[1].amax()
  folds = {f.name: f for f in sq.LLAMA_FOLDS}
  groups = sq._gqa_groups(m)
  p = dict(m.params)
  for b in m.block_names:
    xb = {k[len(b) + 1:-len("/kernel")]: v for k, v in amax.items() if k.startswith(b + "/")}
    bp = p[b]
    for site in ("attn_norm", "mlp_norm", "mlp/up", "attn/v"):
      st, ss = sq.site_factors(bp, xb, folds[site], 0.5, groups)
      st, ss = jnp.exp2(jnp.round(jnp.log2(st))), jnp.exp2(jnp.round(jnp.log2(ss)))
      assert float(jnp.max(st)) > 1.0  # the outlier channel really moves
      bp = sq.apply_fold(bp, folds[site], st, ss)
    p[b] = bp
  np.testing.assert_array_equal(np.asarray(m.apply(p, evalw)), np.asarray(m.apply(m.params, evalw)))


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothquant_leaves_float_outputs_unchanged(toy, toy_stats, alpha):
  m, calib, evalw = toy
  amax = toy_stats[1].amax()
  smoothed, factors = sq.smooth(m.params, amax, alpha, model=m)  # all four sites
  assert len(factors) == 4 * len(m.block_names)
  ref, out = m.apply(m.params, evalw), m.apply(smoothed, evalw)
  # Each fold adds at most one rounding (2^-24 relative) to every scaled weight; 2 blocks x 4 folds
  # propagate a few hundred ulp at most.
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=512 * 2**-24 * float(jnp.max(jnp.abs(ref))))


def test_smoothquant_reduces_static_w8a8_error(toy, toy_stats):
  m, calib, evalw = toy
  cstats = toy_stats[1]
  ref = m.apply(m.params, evalw)

  def static_error(params, stats):
    return float(jnp.linalg.norm(m.apply(convert(params, stats, STATIC), evalw) - ref))

  alphas = sq.search_alpha(m, m.params, calib, cstats.amax(), alphas=(0.0, 0.5, 0.8), progress=False)
  assert set(alphas) == {f"{b}/{s}" for b in m.block_names for s in ("attn_norm", "mlp_norm", "mlp/up", "attn/v")}
  smoothed, _ = sq.smooth(m.params, cstats.amax(), alphas, model=m)
  # The outlier channels (x40, x15 after both norms) dominate the per-tensor range without smoothing.
  smoothed_stats = calibrate(m, smoothed, calib, STATIC, batch_size=3, progress=False)
  assert static_error(smoothed, smoothed_stats) < 0.6 * static_error(m.params, toy_stats[0])


# ---------------------------------------------------------------------------
# Errors.


def test_calibrate_errors_are_clear(toy):
  m, calib, _ = toy
  with pytest.raises(ValueError, match="windows is empty"):
    calibrate(m, m.params, np.zeros((0, 16), np.int32), STATIC)
  with pytest.raises(ValueError, match=r"length 40, longer than the model's context \(32 tokens\)"):
    calibrate(m, m.params, np.zeros((2, 40), np.int32), STATIC)
  with pytest.raises(ValueError, match="select no Dense layer"):
    calibrate(m, m.params, calib, [jquant.Rule(r"nothing", W8A8Spec())])
  with pytest.raises(ValueError, match="batch_size=0"):
    calibrate(m, m.params, calib, STATIC, batch_size=0)
  with pytest.raises(ValueError, match="activations='weekly'"):
    W8A8Spec(activations="weekly")
  with pytest.raises(ValueError, match="bits=4"):
    W8A8Spec(bits=4)


def test_stats_merge_and_reinterpret(toy, toy_stats):
  """Stats of two calibration halves merge to the stats of all windows; one histogram serves many observers."""
  m, calib, _ = toy
  obs = O.PercentileObserver(percentile=99.0)
  whole = calibrate(m, m.params, calib, STATIC, observer=obs, batch_size=3, progress=False)
  a = calibrate(m, m.params, calib[:3], STATIC, observer=obs, batch_size=3, progress=False)
  b = calibrate(m, m.params, calib[3:], STATIC, observer=obs, batch_size=3, progress=False)
  merged = a.merge(b)
  for k in whole.keys():
    np.testing.assert_array_equal(np.asarray(merged[k].counts), np.asarray(whole[k].counts))
  mm = whole.with_observer(O.PercentileObserver(percentile=100.0)).amax()
  exact = toy_stats[0].amax()
  for k in exact:
    assert float(mm[k]) == float(exact[k])
  assert isinstance(jax.tree.map(lambda x: x, whole), ActivationStats)
  with pytest.raises(ValueError, match="same state type"):
    whole.with_observer(O.MinMaxObserver())
