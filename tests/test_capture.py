"""capture: the input of every matmul of any model, keyed by the weight's parameter path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant import capture, models

BLOCK_PATHS = sorted(f"{p}/kernel" for p in ["attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/gate",
                                             "mlp/up"])


@pytest.fixture(scope="module")
def toy(toy_llama):
  return toy_llama


@pytest.fixture(scope="module")
def h0(toy):
  tokens = jnp.asarray(np.arange(24).reshape(2, 12) * 7 % 97, jnp.int32)
  return toy.params["embed"]["embedding"][tokens]


def _block(toy):
  """One decoder block as a user would apply it: the Flax module with its parameters."""
  block = models.Block(toy.config)
  return lambda p, h: block.apply({"params": p}, h)


def _rms(x, scale, eps):
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def test_block_paths_are_relative_and_output_unchanged(toy, h0):
  bp = toy.params["layers_0"]
  out, xs = capture.capture_inputs(_block(toy), bp, h0)
  assert sorted(xs) == BLOCK_PATHS
  np.testing.assert_array_equal(out, _block(toy)(bp, h0))


def test_full_model_paths_name_the_weights(toy, h0):
  tokens = jnp.zeros((2, 12), jnp.int32)
  _, xs = jax.jit(lambda p, t: capture.capture_inputs(toy.apply, p, t))(toy.params, tokens)
  # The tied output head (h @ embedding.T) is a matmul against a parameter too.
  assert sorted(xs) == sorted([f"layers_{i}/{p}" for i in range(2) for p in BLOCK_PATHS] + ["embed/embedding"])
  for p in xs:
    node = toy.params
    for part in p.split("/"):
      node = node[part]
    k = node.shape[1] if p == "embed/embedding" else node.shape[0]
    assert k == xs[p].shape[-1]


def test_shared_inputs_are_one_array_and_values_are_right(toy, h0):
  bp = toy.params["layers_1"]
  c = capture.capture(_block(toy), bp, h0)
  xs = c.inputs
  assert xs["attn/q/kernel"] is xs["attn/k/kernel"] is xs["attn/v/kernel"]
  assert xs["mlp/gate/kernel"] is xs["mlp/up/kernel"]
  np.testing.assert_allclose(xs["attn/q/kernel"], _rms(h0, bp["attn_norm"]["scale"], toy.config.norm_eps),
                             rtol=1e-5, atol=1e-6)
  g, u = xs["mlp/gate/kernel"] @ bp["mlp"]["gate"]["kernel"], xs["mlp/up/kernel"] @ bp["mlp"]["up"]["kernel"]
  np.testing.assert_allclose(xs["mlp/down/kernel"], jax.nn.silu(g) * u, rtol=1e-4, atol=1e-5)
  assert sorted(map(sorted, c.groups)) == [["attn/k/kernel", "attn/q/kernel", "attn/v/kernel"],
                                           ["attn/o/kernel"], ["mlp/down/kernel"],
                                           ["mlp/gate/kernel", "mlp/up/kernel"]]
  assert capture.shared_input_groups(_block(toy), bp, h0) == c.groups


def test_works_under_jit_with_reductions(toy, h0):
  bp = toy.params["layers_0"]

  @jax.jit
  def hessians(p, h):
    out, xs = capture.capture_inputs(_block(toy), p, h)
    return out, {k: jnp.einsum("bti,btj->ij", x, x) for k, x in xs.items()}

  out, hs = hessians(bp, h0)
  _, eager = capture.capture_inputs(_block(toy), bp, h0)
  assert sorted(hs) == BLOCK_PATHS
  for k in hs:
    np.testing.assert_allclose(hs[k], jnp.einsum("bti,btj->ij", eager[k], eager[k]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out, _block(toy)(bp, h0), rtol=1e-5, atol=1e-5)


def test_quantized_params_capture_same_paths(toy, h0):
  rules = [jquant.Rule(r"(attn|mlp)/\w+/kernel", jquant.QuantSpec(bits=4, granularity="group", group_size=16))]
  qb = jquant.quantize_params(toy.params["layers_0"], rules)
  _, xs = jax.jit(lambda p, h: capture.capture_inputs(_block(toy), p, h))(qb, h0)
  assert sorted(xs) == BLOCK_PATHS


def test_bert_capture_paths():
  b = models.bert_init(models.BertConfig(n_layers=1), jax.random.key(1))
  _, xs = jax.jit(lambda p, t: capture.capture_inputs(b.apply, p, t))(b.params, jnp.ones((1, 6), jnp.int32))
  assert {p for p in xs if p.startswith("layers_0/")} == {
      f"layers_0/{n}/kernel" for n in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/down")}


class _Attention(nn.Module):
  """Gemma/MaxText style: DenseGeneral q/k/v over heads, an output projection over (heads, head_dim)."""

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((4, 8), name="q")(x)
    k = nn.DenseGeneral((4, 8), name="k")(x)
    a = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k), axis=-1)
    v = nn.Einsum((4, 32, 8), "btd,ndh->btnh", use_bias=False, name="v")(x)
    o = jnp.einsum("bnts,bsnh->btnh", a, v)
    return nn.DenseGeneral(32, axis=(-2, -1), name="o")(o)


def test_linen_dense_general_and_einsum_axes_and_values():
  m = _Attention()
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  p = m.init(jax.random.key(1), x)["params"]
  c = jax.jit(lambda p, x: capture.capture(m.apply, {"params": p}, x))(p, x)
  assert c.axes == {"q/kernel": (0,), "k/kernel": (0,), "v/kernel": (1,), "o/kernel": (0, 1)}
  assert c.groups[0] == ["q/kernel", "k/kernel", "v/kernel"]
  assert c.inputs["o/kernel"].shape == (2, 5, 32)
  # x @ W viewed as (K, N) is the layer's product.
  w_o = p["o"]["kernel"].reshape(32, 32)
  out = c.inputs["o/kernel"] @ w_o + p["o"]["bias"]
  np.testing.assert_allclose(out, m.apply({"params": p}, x), rtol=1e-5, atol=1e-5)
  w_v = jnp.transpose(p["v"]["kernel"], (1, 0, 2)).reshape(32, 32)
  np.testing.assert_allclose(c.inputs["v/kernel"] @ w_v, x.reshape(2, 5, 32) @ w_v, rtol=1e-6)
  assert capture.contraction_axes(m.apply, {"params": p}, x) == c.axes


def test_nnx_modules_are_seen():
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(16, 32, rngs=rngs)
      self.down = nnx.LinearGeneral((4, 8), 16, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
      return self.down(jax.nn.relu(self.up(x)).reshape(x.shape[:-1] + (4, 8)))

  g, state = nnx.split(Mlp(nnx.Rngs(0)))
  x = jnp.ones((3, 16))
  c = jax.jit(lambda s, x: capture.capture(lambda s, x: nnx.merge(g, s)(x), s, x))(state, x)
  assert c.axes == {"up/kernel": (0,), "down/kernel": (0, 1)}
  assert c.inputs["down/kernel"].shape == (3, 32)


def test_errors_say_what_was_looked_for_and_catch_double_use(toy, h0):
  with pytest.raises(capture.CaptureError, match=r"no matmul against a parameter.*nn\.Dense"):
    capture.capture_inputs(lambda x: x + 1, h0)
  bp = toy.params["layers_0"]
  with pytest.raises(capture.CaptureError, match="used by two matmuls"):
    capture.capture_inputs(lambda p, h: _block(toy)(p, _block(toy)(p, h)), bp, h0)
