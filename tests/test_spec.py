"""QuantSpec and Rule: every field validated, numpy scalars normalised, the symmetric scale rules."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant.spec import QuantSpec, Rule


@pytest.mark.parametrize("kwargs,match", [
    (dict(mse_grid=0), r"mse_grid=0 .*allowed: a positive int"),
    (dict(mse_max_shrink=1.5), r"mse_max_shrink=1.5; allowed: a float in \[0, 1\)"),
    (dict(mse_max_shrink=-1), r"mse_max_shrink=-1; allowed"),
    (dict(mse_norm=-2), r"mse_norm=-2; allowed: a finite float > 0"),
    (dict(mse_norm=float("inf")), "mse_norm=inf"),
    (dict(mse_grid=2.5), r"mse_grid=2.5 \(float\)"),
    (dict(bits=True), r"bits=True \(bool\)"),
    (dict(bits="4"), r"bits='4' \(str\)"),
    (dict(symmetric=1), r"symmetric=1 \(int\); allowed: True or False"),
    (dict(symmetric="yes"), "symmetric='yes'"),
    (dict(granularity=None), "granularity=None"),
    (dict(granularity="group", group_size=0), "group_size=0"),
    (dict(granularity="group", group_size=np.float32(32)), r"group_size=np.float32\(32.0\) \(float32\)"),
    (dict(group_size=32), r"group_size=32 is only meaningful with granularity='group'"),
    (dict(axis=1.0), "axis=1.0"), (dict(axis=(0, 0)), r"axis=\(0, 0\)"), (dict(axis=()), r"axis=\(\)"),
    (dict(scale_dtype="int8"), "scale_dtype='int8'"), (dict(scale_dtype=3), "scale_dtype=3"),
    (dict(rounding=None), "rounding=None"), (dict(clip="max"), "clip='max'"),
    (dict(clip_ratio="0.5"), r"clip_ratio='0.5' \(str\)"), (dict(clip_ratio=float("nan")), "clip_ratio=nan"),
    (dict(clip_ratio=1.5), "clip_ratio=1.5"),
    (dict(pad_groups=1), "pad_groups=1"), (dict(dense_pack="no"), "dense_pack='no'"),
    (dict(offset=None), "offset=None"),
    (dict(super_group_size=256.0, scale_bits=6, granularity="group", group_size=32), "super_group_size=256.0"),
    (dict(super_group_size=256, scale_bits=np.float64(6), granularity="group", group_size=32), r"scale_bits=np.float64\(6.0\)"),
    (dict(symmetric_scale="amax"), r"symmetric_scale='amax'; allowed: one of \('signed', 'max', 'half'\)"),
    (dict(full_range=1), "full_range=1"),
    (dict(full_range=True, symmetric_scale="max"), "full_range=True .*contradicts symmetric_scale='max'"),
    (dict(full_range=False, symmetric_scale="signed"), "full_range=False .*contradicts"),
    (dict(full_range=True, symmetric_scale="half"), "full_range=True .*contradicts"),
])
def test_every_field_is_validated(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**kwargs)


def test_rule_fields_are_validated():
  with pytest.raises(TypeError, match=r"pattern=b'kernel' \(bytes\)"):
    Rule(b"kernel", None)
  with pytest.raises(ValueError, match="not a valid regex"):
    Rule("(", None)
  with pytest.raises(TypeError, match=r"spec=\{'bits': 4\} \(dict\)"):
    Rule("kernel", {"bits": 4})


NUMPY_FIELDS = dict(bits=np.int64(4), symmetric=np.bool_(True), granularity="group", group_size=np.int32(32),
                    axis=np.int64(0), clip_ratio=np.float32(0.5), pad_groups=np.bool_(False),
                    mse_grid=np.int16(10), mse_max_shrink=np.float64(0.5), mse_norm=np.float32(2.0),
                    dense_pack=np.bool_(False))


def test_numpy_scalars_become_python_values(tmp_path):
  """Issue 14.4: np.int64 bits & co. are normalised: equal, same hash, and the checkpoint's JSON path works."""
  spec = QuantSpec(**NUMPY_FIELDS)
  plain = QuantSpec(**{k: v.item() if isinstance(v, np.generic) else v for k, v in NUMPY_FIELDS.items()})
  assert spec == plain and hash(spec) == hash(plain)
  for f in dataclasses.fields(spec):
    v = getattr(spec, f.name)
    assert not isinstance(v, np.generic), f.name
    assert type(v) is type(getattr(plain, f.name)), f.name
  json.dumps(dataclasses.asdict(spec))
  w = jax.random.normal(jax.random.key(0), (64, 8))
  q = jquant.quantize(w, QuantSpec(bits=np.int64(4)))  # the reported spec
  back = jquant.load(jquant.save(tmp_path / "ckpt", {"w": q, "v": jquant.quantize(w, spec)}))
  assert back["w"].spec == QuantSpec(bits=4) and back["v"].spec == plain
  np.testing.assert_array_equal(np.asarray(jquant.dequantize(back["w"])), np.asarray(jquant.dequantize(q)))


def test_symmetric_scale_rules_and_the_full_range_alias():
  """symmetric_scale names the rule; full_range stays a constructor keyword and a property."""
  assert QuantSpec().symmetric_scale == "signed" and QuantSpec().full_range  # the default (sym_grid.md)
  signed = QuantSpec(bits=4, full_range=True)
  assert signed == QuantSpec(bits=4, symmetric_scale="signed") and signed.full_range
  assert "full_range" not in {f.name for f in dataclasses.fields(QuantSpec)}  # one stored truth
  assert signed.replace(full_range=False).symmetric_scale == "max"  # what full_range=False meant: amax / qmax
  assert QuantSpec(full_range=False).symmetric_scale == "max"
  assert QuantSpec(full_range=False, symmetric_scale="half").symmetric_scale == "half"
  assert signed.replace(bits=3).full_range and dataclasses.replace(signed, bits=3).full_range
  assert signed.replace(symmetric_scale="max").symmetric_scale == "max"
  with pytest.raises(ValueError, match="full_range=True with symmetric=False"):
    QuantSpec(symmetric=False).replace(full_range=True)
  assert [QuantSpec(bits=4, symmetric_scale=r).scale_divisor for r in ("max", "half", "signed")] == [7, 7.5, 8]
  # Asymmetric specs ignore the rule: it is normalised to the default.
  assert QuantSpec(symmetric=False, symmetric_scale="max") == QuantSpec(symmetric=False)
  assert QuantSpec(bits=4, symmetric_scale="max").replace(symmetric=False) == QuantSpec(bits=4, symmetric=False)


@pytest.mark.parametrize("rule,divisor", [("max", 7.0), ("half", 7.5)])
def test_symmetric_scales_are_amax_over_the_rule(rule, divisor):
  w = jax.random.normal(jax.random.key(2), (64, 6))
  spec = QuantSpec(bits=4, granularity="group", group_size=32, symmetric_scale=rule)
  s, _ = jquant.compute_scale_zero(w, spec)
  amax = np.abs(np.asarray(w, np.float64)).reshape(2, 32, 6).max(1)
  np.testing.assert_allclose(np.asarray(s), amax / divisor, rtol=1e-6)


def test_standard_layout_takes_signed_scales():
  """The kernels read signed-scale (full-range) specs; GGUF's float16-scale presets stay out."""
  assert QuantSpec(bits=4, granularity="group", group_size=64, symmetric_scale="signed").standard_layout
  assert not jquant.gguf.spec_for("Q4_0").standard_layout  # float16 scales
  assert QuantSpec(bits=4, full_range=True, scale_dtype=jnp.bfloat16).scale_dtype == "bfloat16"
