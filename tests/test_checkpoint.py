"""jquant.save / jquant.load: bit-exact round trips, sharded restore, atomic saves, clear errors for bad files."""

import dataclasses
import glob
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import jquant
from jquant.files import FileFormatError

SPEC4 = jquant.QuantSpec(bits=4, granularity="group", group_size=32)
ALL_SPECS = [jquant.QuantSpec(bits=b, symmetric=s, granularity="group", group_size=16, scale_dtype=d)
             for b in range(2, 9) for s in (True, False) for d in ("float32", "bfloat16")]


def _bits(x) -> bytes:
  return np.ascontiguousarray(np.asarray(x)).tobytes()


def assert_same(a, b, where="<root>"):
  """Same structure, same container and leaf types, same dtypes and shapes, bit-identical values."""
  assert type(a) is type(b), (where, type(a), type(b))
  if isinstance(a, dict):
    assert sorted(a, key=repr) == sorted(b, key=repr), where  # (a target's dicts come back in jax's key order)
    for k in a:
      assert_same(a[k], b[k], f"{where}/{k}")
  elif isinstance(a, (list, tuple)) and not isinstance(a, jquant.QArray):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      assert_same(x, y, f"{where}/{i}")
  elif isinstance(a, jquant.QArray):
    assert (a.spec, a.size, a.axis, a.dtype, a.axis_shape) == (b.spec, b.size, b.axis, b.dtype, b.axis_shape), where
    for part in ("qvalue", "scale", "zero_point", "super_scale", "super_min"):
      assert_same(getattr(a, part), getattr(b, part), f"{where}.{part}")
  elif isinstance(a, (jax.Array, np.ndarray, np.generic)):
    assert (a.dtype, a.shape) == (b.dtype, b.shape), where
    assert _bits(a) == _bits(b), where
  elif isinstance(a, float):
    assert repr(a) == repr(b), where  # NaN, inf and -0.0 included
  else:
    assert a == b, where


_QS = {}


def _qarray(i):
  """Four small (256, 2) QArrays, made once: 4-bit groups, asymmetric 3-bit, 8-bit channels, Q4_K (two-level)."""
  if i not in _QS:
    if i == 3:  # from random GGUF block bytes: cheaper than solving, every part filled
      raw = np.random.default_rng(3).integers(0, 256, (2, 144), dtype=np.uint8)
      _QS[i] = jquant.gguf.blocks.to_qarray("Q4_K", jquant.gguf.blocks.decode("Q4_K", raw), axis=0)
    else:
      spec = [SPEC4, jquant.QuantSpec(bits=3, symmetric=False, granularity="group", group_size=32),
              jquant.QuantSpec(bits=8)][i]
      _QS[i] = jquant.quantize(jax.random.normal(jax.random.key(i), (256, 2)), spec)
  return _QS[i]


# ----------------------------------------------------------------------------- round trips
def test_checkpoint_round_trip_bit_exact(tmp_path):
  x = jax.random.normal(jax.random.key(1), (64, 8))
  tree = {"q": [jquant.quantize(x, s) for s in ALL_SPECS], "f": {"w": x, "n": 3}}
  path = jquant.save(tmp_path / "ckpt", tree)
  assert_same(tree, jquant.load(path))
  with pytest.raises(FileExistsError, match="overwrite"):
    jquant.save(path, tree)


def test_structure_and_leaf_types_come_back_without_target(tmp_path):
  """Tuples, None, empty containers, int keys; jax vs NumPy arrays (float64, zero-size), NumPy scalars, keys."""
  q = _qarray(0)
  tree = {"t": (jnp.ones(2, jnp.bfloat16), None, jnp.arange(4, dtype=jnp.int4)), "e": {"d": {}, "l": [], "u": ()},
          3: [np.arange(3, dtype=np.float64), np.float16(0.5), np.int64(-7), np.bool_(True)], "q": q,
          "k": jax.random.key(4), "py": [1.5, float("nan"), -0.0, 7, True, "s"], "h": jnp.float16(np.inf),
          "z": [jnp.zeros((0, 3), jnp.bfloat16), np.zeros((2, 0), np.int16)]}  # zero-size: not given to Orbax
  back = jquant.load(jquant.save(tmp_path / "c", tree))
  key = back.pop("k")
  assert jax.random.key_impl(key) == jax.random.key_impl(tree["k"])
  assert _bits(jax.random.key_data(key)) == _bits(jax.random.key_data(tree.pop("k")))
  assert_same(tree, back)
  assert back["t"][0].devices() == {jax.devices()[0]}  # no target: JAX's default device


_DTYPES = ["float32", "bfloat16", "float16", "int8", "uint8", "int4", "bool", "int32"]


@st.composite
def _jax_arrays(draw):
  dtype = draw(st.sampled_from(_DTYPES))
  shape = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  x = rng.normal(size=shape) * 4
  if x.size and dtype.startswith(("float", "bfloat")):
    x.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.0, 1.0]))
  return jnp.asarray(x if dtype.startswith(("float", "bfloat")) else np.clip(x, -8, 7).astype(np.int64), dtype)


@st.composite
def _numpy_leaves(draw):
  dtype = draw(st.sampled_from(["float64", "float32", "int16", "uint8", "bool", "complex64"]))
  shape = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
  x = np.random.default_rng(draw(st.integers(0, 2**16))).normal(size=shape).astype(dtype)
  return x[()] if draw(st.booleans()) and x.ndim == 0 else x


_LEAVES = st.one_of(
    _jax_arrays(), _numpy_leaves(), st.integers(0, 3).map(_qarray), st.none(),
    st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=4))
_TREES = st.recursive(
    _LEAVES, lambda c: st.one_of(st.lists(c, max_size=3), st.lists(c, max_size=3).map(tuple),
                                 st.dictionaries(st.text("ab_", min_size=1, max_size=3), c, max_size=3),
                                 st.dictionaries(st.integers(0, 5), c, max_size=2)),
    max_leaves=6)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TREES)
def test_round_trip_property(tree):
  """Any small tree of dicts/lists/tuples/None and array, QArray, NumPy and Python leaves comes back as saved."""
  with tempfile.TemporaryDirectory() as d:
    assert_same(tree, jquant.load(jquant.save(os.path.join(d, "c"), tree)))


def test_numpy_scalars_in_metadata_are_stored_as_python(tmp_path):
  spec = jquant.QuantSpec(bits=np.int64(4), granularity="group", group_size=np.int32(32))
  q = dataclasses.replace(_qarray(0), spec=spec)
  q2 = dataclasses.replace(q, size=np.int64(q.size), axis=np.int32(q.axis))  # not validated: stored as given
  back = jquant.load(jquant.save(tmp_path / "c", {"q": q, "q2": q2}))
  assert back["q"].spec == SPEC4 and type(back["q2"].size) is int and type(back["q"].spec.bits) is int
  np.testing.assert_array_equal(np.asarray(jquant.dequantize(back["q2"])), np.asarray(jquant.dequantize(q)))
  bad = dataclasses.replace(q, axis_shape=(object(),))
  with pytest.raises(TypeError, match=r"save: layers/0\.axis_shape = .*object.*allowed"):
    jquant.save(tmp_path / "bad", {"layers": [bad]})
  with pytest.raises(TypeError, match=r"save: leaf a/b has unsupported type ndarray"):
    jquant.save(tmp_path / "bad", {"a": {"b": np.array([object()])}})
  with pytest.raises(TypeError, match=r"save: the dict at a has key \(1, 2\)"):
    jquant.save(tmp_path / "bad", {"a": {(1, 2): 1.0}})
  assert not os.path.exists(tmp_path / "bad")


def test_checkpoint_target_restores_structure(tmp_path):
  tree = (jquant.quantize(jnp.ones((16, 4)), SPEC4.replace(group_size=16)), jnp.arange(3.0))
  back = jquant.load(jquant.save(tmp_path / "t", tree), target=tree)
  assert isinstance(back, tuple) and isinstance(back[0], jquant.QArray)


def test_version_1_checkpoints_still_load(tmp_path):
  tree = {"a": [jnp.arange(3.0), _qarray(0)], "n": 2}
  path = jquant.save(tmp_path / "c", tree)
  meta = json.load(open(os.path.join(path, "jquant.json")))
  meta.update(version=1)
  del meta["tree"], meta["arrays"]
  json.dump(meta, open(os.path.join(path, "jquant.json"), "w"))
  assert_same(tree, jquant.load(path))


# ----------------------------------------------------------------------------- sharded restore
def _mesh():
  assert len(jax.devices()) >= 8, "tests/conftest.py forces eight CPU devices"
  return jax.make_mesh((2, 4), ("x", "y"))


def test_load_restores_onto_target_shardings(tmp_path):
  """Plain arrays and every array inside QArrays come back on the target's shardings, bit for bit."""
  mesh = _mesh()
  row, col, rep = (NamedSharding(mesh, s) for s in (P("x", None), P("y"), P()))
  w = jax.random.normal(jax.random.key(0), (64, 16))
  q = jquant.tree.shard_like(_qarray(1), row)  # asymmetric 3-bit: payload, scales, zero points
  k4 = jquant.tree.shard_like(_qarray(3), NamedSharding(mesh, P(("x", "y"), None)))  # Q4_K: two-level scales
  tree = {"w": jax.device_put(w, row), "q": q, "k4": k4, "b": jax.device_put(jnp.arange(8.0), col),
          "r": jax.device_put(jnp.ones(3), rep),
          "all": jax.device_put(w, NamedSharding(jax.make_mesh((8,), ("d",)), P("d")))}
  path = jquant.save(tmp_path / "c", tree)
  on_one = jquant.load(path)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
  for target in (tree, abstract):
    back = jquant.load(path, target=target)
    assert_same(on_one, back)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
      assert b.sharding == a.sharding and len(b.addressable_shards) == len(a.addressable_shards)
  for a in jax.tree.leaves(on_one):
    assert a.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_float_target_lays_quantized_checkpoint_out_like_quantize_params(tmp_path):
  mesh = _mesh()
  s = NamedSharding(mesh, P("x", None))  # 8-bit per channel: "x" divides the (256, 2) payload, not the (1, 2) scale
  path = jquant.save(tmp_path / "c", {"w": _qarray(2)})
  back = jquant.load(path, target={"w": jax.device_put(jnp.zeros((256, 2)), s)})["w"]
  want = jquant.tree.shard_like(_qarray(2), s)
  assert want.qvalue.sharding.spec == P("x", None) and want.scale.sharding.spec == P(None, None)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(back)):
    assert b.sharding == a.sharding and _bits(a) == _bits(b)


def test_target_mismatch_is_a_clear_error(tmp_path):
  path = jquant.save(tmp_path / "c", {"a": jnp.ones((4, 2)), "b": jnp.ones(3)})
  with pytest.raises(ValueError, match="target leaf c is not in the checkpoint"):
    jquant.load(path, target={"a": jnp.ones((4, 2)), "c": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"holds leaves the target lacks: \['b'\]"):
    jquant.load(path, target={"a": jnp.ones((4, 2))})
  with pytest.raises(ValueError, match=r"target leaf a has shape \(2, 4\) but the checkpoint holds \(4, 2\)"):
    jquant.load(path, target={"a": jnp.ones((2, 4)), "b": jnp.ones(3)})


def test_nnx_state_round_trip(tmp_path):
  from flax import nnx
  _, state = nnx.split(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
  back = jquant.load(jquant.save(tmp_path / "c", state), target=state)
  assert type(back) is type(state)
  np.testing.assert_array_equal(np.asarray(back["kernel"].value), np.asarray(state["kernel"].value))


# ----------------------------------------------------------------------------- atomic saves
def test_interrupted_save_leaves_nothing_loadable(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  real = ocp.PyTreeCheckpointer.save

  def half_then_boom(self, directory, *a, **k):
    real(self, directory, *a, **k)  # the arrays are written, the metadata is not
    raise KeyboardInterrupt

  monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", half_then_boom)
  with pytest.raises(KeyboardInterrupt):
    jquant.save(tmp_path / "ckpt", {"w": jnp.ones(3)})
  assert os.listdir(tmp_path) == []  # no target, and the temporary directory is cleaned too


def test_failed_overwrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  old = {"w": jnp.arange(4.0)}
  path = jquant.save(tmp_path / "ckpt", old)
  with pytest.raises(TypeError, match="leaf w has unsupported type object"):
    jquant.save(path, {"w": object()}, overwrite=True)
  monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError, match="disk full"):
    jquant.save(path, {"w": jnp.zeros(4)}, overwrite=True)
  monkeypatch.undo()
  real_rename = os.rename

  def rename(src, dst):  # the commit rename fails after the old checkpoint was moved aside
    if os.path.basename(src).startswith(".ckpt.tmp-"):
      raise OSError("rename failed")
    real_rename(src, dst)

  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError, match="rename failed"):
    jquant.save(path, {"w": jnp.zeros(4)}, overwrite=True)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["ckpt"]
  assert_same(old, jquant.load(path))


# ----------------------------------------------------------------------------- bad files
@pytest.fixture
def ckpt(tmp_path):
  w = np.random.default_rng(0).normal(size=(4096,)).astype(np.float32)  # random: compresses little
  return jquant.save(tmp_path / "ckpt", {"w": jnp.asarray(w), "q": _qarray(0)})


def _largest_data_file(path):
  files = [f for f in glob.glob(os.path.join(path, "arrays", "**"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _raises_naming(path, match):
  return pytest.raises(FileFormatError, match=re.escape(str(path)) + ".*" + match)


def test_load_rejects_non_checkpoints(tmp_path):
  (tmp_path / "junk").mkdir()
  with _raises_naming(tmp_path / "junk", "not a jquant checkpoint"):
    jquant.load(tmp_path / "junk")
  with pytest.raises(FileNotFoundError, match="not a directory"):
    jquant.load(tmp_path / "missing")


def test_truncated_array_file(ckpt):
  f = _largest_data_file(ckpt)
  os.truncate(f, os.path.getsize(f) // 2)
  with _raises_naming(os.path.join(ckpt, "arrays"), "truncated or corrupted|CRC-32"):
    jquant.load(ckpt)


def test_corrupted_array_file_fails_its_checksum(ckpt):
  f = _largest_data_file(ckpt)
  data = bytearray(open(f, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(f, "wb").write(bytes(data))
  with _raises_naming(os.path.join(ckpt, "arrays"), "CRC-32|truncated or corrupted"):
    jquant.load(ckpt)


def test_missing_or_garbled_metadata(ckpt):
  meta = os.path.join(ckpt, "jquant.json")
  text = open(meta).read()
  open(meta, "w").write(text[: len(text) // 2])
  with _raises_naming(meta, "checkpoint metadata is truncated or corrupted"):
    jquant.load(ckpt)
  open(meta, "w").write(json.dumps({"format": "jquant-checkpoint", "version": 2, "leaves": [{"kind": 3}]}))
  with _raises_naming(meta, "leaf list is missing or malformed"):
    jquant.load(ckpt)
  os.remove(meta)
  with _raises_naming(ckpt, "not a jquant checkpoint"):
    jquant.load(ckpt)


def test_missing_array_directory(ckpt):
  import shutil
  shutil.rmtree(os.path.join(ckpt, "arrays"))
  with _raises_naming(ckpt, "array directory arrays/ is missing"):
    jquant.load(ckpt)
