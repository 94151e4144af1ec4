"""QAT: STE and LSQ gradients, one trace per step, exact conversion, any Linen / NNX model (Dense, DenseGeneral,
Einsum) through jquant.quantized, checkpoints."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jquant
import jquant.qat as qat
import w8a8_qat_models as M
from jquant import capture

G3 = jquant.QuantSpec(bits=3, granularity="group", group_size=16)
CONVERT_SPECS = (
    G3,
    jquant.QuantSpec(bits=2, granularity="group", group_size=16),
    jquant.QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16),
    jquant.QuantSpec(bits=8, granularity="channel"),
    jquant.QuantSpec(bits=5, symmetric=False, granularity="tensor"),
    jquant.QuantSpec(bits=4, granularity="group", group_size=16, scale_dtype="bfloat16"),
)


def _mlp_params(key, k=64, h=48, n=16):
  k1, k2 = jax.random.split(key)
  return {"fc1": {"kernel": jax.random.normal(k1, (k, h)) / math.sqrt(k), "bias": jnp.zeros(h)},
          "fc2": {"kernel": jax.random.normal(k2, (h, n)) / math.sqrt(h), "bias": jnp.zeros(n)}}


def _mlp(p, x):
  h = jax.nn.gelu(jquant.ops.qdot(x, p["fc1"]["kernel"]) + p["fc1"]["bias"])
  return jquant.ops.qdot(h, p["fc2"]["kernel"]) + p["fc2"]["bias"]


# ---------------------------------------------------------------------------
# Gradients against hand-derived values.


def test_lsq_symmetric_gradients_hand_derived():
  spec = jquant.QuantSpec(bits=2, granularity="tensor")          # codes -2..1, Qp = 1
  w = jnp.array([[0.2], [0.9], [-1.7], [3.0]])
  s = jnp.array([[1.0]])
  t = jnp.array([[1.0], [2.0], [3.0], [4.0]])                    # upstream cotangent
  out, vjp = jax.vjp(lambda w, s: qat.lsq_fake_quant(w, s, None, spec), w, s)
  dw, ds = vjp(t)
  np.testing.assert_array_equal(np.asarray(out).ravel(), [0.0, 1.0, -2.0, 1.0])
  # v = w/s: inside -2 < v < 1 for the first three (STE passes t), 3.0 is clipped (no gradient).
  np.testing.assert_array_equal(np.asarray(dw).ravel(), [1.0, 2.0, 3.0, 0.0])
  # ds = g * sum t * (round(v) - v | Qp): (1*-0.2 + 2*0.1 + 3*-0.3 + 4*1) / sqrt(4 * 1) = 3.1 / 2.
  np.testing.assert_allclose(np.asarray(ds).ravel(), [1.55], rtol=1e-6)


def test_lsq_asymmetric_gradients_hand_derived():
  spec = jquant.QuantSpec(bits=2, symmetric=False, granularity="tensor")   # codes 0..3, Qp = 3
  w = jnp.array([[-0.8], [0.1], [0.6], [1.5]])
  s, z = jnp.array([[0.5]]), jnp.array([[1.4]])                  # zero point rounds to 1
  out, vjp = jax.vjp(lambda w, s, z: qat.lsq_fake_quant(w, s, z, spec), w, s, z)
  dw, ds, dz = vjp(jnp.ones_like(w))
  # v = [-1.6, 0.2, 1.2, 3.0], codes clip(round(v) + 1) = [0, 1, 2, 3], out = (c - 1) * 0.5.
  np.testing.assert_array_equal(np.asarray(out).ravel(), [-0.5, 0.0, 0.5, 1.0])
  np.testing.assert_array_equal(np.asarray(dw).ravel(), [0.0, 1.0, 1.0, 0.0])
  g = 1.0 / math.sqrt(4 * 3)
  # ds: clipped low -> 0 - z = -1; inside -> round(v) - v = -0.2, -0.2; clipped high -> 3 - 1 = 2.
  np.testing.assert_allclose(np.asarray(ds).ravel(), [0.6 * g], rtol=1e-5)
  # dz: -s for each clipped element, 0 inside.
  np.testing.assert_allclose(np.asarray(dz).ravel(), [-1.0 * g], rtol=1e-6)


def test_lsq_group_gradients_match_float64_reference():
  spec = jquant.QuantSpec(bits=3, granularity="group", group_size=8)
  w = jax.random.normal(jax.random.key(0), (32, 5))
  s, _ = jquant.compute_scale_zero(w, spec)
  s = s * 0.8                                                     # some elements clip
  t = jax.random.normal(jax.random.key(1), w.shape)
  _, vjp = jax.vjp(lambda w, s: qat.lsq_fake_quant(w, s, None, spec), w, s)
  dw, ds = vjp(t)
  wn, sn, tn = (np.asarray(a, np.float64) for a in (w, s, t))
  se = np.repeat(sn, 8, axis=0)
  v = wn / se
  inside = (v > -4) & (v < 3)
  per = np.where(inside, np.round(v) - v, np.clip(np.round(v), -4, 3))
  ref_ds = (tn * per).reshape(4, 8, 5).sum(1) / math.sqrt(8 * 3)
  np.testing.assert_array_equal(np.asarray(dw), np.where(inside, tn, 0.0).astype(np.float32))
  np.testing.assert_allclose(np.asarray(ds), ref_ds, rtol=1e-5, atol=1e-5)


def test_ste_fixed_scale_weight_gradient_and_no_scale_gradient():
  params = {"d": {"kernel": jnp.array([[0.2, -5.0], [0.7, 0.1], [-0.3, 0.4]])}}
  spec = jquant.QuantSpec(bits=4, granularity="tensor")
  state = qat.init(params, [jquant.Rule("kernel", spec)], lsq=False)
  st = state.quantizers["d/kernel"]
  st = st.__class__(jnp.full_like(st.scale, 0.1), None, st.spec, False, None)   # v = 10 w; range -8..7
  state = qat.QATState({"d/kernel": st})
  t = jnp.arange(1.0, 7.0).reshape(3, 2)
  loss = lambda p, s: jnp.sum(qat.fake_quantize(p, s)["d"]["kernel"] * t)
  gp, gs = jax.grad(loss, argnums=(0, 1))(params, state)
  # Straight through where -8 < 10 w < 7, else 0: clipped are -5.0 (v=-50) and 0.7 (v=7, the edge).
  np.testing.assert_array_equal(np.asarray(gp["d"]["kernel"]), [[1.0, 0.0], [0.0, 4.0], [5.0, 6.0]])
  assert float(jnp.abs(gs.quantizers["d/kernel"].scale).sum()) == 0.0


def test_forward_equals_quantize_dequantize_bitwise():
  w = jax.random.normal(jax.random.key(2), (96, 24))
  w3 = w.reshape(4, 24, 24)                      # a DenseGeneral output kernel (heads, head_dim, d)
  for i, spec in enumerate(CONVERT_SPECS):
    got = jax.jit(lambda w: qat.lsq_fake_quant(w, *jquant.compute_scale_zero(w, spec), spec))(w)
    ref = jax.jit(lambda w: jquant.dequantize(jquant.quantize(w, spec)))(w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=str(spec))
    if i not in (0, 2, 3):
      continue
    # Several contraction axes (flattened): scales laid out as compute_scale_zero returns them.
    s3 = spec.replace(axis=(0, 1))
    got = jax.jit(lambda w: qat.lsq_fake_quant(w, *jquant.compute_scale_zero(w, s3), s3))(w3)
    ref = jax.jit(lambda w: jquant.dequantize(jquant.quantize(w, s3)))(w3)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=str(s3))


def test_activation_fake_quant_ste_and_int8_values():
  x = jax.random.normal(jax.random.key(3), (4, 7, 16))
  y, vjp = jax.vjp(lambda x: qat.fake_quant_activations(x, 8), x)
  xq, xs = jquant.ops.quantize_activations_per_token(x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(xq.astype(jnp.float32) * xs))
  t = jax.random.normal(jax.random.key(4), x.shape)
  np.testing.assert_array_equal(np.asarray(vjp(t)[0]), np.asarray(t))


# ---------------------------------------------------------------------------
# Training step.


def _data(params, n=128, k=64, seed=5):
  x = jax.random.normal(jax.random.key(seed), (n, k))
  return x, _mlp(params, x) + 0.05 * jax.random.normal(jax.random.key(seed + 1), (n, 16))


def test_train_step_traces_once_and_separate_learning_rates():
  params = _mlp_params(jax.random.key(0))
  state = qat.init(params, [jquant.Rule(r"kernel$", G3)])
  traces = []

  def loss_fn(p, batch):
    traces.append(1)                      # runs only while tracing
    x, y = batch
    return jnp.mean((_mlp(p, x) - y) ** 2)

  # Scales train, weights do not (lr 0), biases ("other") do.
  opt = qat.optimizer(weights=optax.sgd(0.0), scales=optax.adam(1e-2), other=optax.sgd(1e-2))
  step = qat.make_train_step(loss_fn, opt)
  ts = qat.init_train_state(params, state, opt)
  for i in range(4):
    ts, loss = step(ts, _data(params, seed=10 + i))
  assert len(traces) == 1
  assert int(ts.step) == 4 and np.isfinite(float(loss))
  np.testing.assert_array_equal(np.asarray(ts.params["fc1"]["kernel"]), np.asarray(params["fc1"]["kernel"]))
  assert float(jnp.abs(ts.params["fc1"]["bias"]).max()) > 0
  assert float(jnp.abs(ts.qat.quantizers["fc1/kernel"].scale - state.quantizers["fc1/kernel"].scale).max()) > 0


def test_fixed_scales_stay_frozen_under_weight_decay():
  params = _mlp_params(jax.random.key(0))
  state = qat.init(params, [jquant.Rule(r"kernel$", G3)], lsq=False)
  opt = qat.optimizer(weights=optax.adamw(1e-3, weight_decay=0.1))
  step = qat.make_train_step(lambda p, b: jnp.mean((_mlp(p, b[0]) - b[1]) ** 2), opt)
  ts = qat.init_train_state(params, state, opt)
  for _ in range(3):
    ts, _ = step(ts, _data(params))
  for path, qz in state.quantizers.items():
    np.testing.assert_array_equal(np.asarray(ts.qat.quantizers[path].scale), np.asarray(qz.scale))


def test_convert_exact_after_training():
  # One linear map per spec, summed: every spec trains in the same compiled step.
  keys = jax.random.split(jax.random.key(1), len(CONVERT_SPECS))
  params = {f"l{i}": {"kernel": jax.random.normal(k, (64, 16)) / 8.0} for i, k in enumerate(keys)}
  rules = [jquant.Rule(f"l{i}/kernel", spec) for i, spec in enumerate(CONVERT_SPECS)]
  model = lambda p, x: sum(jquant.ops.qdot(x, p[f"l{i}"]["kernel"]) for i in range(len(CONVERT_SPECS)))
  x = jax.random.normal(jax.random.key(2), (128, 64))
  y = model(params, x) + 0.1 * jax.random.normal(jax.random.key(3), (128, 16))
  state = qat.init(params, rules)
  opt = qat.optimizer(weights=optax.adam(3e-3), scales=optax.adam(1e-2))
  step = qat.make_train_step(lambda p, b: jnp.mean((model(p, b[0]) - b[1]) ** 2), opt)
  ts = qat.init_train_state(params, state, opt)
  for _ in range(5):
    ts, _ = step(ts, (x, y))
  packed = qat.convert(ts.params, ts.qat)
  fq = jax.jit(qat.fake_quantize)(ts.params, ts.qat)
  for i, spec in enumerate(CONVERT_SPECS):
    q = packed[f"l{i}"]["kernel"]
    assert isinstance(q, jquant.QArray) and q.spec == spec
    # The scales moved away from their RTN start, so this is not RTN's result.
    assert float(jnp.abs(ts.qat.quantizers[f"l{i}/kernel"].scale - state.quantizers[f"l{i}/kernel"].scale).max()) > 0
    np.testing.assert_array_equal(np.asarray(jquant.dequantize(q)), np.asarray(fq[f"l{i}"]["kernel"]),
                                  err_msg=str(spec))
  np.testing.assert_array_equal(np.asarray(model(jquant.dequantize_params(packed), x)), np.asarray(model(fq, x)))


def test_w8a8_convert_matches_fake_quant_logits():
  params = _mlp_params(jax.random.key(2))
  # Positive scales: with signed ones the fake-quantized and packed fc1 outputs differ by float rounding
  # (~3e-7), which can flip one fc2 activation code at a rounding tie; bit-identity needs one rounding path.
  spec = jquant.QuantSpec(bits=8, granularity="channel", symmetric_scale="max")
  state = qat.init(params, [jquant.Rule(r"kernel$", spec)], act_bits=8)
  fq = qat.fake_quantize(params, state)
  assert isinstance(fq["fc1"]["kernel"], qat.ActFakeQuant)
  packed = qat.convert(params, state)
  assert isinstance(packed["fc1"]["kernel"], jquant.ops.W8A8Weight)
  x = _data(params)[0]
  a, b = np.asarray(jax.jit(_mlp)(fq, x)), np.asarray(jax.jit(_mlp)(packed, x))
  if jax.default_backend() == "cpu":
    # Training runs the same int8 x int8 -> int32 product as W8A8Weight: identical logits.
    np.testing.assert_array_equal(a, b)
  else:  # accelerators may run W8A8Weight through a Pallas kernel (other summation order of the scales)
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())
  # Gradients are those of the float product of the fake-quantized operands (STE through both quantizers).
  loss = lambda p, int_path: jnp.sum(_mlp(jax.tree_util.tree_map(
      lambda w: qat.ActFakeQuant(w.weight, w.bits) if isinstance(w, qat.ActFakeQuant) and not int_path else w,
      qat.fake_quantize(p, state),
      is_leaf=lambda w: isinstance(w, qat.ActFakeQuant)), x) ** 2)
  g_int, g_float = jax.grad(loss)(params, True), jax.grad(loss)(params, False)
  assert float(jnp.abs(g_int["fc1"]["kernel"]).max()) > 0
  for name in ("fc1", "fc2"):
    np.testing.assert_allclose(np.asarray(g_int[name]["kernel"]), np.asarray(g_float[name]["kernel"]),
                               rtol=1e-4, atol=1e-4 * float(jnp.abs(g_float[name]["kernel"]).max()))


def test_low_bit_activation_convert_uses_generic_wrapper():
  params = _mlp_params(jax.random.key(2))
  state = qat.init(params, [jquant.Rule(r"kernel$", G3)], act_bits=6)
  packed = qat.convert(params, state)
  assert isinstance(packed["fc1"]["kernel"], qat.ActQuantWeight)
  x = _data(params)[0]
  np.testing.assert_allclose(np.asarray(_mlp(packed, x)), np.asarray(_mlp(qat.fake_quantize(params, state), x)),
                             rtol=0, atol=1e-5)


def test_init_from_quantized_tree_reproduces_it():
  params = _mlp_params(jax.random.key(3))
  spec = jquant.QuantSpec(bits=3, granularity="group", group_size=16, clip="mse", mse_grid=20)
  qtree = jquant.quantize_params(params, [jquant.Rule(r"kernel$", spec)])   # stands for a GPTQ result
  latent = jquant.dequantize_params(qtree)
  state = qat.init(latent, [jquant.Rule(r"kernel$", spec)], init_from=qtree)
  np.testing.assert_array_equal(np.asarray(state.quantizers["fc1/kernel"].scale), np.asarray(qtree["fc1"]["kernel"].scale))
  packed = qat.convert(latent, state)
  for name in ("fc1", "fc2"):
    np.testing.assert_array_equal(np.asarray(packed[name]["kernel"].qvalue), np.asarray(qtree[name]["kernel"].qvalue))


# ---------------------------------------------------------------------------
# Linen, NNX, checkpoints, errors.


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16)(jax.nn.gelu(nn.Dense(48)(x)))


def _train_mlp(loss_fn, opt, params, state, batch, steps=40):
  """Trains on one batch; the loss must go down. Returns the final train state."""
  step = qat.make_train_step(loss_fn, opt)
  ts = qat.init_train_state(params, state, opt)
  losses = []
  for _ in range(steps):
    ts, l = step(ts, batch)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  return ts


def test_linen_params_train_and_convert():
  model = _LinenMLP()
  x = jax.random.normal(jax.random.key(0), (64, 32))
  params = model.init(jax.random.key(1), x)["params"]
  y = model.apply({"params": params}, x)
  state = qat.init(params, [jquant.Rule(r"Dense_\d+/kernel", jquant.QuantSpec(bits=2, granularity="channel"))])
  assert sorted(state.quantizers) == ["Dense_0/kernel", "Dense_1/kernel"]
  loss_fn = lambda p, b: jnp.mean((model.apply({"params": p}, b[0]) - b[1]) ** 2)
  opt = qat.optimizer(weights=optax.adam(3e-3), scales=optax.adam(3e-3))
  ts = _train_mlp(loss_fn, opt, params, state, (x, y))
  deq = jquant.dequantize_params(qat.convert(ts.params, ts.qat))
  np.testing.assert_array_equal(np.asarray(model.apply({"params": deq}, x)),
                                np.asarray(model.apply({"params": qat.fake_quantize(ts.params, ts.qat)}, x)))


class _NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(32, 48, rngs=rngs)
    self.fc2 = nnx.Linear(48, 16, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x)))


def test_nnx_split_merge_train_and_convert():
  model = _NNXMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (64, 32))
  y = model(x)
  graphdef, params = nnx.split(model, nnx.Param)
  state = qat.init(params, [jquant.Rule(r"fc\d/kernel$", jquant.QuantSpec(bits=2, granularity="channel"))])
  assert sorted(state.quantizers) == ["fc1/kernel", "fc2/kernel"]

  def loss_fn(p, b):
    return jnp.mean((nnx.merge(graphdef, p)(b[0]) - b[1]) ** 2)

  opt = qat.optimizer(weights=optax.adam(3e-3), scales=optax.adam(3e-3))
  ts = _train_mlp(loss_fn, opt, params, state, (x, y))
  assert isinstance(ts.params, nnx.State)
  packed = qat.convert(ts.params, ts.qat)
  fq_model = nnx.merge(graphdef, qat.fake_quantize(ts.params, ts.qat))
  deq_model = nnx.merge(graphdef, jquant.dequantize_params(packed))
  np.testing.assert_array_equal(np.asarray(deq_model(x)), np.asarray(fq_model(x)))


def test_checkpoint_roundtrip_resume_and_train_loop(tmp_path):
  params = _mlp_params(jax.random.key(4))
  state = qat.init(params, [jquant.Rule(r"kernel$",
                                         jquant.QuantSpec(bits=4, symmetric=False, granularity="group",
                                                          group_size=16))])
  opt = qat.optimizer(weights=optax.adam(optax.linear_schedule(1e-3, 1e-4, 6)), scales=optax.adam(1e-2))
  step = qat.make_train_step(lambda p, b: jnp.mean((_mlp(p, b[0]) - b[1]) ** 2), opt)
  batches = [_data(params, seed=40 + i) for i in range(6)]
  ts, log = qat.train(step, qat.init_train_state(params, state, opt), iter(batches), num_steps=6, log_every=2,
                      log_path=str(tmp_path / "loss.tsv"), checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=3)
  assert log.steps == [1, 2, 3, 4, 5, 6] and len(log.losses) == 6
  assert len((tmp_path / "loss.tsv").read_text().splitlines()) == 6
  st, pr = qat.load_state(tmp_path / "ck" / "step_6", ts.qat, params_like=ts.params)
  for a, b in zip(jax.tree_util.tree_leaves((st, pr)), jax.tree_util.tree_leaves((ts.qat, ts.params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert st.quantizers["fc1/kernel"].spec == ts.qat.quantizers["fc1/kernel"].spec
  # Resuming from step 3 (optimizer state and schedule included) reproduces the uninterrupted run.
  like = qat.init_train_state(params, state, opt)
  mid = qat.load_train_state(tmp_path / "ck" / "step_3", like)
  assert int(mid.step) == 3
  resumed, log2 = qat.train(step, mid, iter(batches[3:]), num_steps=3, log_every=3)
  assert log2.steps == [4, 5, 6]
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(ts)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  qat.save_state(tmp_path / "only_state", ts.qat)
  assert isinstance(qat.load_state(tmp_path / "only_state", ts.qat), qat.QATState)


def test_errors_name_the_argument():
  params = _mlp_params(jax.random.key(0))
  with pytest.raises(ValueError, match="select no float leaf"):
    qat.init(params, [jquant.Rule(r"nonexistent", G3)])
  with pytest.raises(ValueError, match="rounding"):
    qat.init(params, [jquant.Rule(r"kernel$", G3.replace(rounding="stochastic"))])
  with pytest.raises(ValueError, match=r"act_bits with the N-D weight 'w' \(shape \(4, 4, 4\)\) needs its contraction "
                     r"axes: pass axes=jquant.capture.contraction_axes"):
    qat.init({"w": jnp.ones((4, 4, 4))}, [jquant.Rule("w", jquant.QuantSpec(bits=8))], act_bits=8)
  with pytest.raises(ValueError, match=r"act_bits=9; allowed: None or an int in 2..8"):
    qat.init(params, [jquant.Rule(r"kernel$", G3)], act_bits=9)
  with pytest.raises(ValueError, match=r"scale has shape \(1, 16\); allowed: \(4, 16\)"):
    qat.lsq_fake_quant(params["fc1"]["kernel"][:, :16], jnp.ones((1, 16)), None, G3)
  state = qat.init(params, [jquant.Rule(r"kernel$", G3)])
  with pytest.raises(ValueError, match="params do not hold"):
    qat.fake_quantize({"fc1": params["fc1"]}, state)


# ---------------------------------------------------------------------------
# Models users write with Flax's own layers (tests/w8a8_qat_models.py), trained through jquant.quantized.


@pytest.mark.parametrize("name,w8a8", [(n, True) for n in M.NAMES] + [("linen_general", False),
                                                                      ("nnx_general", False)])
def test_user_model_qat_trains_and_converts(name, w8a8):
  """W8A8 QAT (int8 weights + per-token int8 activations) and W4 g16 QAT on N-D kernels: a few steps lower the
  loss; the converted tree runs in the user's own model with the fake-quantized model's logits."""
  model, apply, params, toks = M.make(name)
  axes = capture.contraction_axes(apply, params, toks)          # one rule for Dense, DenseGeneral and Einsum
  spec = jquant.QuantSpec(bits=8) if w8a8 else jquant.QuantSpec(bits=4, granularity="group", group_size=16)
  state = qat.init(params, [jquant.Rule(r"kernel$", spec)], act_bits=8 if w8a8 else None, axes=axes)
  b0 = M.block_prefix(name, 0)
  assert len(state.quantizers) == 2 * len(M.block_kernels(name)) + 1
  if name.endswith("general"):                                  # (heads, head_dim, d) over (0, 1): 32 / 16 groups
    assert state.quantizers[f"{b0}/o/kernel"].scale.shape == ((1, 32) if w8a8 else (2, 32))
    assert state.quantizers[f"{b0}/q/kernel"].scale.shape == ((4, 1, 8) if w8a8 else (4, 2, 8))

  def loss_fn(p, t):                                            # written for float params
    logits = apply(p, t[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()

  opt = qat.optimizer(weights=optax.adam(1e-2), scales=optax.adam(1e-2))
  ts = _train_mlp(loss_fn, opt, params, state, toks, steps=6)
  packed = qat.convert(ts.params, ts.qat)
  kinds = {type(l) for l in jax.tree_util.tree_leaves(packed, is_leaf=jquant.intercept.is_quantized)
           if jquant.intercept.is_quantized(l)}
  assert kinds == ({jquant.ops.W8A8Weight} if w8a8 else {jquant.QArray})
  run = jax.jit(jquant.quantized(apply))
  a = np.asarray(run(qat.fake_quantize(ts.params, ts.qat), toks))
  b = np.asarray(run(packed, toks))
  if w8a8 and jax.default_backend() == "cpu":
    np.testing.assert_array_equal(a, b)          # training ran the served int8 x int8 -> int32 product
  else:
    # Same weights; only float32 summation order differs (the packed path multiplies (K, N) matrices, K <= 48).
    assert np.abs(a - b).max() <= 64 * 2**-24 * np.abs(a).max()


def test_non_finite_weights_scales_and_losses_are_named(tmp_path):
  params = _mlp_params(jax.random.key(5))
  rules = [jquant.Rule(r"kernel$", G3)]
  bad = jax.tree_util.tree_map(lambda a: a, params)
  bad["fc2"]["kernel"] = bad["fc2"]["kernel"].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"qat\.init: the selected weights hold non-finite .* at fc2/kernel \(1 value\)"):
    qat.init(bad, rules)
  qinit = jquant.quantize_params(params, rules)
  qinit["fc1"]["kernel"] = jax.tree_util.tree_map(lambda a: a, qinit["fc1"]["kernel"])
  qinit["fc1"]["kernel"].scale = qinit["fc1"]["kernel"].scale.at[0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match=r"qat\.init: init_from's QArrays hold non-finite .* at fc1/kernel/scale"):
    qat.init(params, rules, init_from=qinit)
  state = qat.init(params, rules)
  with pytest.raises(ValueError, match=r"qat\.convert: the latent weights hold non-finite .* at "
                                       r"fc2/kernel \(1 value\)"):
    qat.convert(bad, state)
  diverged = qat.QATState({**state.quantizers, "fc1/kernel": dataclasses.replace(
      state.quantizers["fc1/kernel"], scale=state.quantizers["fc1/kernel"].scale.at[1, 2].set(jnp.nan))})
  with pytest.raises(ValueError, match=r"qat\.convert: the learned quantizer parameters hold non-finite .* at "
                                       r"fc1/kernel/scale \(1 value\)"):
    qat.convert(params, diverged)
  # The compiled step cannot raise; train() checks each fetched loss and names the step (and leaves, if any).
  opt = qat.optimizer(weights=optax.sgd(1e-3))
  step = qat.make_train_step(lambda p, b: jnp.mean((_mlp(p, b[0]) - b[1]) ** 2), opt)
  x, y = _data(params, seed=1)
  batches = [(x, y), (x, y.at[0, 0].set(jnp.nan)), (x, y)]
  with pytest.raises(ValueError, match=r"qat\.train: the latent weights at step 2 hold non-finite .* at fc1/kernel"):
    qat.train(step, qat.init_train_state(params, state, opt), iter(batches), num_steps=3, log_every=3)
