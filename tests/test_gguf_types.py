"""GGUF grids as jquant specs: float16 scales, float mins, two-level scales, dense packing, presets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import packing, twolevel
from jquant.gguf import types

_RNG = np.random.default_rng(0)


def _w(k, n, scale=0.05):
  return jnp.asarray((_RNG.standard_normal((k, n)) * scale).astype(np.float32))


def _k(name):
  return 512 if name.endswith("_K") else 96


def test_presets_bits_per_weight_and_type_of():
  for name in types.QUANT_TYPES:
    spec = types.spec_for(name)
    assert types.type_of(spec) == name
    q = jquant.quantize(_w(_k(name), 7), spec)
    # Packed at the type's own size: payload + scales + super-group values.
    assert q.nbytes * 8 / (_k(name) * 7) == types.bits_per_weight(name)
    assert types.type_of(q) == name
  assert types.type_of(jquant.QuantSpec(bits=4, granularity="group", group_size=32)) is None
  assert types.spec_for("q4_k", clip="mse").clip == "mse"


@pytest.mark.parametrize("name", types.QUANT_TYPES)
def test_values_are_exactly_the_grid(name):
  """Every dequantized value is (effective scale) * code - (effective min) with codes and scale codes
  in the type's ranges, and the super-group values are float16 numbers."""
  spec = types.spec_for(name)
  w = _w(_k(name), 5).at[:, 2].set(0.0)  # an all-zero column: scales 0 (two-level) or 1, codes 0
  q = jquant.quantize(w, spec)
  c = np.asarray(q.codes())
  assert c.min() >= spec.qmin and c.max() <= spec.qmax
  s, z = (np.asarray(a) if a is not None else None for a in q.group_params())
  g = spec.group_size
  ref = np.repeat(s, g, axis=0) * c.astype(np.float32)
  if z is not None:
    ref = ref - np.repeat(z, g, axis=0)
  np.testing.assert_array_equal(np.asarray(jquant.dequantize(q)), ref)
  np.testing.assert_array_equal(np.asarray(jquant.dequantize(q))[:, 2], 0.0)
  if spec.two_level:
    sc, m = q.scale_codes()
    lo, hi = spec.scale_code_range
    assert int(sc.min()) >= lo and int(sc.max()) <= hi
    assert q.super_scale.dtype == jnp.float16
    if m is not None:
      assert int(m.min()) >= 0 and int(m.max()) <= 2**spec.scale_bits - 1
  else:
    assert q.scale.dtype == jnp.float16
    np.testing.assert_array_equal(s, np.asarray(q.scale).astype(np.float32))


@pytest.mark.parametrize("name", ["Q4_1", "Q5_0", "Q4_K", "Q6_K", "Q2_K", "Q3_K"])
def test_rtn_error_is_within_half_a_step(name):
  """RTN onto the grid: every unclipped value is within half an effective step of its weight."""
  spec = types.spec_for(name)
  w = _w(_k(name), 9)
  q = jquant.quantize(w, spec)
  s, _ = q.group_params()
  step = np.abs(np.repeat(np.asarray(s), spec.group_size, axis=0))  # full_range scales carry a sign
  err = np.abs(np.asarray(jquant.dequantize(q) - w))
  c = np.asarray(q.codes())
  inside = (c > spec.qmin) & (c < spec.qmax)
  assert inside.mean() > 0.5
  assert (err[inside] <= step[inside] * (0.5 + 1e-5)).all()


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K", "Q6_K", "Q3_K"])
def test_solver_exchange_round_trip(name):
  """compute_scale_zero -> quantize_values -> from_codes lands on the same QArray as quantize (codes,
  scale codes, super-group values), so solvers taking group parameters from there land on the grid."""
  spec = types.spec_for(name)
  w = _w(_k(name), 6)
  s, z = jquant.compute_scale_zero(w, spec)
  c, s2, z2 = jquant.quantize_values(w, spec, scale=s, zero_point=z)
  a = jquant.QArray.from_codes(c, s2, z2, spec)
  b = jquant.quantize(w, spec)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # fake_quant is the same grid, with a straight-through gradient.
  np.testing.assert_array_equal(np.asarray(jquant.fake_quant(w, spec)), np.asarray(jquant.dequantize(b)))
  g = jax.grad(lambda x: jquant.fake_quant(x, spec).sum())(w)
  assert float(g.max()) == 1.0


def test_from_codes_rejects_effective_scales_off_the_grid():
  spec = types.spec_for("Q4_K")
  w = _w(512, 3)
  c, s, z = jquant.quantize_values(w, spec)
  with pytest.raises(ValueError, match="not on the two-level grid"):
    jquant.QArray.from_codes(c, s * 1.001, z, spec)
  # Under jit it cannot raise: the super-group scale becomes NaN.
  q = jax.jit(jquant.QArray.from_codes, static_argnums=3)(c, s * 1.001, z, spec)
  assert bool(jnp.isnan(q.super_scale).any())


def test_decompose_finds_any_exact_split():
  spec = types.spec_for("Q6_K")
  d = jnp.asarray([[0.0123], [0.5]], jnp.float16).astype(jnp.float32)
  codes = jnp.asarray(_RNG.integers(-128, 128, (32, 1)), jnp.int32)
  eff = twolevel.combine(codes, d, spec)
  c2, s2, ok = twolevel.decompose(eff, spec, signed=True)
  assert bool(ok.all())
  np.testing.assert_array_equal(np.asarray(twolevel.combine(c2, s2, spec)), np.asarray(eff))


def test_float16_scales_and_float_min():
  spec = jquant.QuantSpec(bits=4, symmetric=False, offset="min", granularity="group", group_size=32,
                          scale_dtype="float16")
  w = _w(64, 4) + 0.3  # all positive: the range still holds 0, min = -lo = 0
  q = jquant.quantize(w, spec)
  assert q.scale.dtype == jnp.float16 and q.zero_point.dtype == jnp.float16
  s, m = q.group_params()
  ref = np.repeat(np.asarray(s), 32, 0) * np.asarray(q.codes(), np.float32) - np.repeat(np.asarray(m), 32, 0)
  np.testing.assert_array_equal(np.asarray(jquant.dequantize(q)), ref)
  with pytest.raises(ValueError, match="overflows float16"):
    jquant.quantize(jnp.full((32, 1), 1e7), spec)


@pytest.mark.parametrize("kwargs,match", [
    (dict(offset="min"), "offset='min' needs symmetric=False"),
    (dict(symmetric=False, offset="zp"), "offset='zp'"),
    (dict(granularity="group", group_size=32, super_group_size=256), "go together"),
    (dict(granularity="group", group_size=32, super_group_size=256, scale_bits=9), "scale_bits=9"),
    (dict(granularity="group", group_size=48, super_group_size=256, scale_bits=6), "not a multiple"),
    (dict(symmetric=False, granularity="group", group_size=32, super_group_size=256, scale_bits=6),
     "need offset='min'"),
    (dict(dense_pack=1), "dense_pack"), (dict(symmetric=False, full_range=True), "full_range")])
def test_bad_grid_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jquant.QuantSpec(**kwargs)


def test_two_level_size_errors():
  spec = types.spec_for("Q4_K")
  with pytest.raises(ValueError, match="super_group_size=256 does not divide the contraction size 576"):
    jquant.quantize(_w(576, 2), spec)
  with pytest.raises(ValueError, match="static_groups=True"):
    jquant.compute_scale_zero(_w(512, 2), spec.replace(granularity="channel", group_size=None))
  with pytest.raises(ValueError, match="non-finite"):
    jquant.quantize(_w(512, 2).at[3, 1].set(jnp.nan), spec)


def test_gguf_type_errors():
  with pytest.raises(ValueError, match="IQ4_NL.*supported: F32"):
    types.spec_for("IQ4_NL")
  with pytest.raises(ValueError, match="float type"):
    types.spec_for("F16")
  with pytest.raises(ValueError, match="change Q4_K's grid"):
    types.spec_for("Q4_K", bits=3)


def test_fallback_types_follow_llama_cpp():
  assert types.fallback_type("Q4_K", 1536) == ("Q4_K", None)
  assert types.fallback_type("Q4_K", 576)[0] == "Q5_0"
  assert types.fallback_type("Q5_K", 576)[0] == "Q5_1"
  assert types.fallback_type("Q6_K", 576)[0] == "Q8_0"
  t, why = types.fallback_type("Q3_K", 640)
  assert t == "Q4_0" and "IQ4_NL" in why
  assert types.fallback_type("Q4_K", 100)[0] == "F16"
  with pytest.raises(ValueError, match="fallback=False"):
    types.fallback_type("Q4_K", 576, fallback=False)


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_dense_packing(bits):
  codes = _RNG.integers(0, 2**bits, (37, 3))
  p = packing.pack(codes, bits, 0, dense=True)
  assert p.shape[0] == packing.packed_size(37, bits, dense=True) < 37
  assert 0 <= p.shape[0] * 8 - 37 * bits < 8 * bits  # dense up to the padding of the last unit
  stream = np.unpackbits(np.asarray(p)[:, 1], bitorder="little")
  ref = ((codes[:, 1][:, None] >> np.arange(bits)) & 1).ravel()
  np.testing.assert_array_equal(stream[:ref.size], ref)  # one little-endian bit string
  np.testing.assert_array_equal(np.asarray(packing.unpack(p, bits, 37, 0, dense=True)), codes)
  # Default packing is unchanged: one code per byte.
  assert packing.packed_size(37, bits) == 37


def test_standard_specs_unchanged():
  """Default specs keep their layout and pytree structure (three children)."""
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=32)
  q = jquant.quantize(_w(64, 3), spec)
  assert spec.standard_layout and not types.spec_for("Q4_0").standard_layout
  assert len(jax.tree_util.tree_leaves(q)) == 2 and q.super_scale is None
  assert jax.tree_util.tree_structure(q).num_leaves == 2


@pytest.mark.parametrize("name", ["Q4_1", "Q5_K", "Q2_K"])
def test_checkpoint_and_jax_export_round_trip(tmp_path, name):
  q = jquant.quantize(_w(_k(name), 5), types.spec_for(name))
  tree = {"w": q, "b": jnp.ones(3)}
  back = jquant.load(jquant.save(tmp_path / "ckpt", tree))["w"]
  assert back.spec == q.spec
  for x, y in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  exp = jquant.export.export(jquant.dequantize, platforms=("cpu",))(q)
  restored = jquant.export.deserialize(exp.serialize())
  np.testing.assert_array_equal(np.asarray(restored.call(q)), np.asarray(jquant.dequantize(q)))


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K", "Q3_K"])
def test_gptq_static_groups_on_the_grid(name):
  """GPTQ with static groups solves on the type's grid: its result is a QArray of that type whose error
  on the calibration inputs is below RTN's."""
  spec = types.spec_for(name)
  w = _w(_k(name), 16)
  x = jnp.asarray(_RNG.standard_normal((1024, w.shape[0])).astype(np.float32) *
                  np.linspace(0.2, 3.0, w.shape[0]).astype(np.float32))
  h = jquant.gptq.hessian(x)
  q, _ = jquant.gptq.solve(w, h, spec, static_groups=True)
  assert types.type_of(q) == name
  rtn = jquant.quantize(w, spec)
  err = lambda a: float(jnp.mean((x @ (jquant.dequantize(a) - w)) ** 2))  # noqa: E731
  assert err(q) < err(rtn)
  c = np.asarray(q.codes())
  assert c.min() >= spec.qmin and c.max() <= spec.qmax


def test_full_range_uses_every_level():
  """full_range (llama.cpp's Q4_0/Q5_0/Q3_K/Q6_K scale choice): each group's largest magnitude lands on
  qmin exactly, the scale carrying its sign; the grid (and so the GGML type) is the same."""
  spec = types.spec_for("Q4_0")
  assert spec.full_range and types.type_of(spec.replace(full_range=False)) == "Q4_0"
  w = _w(64, 5)
  q = jquant.quantize(w, spec)
  c = np.asarray(q.codes()).reshape(2, 32, 5)
  g = np.asarray(w).reshape(2, 32, 5)
  at = np.abs(g).argmax(axis=1)
  np.testing.assert_array_equal(np.take_along_axis(c, at[:, None], 1)[:, 0], -8)
  s = np.asarray(q.scale, np.float32)
  assert (np.sign(s) == -np.sign(np.take_along_axis(g, at[:, None], 1)[:, 0])).all()
  narrow = jquant.quantize(w, spec.replace(full_range=False))
  err = lambda a: float(jnp.mean((jquant.dequantize(a) - w) ** 2))  # noqa: E731
  assert err(q) < err(narrow)
