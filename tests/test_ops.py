"""jquant.ops: the one int8 activation quantizer, shared bit for bit by W8A8 serving, the kernels' reference,
QAT's activation fake quantization and the fake-quant functions searches score with."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
import jquant.qat as qat
from jquant import ops
from pallas_kernels.w8a8 import reference

INT8 = jquant.QuantSpec(bits=8)


def _np_per_token(x, bits=8):
  """The documented arithmetic in NumPy float32: scale = amax * fl(1/qmax), codes = round(x * fl(1/scale))."""
  qmax = 2 ** (bits - 1) - 1
  x = np.asarray(x, np.float32)
  amax = np.max(np.abs(x), axis=-1, keepdims=True)
  scale = np.where(amax > 0, amax * np.float32(1.0 / qmax), np.float32(1.0)).astype(np.float32)
  codes = np.clip(np.round(x * (np.float32(1.0) / scale)), -qmax, qmax).astype(np.int8)
  return codes, scale


def _np_static(x, scale, bits=8):
  qmax = 2 ** (bits - 1) - 1
  inv = np.float32(1.0) / np.float32(scale)
  return np.clip(np.round(np.asarray(x, np.float32) * inv), -qmax, qmax).astype(np.int8)


def _hard_inputs():
  """Odd shapes, rows of zeros, huge outliers, tiny values, exact .5 ties, bfloat16."""
  k = jax.random.split(jax.random.key(0), 4)
  a = np.asarray(jax.random.normal(k[0], (3, 5, 97)), np.float32) * 3.0
  a[0, 1] = 0.0                                     # a row of zeros: scale 1, codes 0
  a[1, :, 7] *= 1e4                                  # an outlier channel (attention-sink like)
  a[2, 4] = np.linspace(-1e-30, 1e-30, 97)           # tiny values
  b = np.asarray(jax.random.normal(k[1], (1, 1)), np.float32)
  c = (np.arange(13 * 7, dtype=np.float32).reshape(7, 13) - 40.0) / 2.0   # many exact .5 ties
  d = jax.random.normal(k[2], (6, 33)).astype(jnp.bfloat16)
  return [a, b, c, d]


@pytest.mark.parametrize("i", range(4))
def test_per_token_codes_and_scales_are_one_quantizer(i):
  x = _hard_inputs()[i]
  codes, scale = ops.quantize_activations_per_token(x)
  assert codes.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == x.shape[:-1] + (1,)
  ref_c, ref_s = _np_per_token(np.asarray(jnp.asarray(x, jnp.float32)))
  np.testing.assert_array_equal(np.asarray(codes), ref_c)
  np.testing.assert_array_equal(np.asarray(scale), ref_s)
  assert int(np.abs(ref_c).max()) <= 127
  # Eager, jitted and the kernels' reference give the same codes and scales.
  for c2, s2 in (jax.jit(ops.quantize_activations_per_token)(x), reference.quantize_per_token(x)):
    np.testing.assert_array_equal(np.asarray(c2), ref_c)
    np.testing.assert_array_equal(np.asarray(s2), ref_s)
  # W8A8 serving quantizes its input with exactly these (dynamic weights).
  k = x.shape[-1]
  w8 = ops.W8A8Weight(jquant.quantize(jax.random.normal(jax.random.key(9), (k, 12)), INT8))
  c3, s3 = w8.quantize_input(x)
  np.testing.assert_array_equal(np.asarray(c3), ref_c)
  np.testing.assert_array_equal(np.asarray(s3), ref_s)
  # QAT's activation fake quantization is codes * scale in x's dtype.
  fq = qat.fake_quant_activations(x, 8)
  want = (ref_c.astype(np.float32) * ref_s).astype(np.asarray(jnp.asarray(x)).dtype)
  np.testing.assert_array_equal(np.asarray(fq), want)
  fq2, s4 = ops.fake_quant_activations_per_token(x)
  np.testing.assert_array_equal(np.asarray(fq2), want)
  np.testing.assert_array_equal(np.asarray(s4), ref_s)


@pytest.mark.parametrize("i", range(4))
def test_w8a8_product_serving_and_qat_training_agree_with_int64_numpy(i):
  x = jnp.asarray(_hard_inputs()[i], jnp.float32)
  k = x.shape[-1]
  w = jax.random.normal(jax.random.key(5), (k, 24)).at[3].multiply(50.0)
  q = jquant.quantize(w, INT8)
  ref_c, ref_s = _np_per_token(np.asarray(x))
  acc64 = ref_c.reshape(-1, k).astype(np.int64) @ np.asarray(q.qvalue).astype(np.int64)
  with ops.force_xla():
    served = ops.qdot(x, ops.W8A8Weight(q))
  ws = np.asarray(q.scale, np.float32).reshape(-1)
  want = (acc64.astype(np.float32) * ref_s.reshape(-1, 1) * ws).reshape(x.shape[:-1] + (24,))
  np.testing.assert_array_equal(np.asarray(served), want)     # int32 sums are exact; the epilogue is one order
  # QAT's W8A8 training forward (fake-quantized weight + per-channel scales) runs the same arithmetic.
  w_fq = jquant.dequantize(q)
  train = ops.qdot(x, qat.ActFakeQuant(w_fq, 8, q.scale.reshape(-1)))
  np.testing.assert_array_equal(np.asarray(train), np.asarray(served))


def test_static_quantizer_is_shared_and_constant_folding_safe():
  x = jnp.asarray(_hard_inputs()[0])
  for amax in (3.0, 7.77, 1e-12, 0.0):
    s = ops.static_activation_scale(jnp.asarray([amax, amax / 2]))
    assert float(s) == float(np.float32(max(amax, 1e-8)) * np.float32(1 / 127))
    want = _np_static(np.asarray(x), np.asarray(s))
    np.testing.assert_array_equal(np.asarray(ops.quantize_activations_static(x, s)), want)
    # A static scale closed over is a constant of the compiled program (XLA folds it): same codes.
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: ops.quantize_activations_static(a, s))(x)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(ops.quantize_activations_static)(x, s)), want)
    c, xs = ops.W8A8Weight(jquant.quantize(jnp.ones((97, 4)), INT8), s).quantize_input(x)
    np.testing.assert_array_equal(np.asarray(c), want)
    assert float(xs) == float(s)
    np.testing.assert_array_equal(np.asarray(ops.fake_quant_activations_static(x, s)),
                                  want.astype(np.float32) * np.asarray(s))
  # jquant.calibrate derives static scales with the same function.
  from jquant.calibrate import act_scale_from_amax
  assert float(act_scale_from_amax(5.0)) == float(ops.static_activation_scale(5.0))


def test_fake_quant_gradients_are_straight_through():
  x = jnp.array([[0.3, -2.0, 5.0, 0.0]])
  g = jax.grad(lambda a: ops.fake_quant_activations_per_token(a)[0].sum())(x)
  np.testing.assert_array_equal(np.asarray(g), np.ones_like(x))
  s = jnp.float32(2.0 / 127)                         # clips |x| > 2 (plus half a step)
  g = jax.grad(lambda a: (ops.fake_quant_activations_static(a, s) * jnp.arange(1.0, 5.0)).sum())(x)
  np.testing.assert_array_equal(np.asarray(g), [[1.0, 2.0, 0.0, 4.0]])


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_fewer_bits(bits):
  x = _hard_inputs()[0]
  codes, scale = ops.quantize_activations_per_token(x, bits)
  ref_c, ref_s = _np_per_token(x, bits)
  np.testing.assert_array_equal(np.asarray(codes), ref_c)
  np.testing.assert_array_equal(np.asarray(scale), ref_s)
  assert int(np.abs(ref_c).max()) == 2 ** (bits - 1) - 1
  np.testing.assert_array_equal(np.asarray(qat.fake_quant_activations(x, bits)), ref_c.astype(np.float32) * ref_s)


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match=r"bits=9; allowed: an int in 2..8"):
    ops.quantize_activations_per_token(jnp.ones((2, 4)), 9)
  with pytest.raises(TypeError, match="x has dtype int32"):
    ops.quantize_activations_static(jnp.ones((2, 4), jnp.int32), 0.1)
  with pytest.raises(ValueError, match="x is a scalar"):
    ops.quantize_activations_per_token(jnp.float32(1.0))


def test_non_finite_activations_give_non_finite_rows_on_every_activation_quantizing_path():
  # Reported: a NaN in x came out as a finite row through IntMatmulWeight (all-NaN x: all zeros).
  w = jax.random.normal(jax.random.key(0), (64, 32))
  q4 = jquant.quantize(w, jquant.QuantSpec(bits=4, granularity="group", group_size=32))
  q8 = jquant.quantize(w, jquant.QuantSpec(bits=8, granularity="channel"))
  for bad in (jnp.nan, jnp.inf):
    x = jnp.ones((2, 64)).at[0, 5].set(bad)
    for leaf in (jquant.ops.IntMatmulWeight(q4, 8), jquant.ops.IntMatmulWeight(q4, 4), jquant.ops.W8A8Weight(q8),
                 jquant.ops.W8A8Weight(q8, jnp.float32(0.01))):
      y = np.asarray(jquant.ops.qdot(x, leaf))
      assert not np.isfinite(y[0]).any(), (bad, type(leaf).__name__)
      assert np.isfinite(y[1]).all()
  assert not np.isfinite(np.asarray(jquant.ops.qdot(jnp.full((2, 64), jnp.nan), jquant.ops.IntMatmulWeight(q4, 8)))).any()
  _, s = jquant.ops.quantize_activations_per_token(jnp.array([[1.0, jnp.nan], [0.0, 0.0]]))
  assert np.isnan(s[0, 0]) and s[1, 0] == 1.0
  fq = jquant.ops.fake_quant_activations_static(jnp.array([1.0, jnp.nan, -jnp.inf]), jnp.float32(0.01))
  assert fq[0] == 1.0 and np.isnan(fq[1]) and fq[2] == -np.inf


def test_int_matmul_weight_is_checked_when_built_not_when_unflattened():
  # Reviewed: IntMatmulWeight(q, act_bits=9) or an asymmetric weight was accepted until qdot ran.
  w = jax.random.normal(jax.random.key(1), (64, 8))
  q4 = jquant.quantize(w, jquant.QuantSpec(bits=4, granularity="group", group_size=32))
  with pytest.raises(ValueError, match=r"IntMatmulWeight\(act_bits\): bits=9; allowed: an int in 2..8"):
    ops.IntMatmulWeight(q4, 9)
  with pytest.raises(ValueError, match=r"weight is a ArrayImpl; allowed: a QArray"):
    ops.IntMatmulWeight(w, 8)
  with pytest.raises(ValueError, match=r"weight must be a symmetric one-level QArray.*symmetric=False"):
    ops.IntMatmulWeight(jquant.quantize(w, jquant.QuantSpec(bits=4, symmetric=False)))
  # An N-D weight is built (it runs through jquant.quantized, as a (K, N) view); qdot on it directly says so.
  q3d = jquant.quantize(w.reshape(4, 16, 8), jquant.QuantSpec(bits=4, axis=(0, 1)))
  with pytest.raises(ValueError, match=r"\(K, N\) contracting axis 0 for qdot; got shape \(4, 16, 8\)"):
    ops.qdot(jnp.ones((2, 64)), ops.IntMatmulWeight(q3d, 8))
  # Rebuilt from tracers and placeholders without checks: jit, tree_map to None, unflatten with object()s.
  leaf = ops.IntMatmulWeight(q4, 4)
  x = jax.random.normal(jax.random.key(2), (3, 64))
  back = jax.jit(lambda l: l)(leaf)                        # unflattened from tracers inside, arrays outside
  assert isinstance(back, ops.IntMatmulWeight) and back.act_bits == 4
  np.testing.assert_array_equal(np.asarray(back.weight.codes()), np.asarray(q4.codes()))
  assert jax.jit(ops.qdot)(x, leaf).shape == (3, 8)
  assert jax.tree_util.tree_map(lambda a: None, leaf).act_bits == 4
  treedef = jax.tree_util.tree_structure(leaf)
  assert jax.tree_util.tree_unflatten(treedef, [object()] * treedef.num_leaves).act_bits == 4
