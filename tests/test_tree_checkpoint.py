"""quantize_params rules (Linen dicts and NNX state), footprint, and atomic checkpoints."""

import os
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


ALL_SPECS = [jquant.QuantSpec(bits=b, symmetric=s, granularity="group", group_size=16, scale_dtype=d)
             for b in range(2, 9) for s in (True, False) for d in ("float32", "bfloat16")]


def test_checkpoint_round_trip_bit_exact(tmp_path):
  x = jax.random.normal(jax.random.key(1), (64, 8))
  tree = {"q": [jquant.quantize(x, s) for s in ALL_SPECS], "f": {"w": x, "n": 3}}
  path = jquant.save(tmp_path / "ckpt", tree)
  back = jquant.load(path)
  for a, b in zip(tree["q"], back["q"]):
    assert isinstance(b, jquant.QArray) and a.spec == b.spec and a.size == b.size and a.axis == b.axis
    assert a.dtype == b.dtype
    for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      assert la.dtype == lb.dtype
      np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
  np.testing.assert_array_equal(np.asarray(back["f"]["w"]), np.asarray(x))
  assert back["f"]["n"] == 3
  with pytest.raises(FileExistsError, match="overwrite"):
    jquant.save(path, tree)


def test_checkpoint_target_restores_structure(tmp_path):
  tree = (jquant.quantize(jnp.ones((16, 4)), SPEC4.replace(group_size=16)), jnp.arange(3.0))
  back = jquant.load(jquant.save(tmp_path / "t", tree), target=tree)
  assert isinstance(back, tuple) and isinstance(back[0], jquant.QArray)


def test_interrupted_save_leaves_nothing_loadable(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  def boom(*a, **k):
    raise KeyboardInterrupt

  monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", boom)
  with pytest.raises(KeyboardInterrupt):
    jquant.save(tmp_path / "ckpt", {"w": jnp.ones(3)})
  assert not os.path.exists(tmp_path / "ckpt")
  assert os.listdir(tmp_path) == []  # the temporary directory is cleaned too


def test_load_rejects_non_checkpoints(tmp_path):
  (tmp_path / "junk").mkdir()
  with pytest.raises(ValueError, match="not a jquant checkpoint"):
    jquant.load(tmp_path / "junk")


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
