"""KV-cache quantization math (`jquant.kvcache`): codes, bounds against float64 NumPy, bytes formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import generate, kvcache, models
from jquant.kvcache import KVCacheSpec

CFG = models.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)  # head_dim 16


def _np_asym(xg, qmax):
  """float64 reference: per-group (last axis) asymmetric min/max quantization; (scale, min, x_hat)."""
  mn, mx = xg.min(-1, keepdims=True), xg.max(-1, keepdims=True)
  scale = np.where(mx > mn, (mx - mn) / qmax, 1.0)
  codes = np.clip(np.round((xg - mn) / scale), 0, qmax)
  return scale, mn, codes * scale + mn


@pytest.mark.parametrize("bits,group", [(8, None), (8, 8), (4, None), (4, 4)])
def test_per_token_quantization_within_half_a_step_of_float64(bits, group):
  rng = np.random.default_rng(bits + (group or 0))
  x = rng.normal(size=(2, 5, 3, 16)) * rng.uniform(0.1, 10, size=(1, 1, 1, 16))
  x[0, 0, 0] = 0.7  # a constant group: scale 1, exact
  spec = KVCacheSpec(bits=bits, group_size=group)
  codes, scale, mn = jax.jit(kvcache.quantize_per_token, static_argnums=1)(jnp.asarray(x, jnp.float32), spec)
  assert codes.dtype == jnp.uint8 and codes.shape[-1] == (16 if bits == 8 else 8)
  x_hat = np.asarray(jax.jit(kvcache.dequantize_per_token, static_argnums=(3, 4))(codes, scale, mn, spec, 16),
                     np.float64)
  g = 16 // (group or 16)
  xg = np.asarray(x, np.float32).astype(np.float64).reshape(2, 5, 3, g, -1)
  s64, m64, ref = _np_asym(xg, 2**bits - 1)
  np.testing.assert_allclose(np.asarray(scale, np.float64), s64[..., 0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(mn, np.float64), m64[..., 0], rtol=0, atol=0)
  step = np.repeat(s64, 16 // g, -1).reshape(x.shape)
  tol = 1e-5 * (np.abs(x) + np.abs(np.repeat(m64, 16 // g, -1).reshape(x.shape)))  # float32 arithmetic
  err = np.abs(x_hat - np.asarray(x, np.float32))
  assert np.all(err <= step / 2 + tol), float(np.max(err / step))
  # Codes equal the float64 ones except at exact ties: x_hat agrees within one step and mostly exactly.
  d = np.abs(x_hat - ref.reshape(x.shape))
  assert np.all(d <= step + tol) and np.mean(d <= tol + 1e-7) > 0.99
  assert np.all(x_hat[0, 0, 0] == np.float32(0.7))


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_blocks_and_padding_mask_match_float64(bits):
  rng = np.random.default_rng(bits)
  x = rng.normal(size=(2, 8, 1, 16)).astype(np.float32)
  x[1, :2] = 100.0  # left padding of row 1: out of the statistics, so it clips
  valid = np.ones((2, 8), bool)
  valid[1, :2] = False
  spec = KVCacheSpec(bits=bits, key_axis="channel", key_block=4)
  codes, scale, mn = jax.jit(kvcache.quantize_per_channel, static_argnums=1)(jnp.asarray(x), spec, jnp.asarray(valid))
  assert scale.shape == (2, 2, 1, 16)
  x_hat = np.asarray(jax.jit(kvcache.dequantize_per_channel, static_argnums=(3, 4))(codes, scale, mn, spec, 16),
                     np.float64)
  xb = x.astype(np.float64).reshape(2, 2, 4, 1, 16)
  vb = valid.reshape(2, 2, 4, 1, 1)
  mn64 = np.where(vb, xb, np.inf).min(2, keepdims=True)
  mx64 = np.where(vb, xb, -np.inf).max(2, keepdims=True)
  s64 = (mx64 - mn64) / (2**bits - 1)
  np.testing.assert_allclose(np.asarray(scale, np.float64), s64[:, :, 0], rtol=1e-6)
  step = np.broadcast_to(s64, xb.shape).reshape(x.shape)
  err = np.abs(x_hat - x)
  tol = 1e-5 * (np.abs(x) + np.abs(np.broadcast_to(mn64, xb.shape).reshape(x.shape)))
  assert np.all((err <= step / 2 + tol)[valid])
  assert np.all(x_hat[1, :2] <= mx64[1, 0, 0] + tol[1, :2])  # padding clipped to the valid range


def test_int4_packing_round_trips_every_code():
  c = jnp.asarray(np.arange(256).reshape(16, 16) % 16, jnp.uint8)
  p = kvcache.pack_int4(c)
  assert p.shape == (16, 8) and p.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(kvcache.unpack_int4(p)), np.asarray(c))
  assert int(p[0, 0]) == 0 | 1 << 4


@pytest.mark.parametrize("spec", [None, KVCacheSpec(bits=8), KVCacheSpec(bits=4, group_size=8),
                                  KVCacheSpec(bits=4, key_axis="channel", key_block=8, group_size=4),
                                  KVCacheSpec(bits=8, key_axis="channel", scale_dtype="float16")])
def test_cache_bytes_equal_the_formula(spec):
  m = models.Model(CFG, None)
  cache = generate.init_cache(m, batch=3, max_len=21, kv_cache=spec)
  s = kvcache.padded_len(21, spec)
  assert cache.max_len == s and (spec is None or spec.key_axis == "token" or s % spec.key_block == 0)
  want = kvcache.cache_bytes(spec, n_layers=2, batch=3, max_len=s, n_kv_heads=1, head_dim=16)
  assert cache.nbytes == want
  # Hand count for the int4 g8 per-token cache: codes 8 bytes + 2 groups x (scale, min) x 4 bytes per token.
  if spec == KVCacheSpec(bits=4, group_size=8):
    assert want == 2 * 2 * 3 * 21 * (8 + 16)


def test_fake_quantize_matches_the_cache_read():
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.normal(size=(1, 8, 1, 16)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, 8, 1, 16)), jnp.float32)
  for spec in (KVCacheSpec(bits=4, group_size=8), KVCacheSpec(bits=4, key_axis="channel", key_block=4)):
    @jax.jit
    def both(k, v):
      layer = kvcache.init_layer(spec, 1, 8, 1, 16, jnp.float32)
      layer = kvcache.write(layer, spec, k, v, jnp.asarray(0))
      return kvcache.read(layer, spec, jnp.asarray(8), jnp.float32), kvcache.fake_quantize(k, v, spec)

    (kr, vr), (kf, vf) = both(k, v)
    np.testing.assert_array_equal(np.asarray(kr), np.asarray(kf))
    np.testing.assert_array_equal(np.asarray(vr), np.asarray(vf))
  mask = np.asarray(kvcache.channel_key_mask(6, KVCacheSpec(key_axis="channel", key_block=2)))
  assert mask[1, :2].all() and not mask[2, 2] and mask[3, :4].all() and not mask[4, 4:].any() and mask[5].all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits=3"), (dict(bits=16), "bits=16"), (dict(key_axis="head"), "key_axis='head'"),
    (dict(group_size=0), "group_size=0"), (dict(key_block=0), "key_block=0"),
    (dict(scale_dtype="int8"), "scale_dtype='int8'")])
def test_spec_errors_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    KVCacheSpec(**kwargs)


def test_group_size_must_divide_head_dim():
  m = models.Model(CFG, None)
  with pytest.raises(ValueError, match=r"group_size=6 does not divide the model's head_dim=16"):
    generate.init_cache(m, 1, 8, KVCacheSpec(group_size=6))
  with pytest.raises(ValueError, match="group_size=5"):
    generate.with_kv_fake_quant(m, KVCacheSpec(group_size=5))
  with pytest.raises(TypeError, match="kv_cache=8"):
    generate.init_cache(m, 1, 8, 8)
