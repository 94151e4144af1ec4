"""capture_inputs: paths, shared inputs, values, jit, errors (toy models only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import capture, models

BLOCK_PATHS = ["attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/gate", "mlp/up"]


@pytest.fixture(scope="module")
def toy(toy_llama):
  return toy_llama


@pytest.fixture(scope="module")
def h0(toy):
  return toy.embed(toy.params, jnp.asarray(np.arange(24).reshape(2, 12) * 7 % 97, jnp.int32))


def _rms(x, scale, eps):
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def test_block_paths_are_relative_and_output_unchanged(toy, h0):
  bp = toy.params["layers_0"]
  out, xs = capture.capture_inputs(toy.block, bp, h0)
  assert sorted(xs) == BLOCK_PATHS
  np.testing.assert_array_equal(out, toy.block(bp, h0))


def test_full_model_paths_are_prefixed(toy, h0):
  tokens = jnp.zeros((2, 12), jnp.int32)
  _, xs = jax.jit(lambda p, t: capture.capture_inputs(toy.apply, p, t))(toy.params, tokens)
  assert sorted(xs) == sorted(f"layers_{i}/{p}" for i in range(2) for p in BLOCK_PATHS)
  for p in xs:  # every captured path names a kernel in the tree
    node = toy.params
    for part in p.split("/"):
      node = node[part]
    assert node["kernel"].shape[0] == xs[p].shape[-1]


def test_shared_inputs_are_the_same_array_and_values_are_right(toy, h0):
  bp = toy.params["layers_1"]
  _, xs = capture.capture_inputs(toy.block, bp, h0)
  assert xs["attn/q"] is xs["attn/k"] is xs["attn/v"]
  assert xs["mlp/gate"] is xs["mlp/up"]
  np.testing.assert_allclose(xs["attn/q"], _rms(h0, bp["attn_norm"]["scale"], toy.config.norm_eps), rtol=1e-5, atol=1e-6)
  g, u = xs["mlp/gate"] @ bp["mlp"]["gate"]["kernel"], xs["mlp/up"] @ bp["mlp"]["up"]["kernel"]
  np.testing.assert_allclose(xs["mlp/down"], jax.nn.silu(g) * u, rtol=1e-4, atol=1e-5)
  assert capture.shared_input_groups(sorted(xs)) == [["attn/k", "attn/q", "attn/v"], ["attn/o"], ["mlp/down"],
                                                     ["mlp/gate", "mlp/up"]]


def test_works_under_jit_with_reductions(toy, h0):
  bp = toy.params["layers_0"]

  @jax.jit
  def hessians(p, h):
    out, xs = capture.capture_inputs(toy.block, p, h)
    return out, {k: jnp.einsum("bti,btj->ij", x, x) for k, x in xs.items()}

  out, hs = hessians(bp, h0)
  _, eager = capture.capture_inputs(toy.block, bp, h0)
  assert sorted(hs) == BLOCK_PATHS
  for k in hs:
    np.testing.assert_allclose(hs[k], jnp.einsum("bti,btj->ij", eager[k], eager[k]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out, toy.block(bp, h0), rtol=1e-5, atol=1e-5)


def test_quantized_params_capture_same_paths(toy, h0):
  rules = [jquant.Rule(r"(attn|mlp)/\w+/kernel", jquant.QuantSpec(bits=4, granularity="group", group_size=16))]
  qb = jquant.quantize_params(toy.params["layers_0"], rules)
  _, xs = jax.jit(lambda p, h: capture.capture_inputs(toy.block, p, h))(qb, h0)
  assert sorted(xs) == BLOCK_PATHS


def test_bert_capture_paths():
  b = models.bert_init(models.BertConfig(n_layers=1), jax.random.key(1))
  _, xs = jax.jit(lambda p, t: capture.capture_inputs(b.apply, p, t))(b.params, jnp.ones((1, 6), jnp.int32))
  assert {p for p in xs if p.startswith("layers_0/")} == {
      "layers_0/attn/q", "layers_0/attn/k", "layers_0/attn/v", "layers_0/attn/o", "layers_0/mlp/up",
      "layers_0/mlp/down"}


def test_errors_when_nothing_recorded_or_called_twice(toy, h0):
  with pytest.raises(capture.CaptureError, match="no Dense input"):
    capture.capture_inputs(lambda x: x + 1, h0)
  bp = toy.params["layers_0"]
  with pytest.raises(capture.CaptureError, match="ran twice"):
    capture.capture_inputs(lambda h: toy.block(bp, toy.block(bp, h)), h0)
