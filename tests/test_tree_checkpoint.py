"""quantize_params rules (Linen dicts and NNX state), footprint, shard_like. Checkpoints: tests/test_checkpoint.py."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant

SPEC4 = jquant.QuantSpec(bits=4, granularity="group", group_size=32)


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"embed": {"embedding": jax.random.normal(k[0], (50, 64))},
          "layers_0": {"attn": {"q": {"kernel": jax.random.normal(k[1], (64, 64))}},
                       "norm": {"scale": jnp.ones(64)}},
          "head": {"kernel": jax.random.normal(k[2], (64, 50)), "step": jnp.array(3, jnp.int32)}}


def test_rules_first_match_wins_and_none_keeps_float():
  rules = [jquant.Rule(r"^head", None), jquant.Rule(r"kernel$", SPEC4), jquant.Rule(r".*", jquant.QuantSpec(bits=8))]
  q = jquant.quantize_params(_params(), rules)
  assert isinstance(q["layers_0"]["attn"]["q"]["kernel"], jquant.QArray)
  assert q["layers_0"]["attn"]["q"]["kernel"].bits == 4
  assert isinstance(q["embed"]["embedding"], jquant.QArray) and q["embed"]["embedding"].bits == 8
  assert not isinstance(q["head"]["kernel"], jquant.QArray)
  assert q["head"]["step"].dtype == jnp.int32  # integer leaves are never touched
  back = jquant.dequantize_params(q)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(_params())


def test_no_match_warns_with_nearby_paths():
  with pytest.warns(UserWarning, match=r"quantized no leaf.*layers_0/attn/q/kernel"):
    jquant.quantize_params(_params(), [jquant.Rule(r"layers_0/attn/q/kernal$", SPEC4)])


def test_nnx_state():
  model = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  q = jquant.quantize_params(state, [jquant.Rule(r"kernel$", SPEC4)])
  assert isinstance(q["kernel"].value if hasattr(q["kernel"], "value") else q["kernel"], jquant.QArray)
  fp = jquant.footprint(q)
  assert [l.path for l in fp.leaves] == ["bias", "kernel"]
  d = jquant.dequantize_params(q)
  merged = nnx.merge(graphdef, d)
  np.testing.assert_array_equal(np.asarray(merged.kernel.value),
                                np.asarray(jquant.dequantize(jquant.quantize(model.kernel.value, SPEC4))))


def test_footprint_counts_exact_bytes():
  q = jquant.quantize_params(_params(), [jquant.Rule(r"attn/q/kernel$", SPEC4)])
  fp = jquant.footprint(q)
  row = [l for l in fp.leaves if l.path == "layers_0/attn/q/kernel"][0]
  assert row.nbytes == 64 * 64 // 2 + 2 * 64 * 4
  assert row.bits_per_weight == pytest.approx(4 + 32 / 32)
  assert fp.total_bytes == sum(l.nbytes for l in fp.leaves)
  assert "total" in str(fp) and "int4 g32 sym" in str(fp)


def test_rules_with_model_axes_leave_non_matmul_leaves_float():
  """A broad rule with axes= quantizes only what a matmul contracts; norm scales stay float, with a warning."""
  import warnings as _w
  params = {"layer_0": {"attn": {"q": {"w": jnp.ones((64, 32))}, "norm": {"scale": jnp.linspace(-1, 1, 64)}}}}
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=32)
  with _w.catch_warnings(record=True) as caught:
    _w.simplefilter("always")
    q = jquant.quantize_params(params, [jquant.Rule(r"^layer_\d+/attn/", spec)], axes={"layer_0/attn/q/w": (0,)})
  assert isinstance(q["layer_0"]["attn"]["q"]["w"], jquant.QArray)
  assert not isinstance(q["layer_0"]["attn"]["norm"]["scale"], jquant.QArray)
  assert any("layer_0/attn/norm/scale" in str(w.message) for w in caught)


def test_shard_like_keeps_the_mesh_axes_that_divide():
  """Each QArray part keeps the float weight's mesh axes where they divide its own dims (else replicated)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 4), ("x", "y"))
  q = jquant.quantize(_params()["layers_0"]["attn"]["q"]["kernel"], SPEC4)  # qvalue (32, 64), scale (2, 64)
  s = NamedSharding(mesh, P(("x", "y"), None))
  assert jquant.tree.sharding_like((32, 64), s).spec == P(("x", "y"), None)
  assert jquant.tree.sharding_like((2, 64), s).spec == P(None, None)       # 2 rows over 8 devices: replicated
  assert jquant.tree.sharding_like((3,), NamedSharding(mesh, P("x", "y"))).spec == P(None)
  single = jax.sharding.SingleDeviceSharding(jax.devices()[1])
  assert jquant.tree.sharding_like((5,), single) == single
  placed = jquant.tree.shard_like(q, s)
  assert placed.qvalue.sharding.spec == P(("x", "y"), None) and placed.scale.sharding.spec == P(None, None)
  np.testing.assert_array_equal(np.asarray(placed.qvalue), np.asarray(q.qvalue))


def test_quantize_params_names_every_non_finite_selected_leaf():
  p = _params()
  p["layers_0"]["attn"]["q"]["kernel"] = p["layers_0"]["attn"]["q"]["kernel"].at[5, 7].set(jnp.nan)
  p["head"]["kernel"] = p["head"]["kernel"].at[0].set(jnp.inf)
  p["layers_0"]["norm"]["scale"] = p["layers_0"]["norm"]["scale"].at[0].set(jnp.nan)  # not selected: not checked
  with pytest.raises(ValueError, match=r"quantize_params: the selected leaves hold non-finite values \(NaN or inf\) at "
                                       r"head/kernel \(50 values\), layers_0/attn/q/kernel \(1 value\)"):
    jquant.quantize_params(p, [jquant.Rule(r"kernel$", SPEC4)])
  q = jquant.quantize_params(p, [jquant.Rule(r"head", None), jquant.Rule(r"embed", SPEC4.replace(axis=1))])
  assert isinstance(q["embed"]["embedding"], jquant.QArray)


def test_quantize_params_importance_vectors():
  """A ``(K,)`` importance vector per path lies along the leaf's contraction axis: bit for bit
  ``quantize(leaf, spec, importance=imp[:, None])``; other leaves unweighted; a wrong length names the leaf."""
  params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (64, 8))},
            "b": {"kernel": jax.random.normal(jax.random.key(1), (64, 8))}}
  spec = jquant.QuantSpec(bits=3, granularity="group", group_size=32, clip="fit")
  imp = jnp.exp(jax.random.normal(jax.random.key(2), (64,)))
  out = jquant.quantize_params(params, [jquant.Rule("kernel", spec)], importance={"params/a/kernel": imp})
  want_a = jquant.quantize(params["a"]["kernel"], spec, importance=imp[:, None])
  np.testing.assert_array_equal(np.asarray(out["a"]["kernel"].qvalue), np.asarray(want_a.qvalue))
  np.testing.assert_array_equal(np.asarray(out["a"]["kernel"].scale), np.asarray(want_a.scale))
  np.testing.assert_array_equal(np.asarray(out["b"]["kernel"].qvalue),
                                np.asarray(jquant.quantize(params["b"]["kernel"], spec).qvalue))
  assert not np.array_equal(np.asarray(out["a"]["kernel"].scale),
                            np.asarray(jquant.quantize(params["a"]["kernel"], spec).scale))
  with pytest.raises(ValueError, match=r"leaf 'a/kernel'.*importance has shape \(63,\)"):
    jquant.quantize_params(params, [jquant.Rule("kernel", spec)], importance={"a/kernel": imp[:63]})
  with pytest.raises(ValueError, match=r"importance names \['a/kernl'\], which are not leaves the rules quantize"):
    jquant.quantize_params(params, [jquant.Rule("kernel", spec)], importance={"a/kernl": imp})
  with pytest.raises(ValueError, match=r"importance names \['b/kernel'\], which are not leaves the rules quantize"):
    jquant.quantize_params(params, [jquant.Rule("a/kernel", spec)], importance={"b/kernel": imp})
