"""QArray quantizers: bounds from the math, a float64 NumPy reference, STE, nbytes, jit/vmap, shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import jquant
from jquant import packing

GRANULARITIES = [("tensor", None), ("channel", None), ("group", 16)]


def numpy_reference(x, bits, symmetric, granularity, group_size):
  """Independent float64 quantizer along axis 0 of a 2-D array (min-max ranges)."""
  x = np.asarray(x, np.float64)
  k, n = x.shape
  if granularity == "tensor":
    groups = [x.reshape(-1, 1)]
    gshape = (1, -1)
  else:
    g = k if granularity == "channel" else group_size
    groups = x.reshape(k // g, g, n)
  out = np.empty_like(x)
  if granularity == "tensor":
    blocks = [(slice(None), slice(None))]
  else:
    g = k if granularity == "channel" else group_size
    blocks = [(slice(i, i + g), slice(None)) for i in range(0, k, g)]
  for rows, cols in blocks:
    blk = x[rows, cols]
    lo, hi = blk.min(axis=0 if granularity != "tensor" else None), blk.max(axis=0 if granularity != "tensor" else None)
    if symmetric:
      qmax = 2 ** (bits - 1) - 1
      scale = np.maximum(np.abs(lo), np.abs(hi)) / qmax
      scale = np.where(scale > 1e-30, scale, 1.0)
      q = np.clip(np.round(blk / scale), -qmax - 1, qmax)
      out[rows, cols] = q * scale
    else:
      qmax = 2**bits - 1
      lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
      scale = (hi - lo) / qmax
      scale = np.where(scale > 1e-30, scale, 1.0)
      zero = np.clip(np.round(-lo / scale), 0, qmax)
      q = np.clip(np.round(blk / scale) + zero, 0, qmax)
      out[rows, cols] = (q - zero) * scale
  del groups
  return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group_size", GRANULARITIES)
def test_error_bound_and_numpy_reference(bits, symmetric, granularity, group_size):
  x = jax.random.normal(jax.random.key(bits), (64, 24)) * 3.0
  spec = jquant.QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
  q = jquant.quantize(x, spec)
  deq = np.asarray(jquant.dequantize(q))
  scale = np.asarray(jquant.expand_to_groups(q.scale, spec, 64))
  # |x - deq| <= scale / 2 inside the range (min-max ranges: everything is inside).
  assert np.all(np.abs(deq - np.asarray(x)) <= scale / 2 * (1 + 1e-5) + 1e-7)
  ref = numpy_reference(x, bits, symmetric, granularity, group_size)
  np.testing.assert_allclose(deq, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@settings(max_examples=10, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), k=st.integers(1, 20), n=st.integers(1, 4),
       seed=st.integers(0, 1000))
def test_codes_round_trip_through_packing(bits, symmetric, k, n, seed):
  x = jax.random.normal(jax.random.key(seed), (k, n))
  spec = jquant.QuantSpec(bits=bits, symmetric=symmetric)
  codes, scale, zero = jquant.quantize_values(x, spec)
  q = jquant.QArray.from_codes(codes, scale, zero, spec)
  np.testing.assert_array_equal(np.asarray(q.codes()), np.asarray(codes))
  assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax


@pytest.mark.parametrize("bits,symmetric,granularity,group_size", [
    (8, True, "channel", None), (4, True, "group", 128), (4, False, "group", 128),
    (3, True, "group", 128), (2, False, "group", 64)])
def test_nbytes_formula(bits, symmetric, granularity, group_size):
  k, n = 512, 96
  x = jax.random.normal(jax.random.key(0), (k, n))
  spec = jquant.QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
  q = jquant.quantize(x, spec)
  groups = k // group_size if group_size else 1
  payload = {8: k, 4: k // 2, 3: k * 3 // 8, 2: k // 4}[bits] * n
  expected = payload + groups * n * 4 + (0 if symmetric else groups * n)
  assert q.nbytes == expected
  assert q.qvalue.nbytes == payload


def test_mse_clipping_never_worse_than_minmax():
  x = jax.random.laplace(jax.random.key(1), (256, 32))
  base = jquant.QuantSpec(bits=3, granularity="group", group_size=64)
  err = lambda s: float(jnp.sum((jquant.dequantize(jquant.quantize(x, s)) - x) ** 2))
  assert err(base.replace(clip="mse", mse_norm=2.0)) <= err(base) * (1 + 1e-6)


def test_pad_groups_short_last_group():
  x = jax.random.normal(jax.random.key(2), (576, 8))
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=128, pad_groups=True)
  q = jquant.quantize(x, spec)
  assert q.scale.shape == (5, 8) and q.shape == (576, 8)
  scale = np.asarray(jquant.expand_to_groups(q.scale, spec, 576))
  assert np.all(np.abs(np.asarray(jquant.dequantize(q) - x)) <= scale / 2 * (1 + 1e-5))
  # The short group's scale comes from its own 64 values only.
  np.testing.assert_allclose(np.asarray(q.scale[4]), np.abs(np.asarray(x[512:])).max(0) / 7, rtol=1e-6)


def test_stochastic_rounding_is_unbiased_and_needs_key():
  spec = jquant.QuantSpec(bits=4, granularity="tensor", rounding="stochastic")
  x = jnp.full((4096, 1), 0.3).at[0, 0].set(7.0)  # scale = 1, so 0.3 rounds up 30% of the time
  with pytest.raises(ValueError, match="key"):
    jquant.quantize(x, spec)
  mean = float(jquant.dequantize(jquant.quantize(x, spec, key=jax.random.key(0)))[1:].mean())
  assert abs(mean - 0.3) < 0.03


def test_fake_quant_forward_and_ste_gradient():
  x = jax.random.normal(jax.random.key(3), (32, 8))
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=16, clip_ratio=0.5)
  np.testing.assert_array_equal(np.asarray(jquant.fake_quant(x, spec)),
                                np.asarray(jquant.dequantize(jquant.quantize(x, spec))))
  g = jax.grad(lambda w: jnp.sum(jquant.fake_quant(w, spec) * 2.0))(x)
  codes, scale, _ = jquant.quantize_values(x, spec)
  s = np.asarray(jquant.expand_to_groups(scale, spec, 32))
  raw = np.asarray(x) / s
  inside = (raw >= spec.qmin - 0.5) & (raw <= spec.qmax + 0.5)
  assert 0 < inside.mean() < 1  # clip_ratio 0.5 clips some
  np.testing.assert_array_equal(np.asarray(g), np.where(inside, 2.0, 0.0))


def test_jit_vmap_tree_map():
  x = jax.random.normal(jax.random.key(4), (3, 64, 16))
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=32)
  q_eager = jax.vmap(lambda a: jquant.quantize(a, spec))(x)
  q_jit = jax.jit(jax.vmap(lambda a: jquant.quantize(a, spec)))(x)
  np.testing.assert_array_equal(np.asarray(q_eager.qvalue), np.asarray(q_jit.qvalue))
  assert q_jit.shape == (3, 64, 16)  # logical shape survives the batch dim
  d = jax.jit(jax.vmap(jquant.dequantize))(q_jit)
  np.testing.assert_array_equal(np.asarray(d[1]), np.asarray(jquant.dequantize(jquant.quantize(x[1], spec))))
  same = jax.tree_util.tree_map(lambda a: a, q_jit)
  assert isinstance(same, jquant.QArray) and same.spec == spec


def test_sharding_kept_through_quantize_params(cpu_mesh):
  w = jax.device_put(jax.random.normal(jax.random.key(5), (256, 64)), NamedSharding(cpu_mesh, P(None, "data")))
  params = {"layer": {"kernel": w}}
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=64)
  q = jquant.quantize_params(params, [jquant.Rule("kernel", spec)])["layer"]["kernel"]
  for leaf in (q.qvalue, q.scale):
    assert leaf.sharding.spec == P(None, "data")
    assert len(leaf.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(jquant.dequantize(q)), np.asarray(jquant.dequantize(jquant.quantize(w, spec))))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1), "bits=1"), (dict(bits=9), "bits=9"), (dict(granularity="row"), "granularity"),
    (dict(granularity="group"), "group_size"), (dict(clip_ratio=0.0), "clip_ratio"),
    (dict(scale_dtype="float64"), "scale_dtype"), (dict(rounding="up"), "rounding")])
def test_bad_specs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jquant.QuantSpec(**kwargs)


def test_bad_inputs():
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=128)
  with pytest.raises(ValueError, match=r"group_size=128 does not divide .* 576.*pad_groups"):
    jquant.quantize(jnp.ones((576, 4)), spec)
  with pytest.raises(ValueError, match="non-finite"):
    jquant.quantize(jnp.ones((128, 4)).at[3, 1].set(jnp.nan), spec)
  with pytest.raises(TypeError, match="int32"):
    jquant.quantize(jnp.ones((128, 4), jnp.int32), spec)
  with pytest.raises(ValueError, match="axis=2"):
    jquant.quantize(jnp.ones((128, 4)), spec.replace(axis=2))


def test_bfloat16_scales_and_all_zero_groups_stay_finite():
  x = jnp.zeros((64, 4)).at[:, 1].set(jnp.linspace(-1, 1, 64))
  q = jquant.quantize(x, jquant.QuantSpec(bits=4, symmetric=False, scale_dtype="bfloat16"))
  assert q.scale.dtype == jnp.bfloat16
  d = jquant.dequantize(q)
  assert bool(jnp.isfinite(d).all()) and float(jnp.abs(d[:, 0]).max()) == 0.0
