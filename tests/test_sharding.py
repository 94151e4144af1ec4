"""Sharded parameters over 8 CPU devices (meshes 8x1, 4x2, 2x4): layouts, RTN, GPTQ, AWQ, checkpoints.

Sharded results must equal the single-device ones: bit for bit for integer codes (RTN, GPTQ), to float
rounding for scales that come from float sums in another order (GPTQ's Hessian, AWQ's statistics).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jquant
from jquant import gptq, models, packing, sharding
from jquant.utils import get_path

MESHES = [(8, 1), (4, 2), (2, 4)]
SPEC = jquant.QuantSpec(bits=4, granularity="group", group_size=16)
RULES = [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel$", SPEC)]


@pytest.fixture(scope="module")
def toy():
  # Few distinct shapes (compiles dominate): q, o, gate, up, down (32, 32); k, v (32, 16).
  cfg = models.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)
  m = models.llama_init(cfg, jax.random.key(0))
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, 64), np.int32)
  return m, calib


@pytest.fixture(scope="module")
def toy1(toy):
  """The toy's first block alone (GPTQ and AWQ: one block, named with blocks=, costs half the passes)."""
  m, calib = toy
  cfg = models.LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
  params = {k: v for k, v in m.params.items() if k != "layers_1"}
  return models.Model(cfg, params), calib


def _mesh(shape):
  return sharding.make_mesh(*shape)


def _leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def _assert_laid_out_like_float(qtree, float_tree):
  """Every QArray part sits on `qarray_shardings` of its float weight's sharding; float leaves keep theirs."""
  is_q = lambda x: isinstance(x, jquant.QArray)
  for (kp, q), f in zip(jax.tree_util.tree_leaves_with_path(qtree, is_leaf=is_q),
                        jax.tree_util.tree_leaves(float_tree)):
    if is_q(q):
      want = sharding.qarray_shardings(q, f.sharding)
      for part, s in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(want)):
        assert part.sharding.is_equivalent_to(s, part.ndim), (jax.tree_util.keystr(kp), part.sharding, s)
    else:
      assert q.sharding.is_equivalent_to(f.sharding, q.ndim), jax.tree_util.keystr(kp)


# ----------------------------------------------------------------------------- layouts
def test_param_shardings_follow_maxtext_logical_axes(toy):
  m, _ = toy
  s = sharding.param_shardings(m.params, _mesh((2, 4)))
  assert s["embed"]["embedding"].spec == P("tensor", "fsdp")                 # ("vocab", "embed")
  assert s["layers_0"]["attn"]["q"]["kernel"].spec == P("fsdp", "tensor")    # ("embed", "heads")
  assert s["layers_0"]["attn"]["k"]["kernel"].spec == P("fsdp", "tensor")    # ("embed", "kv_heads"): 16 over 4
  assert s["layers_0"]["attn"]["o"]["kernel"].spec == P("tensor", "fsdp")    # ("heads", "embed")
  assert s["layers_0"]["mlp"]["down"]["kernel"].spec == P("tensor", "fsdp")  # ("mlp", "embed")
  assert s["final_norm"]["scale"].spec == P("tensor")
  # A dimension the mesh axes do not divide is replicated; an unnamed leaf gets FSDP on its largest dimension.
  assert sharding.logical_spec((6, 32), ("heads", "embed"), _mesh((2, 4))) == P(None, "fsdp")
  other = sharding.param_shardings({"w": jnp.zeros((24, 40))}, _mesh((8, 1)))
  assert other["w"].spec == P(None, "fsdp")
  with pytest.raises(ValueError, match="logical axes"):
    sharding.param_shardings({"mlp": {"down": {"kernel": jnp.zeros(4)}}}, _mesh((8, 1)))
  with pytest.raises(ValueError, match="fsdp \\* tensor = 16"):
    sharding.make_mesh(4, 4)
  with pytest.raises(ValueError, match="logical=\\('embed',\\) names 1 axes"):
    sharding.logical_spec((4, 4), ("embed",), _mesh((8, 1)))
  with pytest.raises(TypeError, match="must be a jquant.QArray"):
    sharding.qarray_shardings(jnp.ones(4), None)
  two = {"a": jax.device_put(jnp.ones(8), NamedSharding(_mesh((8, 1)), P("fsdp"))),
         "b": jax.device_put(jnp.ones(8), NamedSharding(_mesh((2, 4)), P("tensor")))}
  with pytest.raises(ValueError, match="mesh_of: leaf 'b' is on mesh"):
    sharding.mesh_of(two)
  explicit = jax.make_mesh((8,), ("fsdp",))  # Explicit axes by default
  with pytest.raises(ValueError, match="allowed: Auto axes only"):
    gptq.quantize_model(m, m.params, np.zeros((8, 4), np.int32), RULES, mesh=explicit, progress=False)


@pytest.mark.parametrize("bits,k,gran", [(4, 64, "group"), (3, 64, "group"), (3, 12, "channel")])
def test_each_device_holds_the_codes_and_scales_of_its_own_slice(bits, k, gran):
  """Every device's payload shard unpacks to the codes of its slice of the float weight, and its scale shard
  is those rows' groups; a part that cannot be split so (3-bit units cut, too few groups) is replicated."""
  mesh = _mesh((2, 4))
  w = jax.random.normal(jax.random.key(bits), (k, 8))
  spec = jquant.QuantSpec(bits=bits, granularity=gran, group_size=16 if gran == "group" else None, symmetric=False)
  s = NamedSharding(mesh, P("fsdp", "tensor"))
  q = jquant.quantize(w, spec)
  placed = jquant.tree.shard_like(q, s)
  codes = np.asarray(q.codes())
  for dev, idx in s.devices_indices_map(w.shape).items():
    rows, cols = idx
    # Read each device's shard to the host (unpacking it there: one compile, not one per device).
    payload = np.asarray(next(x.data for x in placed.qvalue.addressable_shards if x.device == dev))
    scale = np.asarray(next(x.data for x in placed.scale.addressable_shards if x.device == dev))
    k_split = placed.qvalue.sharding.spec[0] is not None
    per = (rows.stop - rows.start) if k_split else k
    got = np.asarray(packing.unpack(payload, bits, per, axis=0, dtype=jnp.int32))
    want = codes[rows if k_split else slice(None), cols]
    np.testing.assert_array_equal(got, want)
    g0 = rows.start // 16 if placed.scale.sharding.spec[0] is not None else 0
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(q.scale)[g0:g0 + scale.shape[0], cols])
  expect_k = {(4, 64): True, (3, 64): True, (3, 12): False}[(bits, k)]
  assert (placed.qvalue.sharding.spec[0] is not None) == expect_k
  if (bits, k) == (3, 12):  # 6 payload bytes split 3 / 3 would cut a unit of 8 codes: replicated along fsdp
    assert jquant.tree.sharding_like(q.qvalue.shape, s).spec[0] == "fsdp"


# ----------------------------------------------------------------------------- RTN
@pytest.mark.parametrize("shape", MESHES)
def test_rtn_on_sharded_params_equals_single_device(toy, shape):
  m, _ = toy
  ref = jquant.quantize_params(m.params, RULES)
  sp = sharding.shard_params(m.params, _mesh(shape))
  q = jquant.quantize_params(sp, RULES)
  for (kp, a), b in zip(_leaves(ref), jax.tree_util.tree_leaves(q)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(kp))
  _assert_laid_out_like_float(q, sp)
  # Each device holds its share: the quantized tree per device is about 1/8 of the whole (scales of few
  # groups are replicated), never the whole.
  per_dev = sharding.bytes_per_device(q)
  whole = jquant.footprint(q).total_bytes
  assert len(per_dev) == 8 and max(per_dev.values()) < 0.5 * whole


def test_rtn_packing_units_cut_by_the_layout():
  """3-bit codes of a 32-row weight on 8 devices: 4 rows each, half a packing unit (8 codes in 3 bytes). The
  payload is replicated along fsdp and equals the single-device one bit for bit (it failed to compile before:
  the unit's OR reduction became an OR all-reduce, which XLA's CPU collectives lack)."""
  mesh = _mesh((8, 1))
  w = jax.random.normal(jax.random.key(5), (32, 8))
  spec = jquant.QuantSpec(bits=3, granularity="channel", symmetric=False)
  q = jquant.quantize_params({"w": jax.device_put(w, NamedSharding(mesh, P("fsdp")))}, [jquant.Rule("w", spec)])["w"]
  ref = jquant.quantize(w, spec)
  for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert q.qvalue.sharding.spec[0] is None


# ----------------------------------------------------------------------------- GPTQ
# GPTQ on the MLP kernels (gate|up side by side, down): both layouts, ("embed", "mlp") and ("mlp", "embed");
# the attention kernels' layouts are checked through RTN above.
GPTQ_RULES = [jquant.Rule(r"layers_\d+/mlp/\w+/kernel$", SPEC)]
GPTQ_OPTS = dict(batch_size=8, progress=False, true_sequential=False, blocks=r"layers_\d+")


@pytest.fixture(scope="module")
def gptq_single(toy1):
  m, calib = toy1
  return gptq.quantize_model(m, m.params, calib, GPTQ_RULES, **GPTQ_OPTS)


@pytest.mark.parametrize("shape", MESHES)
def test_gptq_on_sharded_params_equals_single_device(toy1, gptq_single, shape):
  """Codes bit for bit; scales to float rounding (the Hessian's sums reduce across devices in another order).
  No mesh argument: the pass takes the params' own mesh."""
  m, calib = toy1
  sp = sharding.shard_params(m.params, _mesh(shape))
  q = gptq.quantize_model(m, sp, calib, GPTQ_RULES, **GPTQ_OPTS)
  for (kp, a), b in zip(_leaves(gptq_single), jax.tree_util.tree_leaves(q)):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == np.uint8:
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(kp))
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(kp))
  _assert_laid_out_like_float(q, sp)


# ----------------------------------------------------------------------------- AWQ, W8A8 convert
AWQ_KW = dict(n_grid=2, clip=False, progress=False, blocks=r"layers_\d+")
AWQ_RULES = [jquant.Rule(r"layers_\d+/mlp/(gate|up)/kernel$", SPEC)]  # one group (gate|up, folded into mlp_norm)


@pytest.fixture(scope="module")
def awq_single(toy1):
  m, calib = toy1
  return jquant.awq.scale_model(m, m.params, calib, AWQ_RULES, **AWQ_KW)


@pytest.mark.parametrize("shape", MESHES)
def test_awq_on_sharded_params(toy1, awq_single, shape):
  """AWQ scales equal the single-device ones to float rounding; the scaled params keep their shardings."""
  m, calib = toy1
  kw, rules, ref = AWQ_KW, AWQ_RULES, awq_single
  sp = sharding.shard_params(m.params, _mesh(shape))
  got = jquant.awq.scale_model(m, sp, calib, rules, **kw)
  assert ref.scales.keys() == got.scales.keys() and ref.scales
  for k in ref.scales:
    np.testing.assert_allclose(np.asarray(got.scales[k]), np.asarray(ref.scales[k]), rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(sp)):
    assert a.sharding == b.sharding


def test_w8a8_convert_keeps_shardings(toy):
  """`convert` (dynamic activations: no statistics needed) lays int8 weights out like the float kernels."""
  m, _ = toy
  from jquant.calibrate import W8A8Spec, convert
  rules = [jquant.Rule(r"layers_\d+/mlp/gate/kernel$", W8A8Spec(activations="dynamic"))]
  sp = sharding.shard_params(m.params, _mesh((4, 2)))
  q = convert(sp, None, rules)
  ref = convert(m.params, None, rules)
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(q)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  w = q["layers_0"]["mlp"]["gate"]["kernel"].weight
  assert w.qvalue.sharding.spec == P("fsdp", "tensor")


# ----------------------------------------------------------------------------- checkpoints
def test_sharded_quantized_checkpoint_restores_onto_target_shardings(toy, tmp_path):
  m, _ = toy
  q = jquant.quantize_params(sharding.shard_params(m.params, _mesh((4, 2))), RULES)
  path = jquant.save(tmp_path / "ckpt", q)
  # The target: the same layout given abstractly, as a fresh job would build it (no arrays).
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), q)
  back = jquant.load(path, target=target)
  for (kp, a), b in zip(_leaves(q), jax.tree_util.tree_leaves(back)):
    assert b.sharding == a.sharding, jax.tree_util.keystr(kp)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(kp))
  # A float target sharded another way (2x4) lays the quantized leaves out as quantize_params would.
  other = sharding.shard_params(m.params, _mesh((2, 4)))
  back2 = jquant.load(path, target=other)
  _assert_laid_out_like_float(back2, other)


def test_meshes_that_would_shard_nothing_are_refused(toy):
  # Reported: a ("data", "model") mesh replicated every leaf silently; a string mesh gave an AttributeError.
  params = toy[0].params
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  with pytest.raises(ValueError, match=r"mesh axes \('data', 'model'\) include none"):
    sharding.shard_params(params, jax.sharding.Mesh(devices, ("data", "model")))
  with pytest.raises(TypeError, match="mesh is a str"):
    sharding.shard_params(params, "mesh")
  explicit = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with pytest.raises(ValueError, match="allowed: Auto axes only"):
    sharding.shard_params(params, explicit)


# ----------------------------------------------------------------------------- SmoothQuant
def test_smoothquant_on_sharded_params(toy1):
  """Per-channel statistics of sharded params equal the single-device ones to float rounding (activations
  from sharded matmuls); given the same statistics, smoothing is bit for bit the single-device smoothing
  (max|W| and the folds' products are exact whatever the layout), every leaf keeps its sharding (the norm
  scales came back replicated before), the factors are replicated over the mesh. The W8A8 codes of the
  smoothed params are then those of single-device smoothing, laid out like the float kernels by `convert`
  (test_w8a8_convert_keeps_shardings)."""
  from jquant import observers, smoothquant
  from jquant.calibrate import W8A8Spec, calibrate
  m, calib = toy1
  mesh = _mesh((4, 2))
  sp = sharding.shard_params(m.params, mesh)
  rules = [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel$", W8A8Spec(activations="dynamic"))]
  kw = dict(observer=observers.MinMaxObserver("channel"), batch_size=8, progress=False)
  amax = calibrate(m, m.params, calib, rules, **kw).amax()
  amax_sharded = calibrate(m, sp, calib, rules, **kw).amax()
  assert amax.keys() == amax_sharded.keys() and len(amax) == 7
  for k in amax:
    np.testing.assert_allclose(np.asarray(amax_sharded[k]), np.asarray(amax[k]), rtol=1e-5, err_msg=k)
  ref, ref_s = smoothquant.smooth(m, m.params, calib, amax, 0.5, blocks=r"layers_\d+")
  got, got_s = smoothquant.smooth(m, sp, calib, amax, 0.5, blocks=r"layers_\d+")
  assert sorted(got_s) == ["layers_0/attn/v", "layers_0/attn_norm", "layers_0/mlp/up", "layers_0/mlp_norm"]
  for k in ref_s:
    np.testing.assert_array_equal(np.asarray(got_s[k]), np.asarray(ref_s[k]), err_msg=k)
    assert got_s[k].sharding == NamedSharding(mesh, P())
  for (kp, a), b, f in zip(_leaves(got), jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(sp)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(kp))
    assert a.sharding == f.sharding, (jax.tree_util.keystr(kp), a.sharding, f.sharding)   # norm scales too
  assert not np.array_equal(np.asarray(got["layers_0"]["mlp_norm"]["scale"]),
                            np.asarray(sp["layers_0"]["mlp_norm"]["scale"]))        # the folds did move weights


# ----------------------------------------------------------------------------- QAT
def test_qat_step_on_sharded_params(toy1):
  """One jit-compiled QAT step (LSQ scales, SGD) on sharded params: every leaf of the train state keeps its
  sharding, the quantizers' scales sit where the packed weight's scales will (`qarray_shardings`), the loss
  and the update equal the single-device step's to float rounding (gradients reduced across devices in
  another order), and `qat.convert` lays the QArrays out like `quantize_params`, with codes and scales bit
  for bit those of the same state converted on one device."""
  import optax
  from jquant import qat
  m, calib = toy1
  rules = [jquant.Rule(r"layers_\d+/mlp/\w+/kernel$", SPEC)]  # both layouts: ("embed", "mlp"), ("mlp", "embed")

  def loss_fn(p, toks):
    logits = m.apply(p, toks[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

  lr = 0.5
  opt = qat.optimizer(weights=optax.sgd(lr), scales=optax.sgd(0.1 * lr))
  step = qat.make_train_step(loss_fn, opt, donate=False)
  ts0_ref = qat.init_train_state(m.params, qat.init(m.params, rules), opt)
  ts_ref, loss_ref = step(ts0_ref, calib)
  sp = sharding.shard_params(m.params, _mesh((2, 4)))
  ts0 = qat.init_train_state(sp, qat.init(sp, rules), opt)
  ts, loss = step(ts0, calib)
  np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
  for (kp, a), b in zip(_leaves(ts), jax.tree_util.tree_leaves(ts0)):
    if a.ndim:  # (the step counters are scalars)
      assert a.sharding == b.sharding, (jax.tree_util.keystr(kp), a.sharding, b.sharding)
  # The update (new - old) equals the single-device update to float rounding of the gradients.
  for (kp, a), a0, b, b0 in zip(_leaves((ts.params, ts.qat)), jax.tree_util.tree_leaves((ts0.params, ts0.qat)),
                                jax.tree_util.tree_leaves((ts_ref.params, ts_ref.qat)),
                                jax.tree_util.tree_leaves((ts0_ref.params, ts0_ref.qat))):
    np.testing.assert_array_equal(np.asarray(a0), np.asarray(b0))  # the start: the same values
    d, d_ref = np.asarray(a, np.float64) - np.asarray(a0), np.asarray(b, np.float64) - np.asarray(b0)
    np.testing.assert_allclose(d, d_ref, rtol=0, atol=1e-4 * np.abs(d_ref).max() + 1e-12,
                               err_msg=jax.tree_util.keystr(kp))
  assert np.abs(np.asarray(ts.params["layers_0"]["mlp"]["up"]["kernel"] - sp["layers_0"]["mlp"]["up"]["kernel"])
                ).max() > 1e-3  # the step did move the weights
  packed = qat.convert(ts.params, ts.qat)
  _assert_laid_out_like_float(packed, sp)
  one = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), (ts.params, ts.qat))  # the same state, gathered
  for (kp, a), b in zip(_leaves(packed), jax.tree_util.tree_leaves(qat.convert(*one))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(kp))
  for path, qz in ts.qat.quantizers.items():  # trained where the packed scales will live
    assert qz.scale.sharding.is_equivalent_to(get_path(packed, path).scale.sharding, qz.scale.ndim), path


# ----------------------------------------------------------------------------- block-wise reconstruction
def test_blockwise_on_sharded_params(toy1):
  """A sharded block-wise pass (an Adam step learning scales and rounding on the MLP kernels) equals the
  single-device pass: codes bit for bit on this toy, scales to float rounding (the block's outputs and
  gradients are reduced across devices in another order); the QArrays are laid out like the float kernels
  and every float leaf keeps its sharding."""
  from jquant import blockwise
  m, calib = toy1
  rules = [jquant.Rule(r"layers_\d+/mlp/\w+/kernel$", SPEC)]
  kw = dict(steps=1, batch_size=8, progress=False, blocks=r"layers_\d+")
  ref = blockwise.quantize_model(m, m.params, calib, rules, **kw)
  sp = sharding.shard_params(m.params, _mesh((8, 1)))
  got = blockwise.quantize_model(m, sp, calib, rules, **kw)
  n_q = 0
  for (kp, a), b in zip(_leaves(got), jax.tree_util.tree_leaves(ref)):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == np.uint8:
      n_q += 1
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(kp))
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(kp))
  assert n_q == 3
  _assert_laid_out_like_float(got, sp)
