"""jquant.quantized: user-written Linen and NNX models run packed, unmodified."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant import intercept
from jquant.calibrate import W8A8Spec
from jquant.ops import W8A8Weight

W4 = jquant.QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
W8 = jquant.QuantSpec(bits=8)


class GemmaEinsum(nn.Module):
  """Gemma's own layer: a bare parameter contracted with jnp.einsum."""

  shape: tuple
  eqn: str

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.05), self.shape)
    return jnp.einsum(self.eqn, x, w)


class LinenAttention(nn.Module):
  """MaxText/Gemma style: DenseGeneral over heads, Einsum, an output projection over (heads, head_dim)."""

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((4, 8), name="q")(x)
    k = GemmaEinsum((4, 32, 8), "btd,ndh->btnh", name="k")(x)
    v = nn.Einsum((4, 32, 8), "btd,ndh->btnh", use_bias=False, name="v")(x)
    a = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / 8.0, axis=-1)
    o = jnp.einsum("bnts,bsnh->btnh", a, v)
    h = x + nn.DenseGeneral(32, axis=(-2, -1), name="o")(o)
    return h + nn.Dense(32, name="down")(jax.nn.relu(nn.Dense(64, name="up")(h)))


class LinenLM(nn.Module):
  """Embedding, two blocks, a tied head: gathers and a transposed product on the embedding."""

  @nn.compact
  def __call__(self, tokens):
    emb = nn.Embed(40, 32, name="embed")
    x = emb(tokens)
    for i in range(2):
      x = LinenAttention(name=f"layers_{i}")(x)
    return emb.attend(x)


def _axes(fn, *args):
  return jquant.capture.contraction_axes(fn, *args)


@pytest.fixture(scope="module")
def linen():
  m = LinenLM()
  tokens = jnp.asarray(np.arange(18).reshape(2, 9) % 40, jnp.int32)
  params = m.init(jax.random.key(0), tokens)["params"]
  return m, params, tokens


def _bound(ref, tol=2e-5):
  return tol * float(jnp.abs(ref).max()) + 1e-6


@pytest.mark.parametrize("spec", [W4, W8], ids=["w4_g16_asym", "w8_channel"])
def test_linen_model_runs_packed_like_the_float_model_on_dequantized_weights(linen, spec):
  m, params, tokens = linen
  fn = lambda p, t: m.apply({"params": p}, t)
  axes = _axes(fn, params, tokens)
  assert axes["layers_0/k/w"] == (1,) and axes["layers_0/o/kernel"] == (0, 1) and axes["embed/embedding"] == (1,)
  rules = [jquant.Rule(r"layers_\d+/.*(kernel|w)$", spec), jquant.Rule(r"embedding", spec)]
  qp = jquant.quantize_params(params, rules, axes=axes)
  assert isinstance(qp["layers_0"]["o"]["kernel"], jquant.QArray) and qp["layers_0"]["o"]["kernel"].axis_shape == (4, 8)
  got = jax.jit(jquant.quantized(fn))(qp, tokens)
  ref = fn(jquant.dequantize_params(qp), tokens)
  assert float(jnp.abs(got - ref).max()) <= _bound(ref)
  # Packed for real: the tree is smaller than the float one.
  assert jquant.footprint(qp).total_bytes < 0.5 * jquant.footprint(params).total_bytes


def test_matmuls_go_through_qdot_on_the_packed_weight(linen, monkeypatch):
  m, params, tokens = linen
  fn = lambda p, t: m.apply({"params": p}, t)
  qp = jquant.quantize_params(params, [jquant.Rule(r"kernel$|/w$", W4)], axes=_axes(fn, params, tokens))
  seen = []
  real = jquant.ops.qdot
  monkeypatch.setattr(jquant.ops, "qdot", lambda x, w: seen.append(type(w).__name__) or real(x, w))
  jquant.quantized(fn)(qp, tokens)
  # q, k, v, o, up, down in two blocks; the float embedding's gather and head do not.
  assert seen == ["QArray"] * 12


def test_embedding_quantized_along_rows_is_read_dequantized_by_gather_and_head(linen):
  m, params, tokens = linen
  fn = lambda p, t: m.apply({"params": p}, t)
  qp = jquant.quantize_params(params, [jquant.Rule(r"embedding", W8)])  # axis 0: not the head's contraction
  got = jquant.quantized(fn)(qp, tokens)
  ref = fn(jquant.dequantize_params(qp), tokens)
  assert float(jnp.abs(got - ref).max()) <= _bound(ref)


def test_w8a8_leaves_run_int8_products_and_refuse_other_uses(linen):
  m, params, tokens = linen
  fn = lambda p, t: m.apply({"params": p}, t)
  axes = _axes(fn, params, tokens)
  qp = jquant.quantize_params(params, [jquant.Rule(r"layers_0/up/kernel", W8)], axes=axes)
  w = qp["layers_0"]["up"]["kernel"]
  served = jax.tree.map(lambda x: x, qp)
  served["layers_0"]["up"]["kernel"] = W8A8Weight(w)
  h = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32)), jnp.float32)
  up = nn.Dense(64)
  pup = {"kernel": W8A8Weight(w), "bias": params["layers_0"]["up"]["bias"]}
  got = jquant.quantized(up.apply)({"params": pup}, h)
  xq, xs = jquant.ops.quantize_activations_per_token(h)
  acc = np.asarray(xq, np.int64) @ np.asarray(w.qvalue, np.int64)
  want = (acc.astype(np.float32) * np.asarray(xs) * np.asarray(w.scale, np.float32)) + np.asarray(pup["bias"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  bad = jax.tree.map(lambda x: x, params)
  bad["embed"]["embedding"] = W8A8Weight(jquant.quantize(params["embed"]["embedding"], W8))
  with pytest.raises(intercept.InterceptError, match=r"embed/embedding.*W8A8Weight.*'gather'"):
    jquant.quantized(fn)(bad, tokens)


def test_nnx_linear_general_and_einsum():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.q = nnx.LinearGeneral(32, (4, 8), rngs=rngs)
      self.o = nnx.LinearGeneral((4, 8), 32, axis=(-2, -1), rngs=rngs)
      self.e = nnx.Einsum("btd,ndh->btnh", (4, 32, 8), rngs=rngs)
      self.lin = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
      h = x + self.o(jax.nn.relu(self.q(x)) + self.e(x))
      return self.lin(h)

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  axes = _axes(fn, state, x)
  assert axes == {"q/kernel": (0,), "e/kernel": (1,), "o/kernel": (0, 1), "lin/kernel": (0,)}
  qs = jquant.quantize_params(state, [jquant.Rule("kernel", W4)], axes=axes)
  got = jax.jit(jquant.quantized(fn))(qs, x)
  ref = fn(jquant.dequantize_params(qs), x)
  assert float(jnp.abs(got - ref).max()) <= _bound(ref)


def test_scanned_layers_slice_the_packed_stack():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return x + nn.Dense(16, name="mix")(jax.nn.relu(x)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      Stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      return Stack(name="stack")(x, None)[0]

  m, x = Net(), jax.random.normal(jax.random.key(0), (4, 16))
  p = m.init(jax.random.key(1), x)["params"]
  assert p["stack"]["mix"]["kernel"].shape == (3, 16, 16)
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=8, axis=1)  # the stacked layer axis stays
  qp = jquant.quantize_params(p, [jquant.Rule("kernel", spec)])
  fn = lambda p, x: m.apply({"params": p}, x)
  got = jax.jit(jquant.quantized(fn))(qp, x)
  ref = fn(jquant.dequantize_params(qp), x)
  assert float(jnp.abs(got - ref).max()) <= _bound(ref)


def test_remat_and_bf16_promotion():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      blk = nn.remat(nn.Dense)(24, dtype=jnp.bfloat16, name="d")
      return blk(x)

  m, x = Net(), jnp.ones((2, 32), jnp.float32)
  p = m.init(jax.random.key(0), x)["params"]
  qp = jquant.quantize_params(p, [jquant.Rule("kernel", W4)])
  fn = lambda p, x: m.apply({"params": p}, x)
  got = jax.jit(jquant.quantized(fn))(qp, x)
  ref = fn(jquant.dequantize_params(qp), x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


def test_gradients_flow_to_float_leaves_through_a_packed_model(linen):
  m, params, tokens = linen
  fn = lambda p, t: m.apply({"params": p}, t)
  qp = jquant.quantize_params(params, [jquant.Rule(r"layers_\d+/.*(kernel|w)$", W4)], axes=_axes(fn, params, tokens))
  def loss(emb):
    p = {**qp, "embed": {"embedding": emb}}
    return jnp.sum(jquant.quantized(fn)(p, tokens) ** 2)

  g = jax.grad(loss)(params["embed"]["embedding"])
  eps = 1e-3
  d = jnp.zeros_like(g).at[3, 5].set(eps)
  fd = (loss(params["embed"]["embedding"] + d) - loss(params["embed"]["embedding"] - d)) / (2 * eps)
  assert abs(float(g[3, 5]) - float(fd)) <= 2e-2 * abs(float(fd)) + 1e-3


def test_trees_without_quantized_leaves_call_fn_directly(linen):
  m, params, tokens = linen
  fn = lambda p, t: m.apply({"params": p}, t)
  np.testing.assert_array_equal(jquant.quantized(fn)(params, tokens), fn(params, tokens))
