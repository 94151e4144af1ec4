"""jquant.graph: any model cut into its blocks and run one block at a time."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant import graph


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm")(x)
    h = nn.Dense(64, name="up")(h)
    return x + nn.Dense(32, name="down")(jax.nn.gelu(h))


class _Net(nn.Module):
  n: int = 3

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(50, 32, name="embed")(tokens)
    for i in range(self.n):
      x = _Block(name=f"layers_{i}")(x)
    return nn.Dense(50, name="head")(nn.LayerNorm(name="final_norm")(x))


@pytest.fixture(scope="module")
def net():
  m = _Net()
  tokens = jnp.arange(14, dtype=jnp.int32).reshape(2, 7)
  params = m.init(jax.random.key(0), tokens)["params"]
  return m, params, tokens


def _run_all(prog, params, *inputs):
  state = prog.prefix(params, *inputs)
  for i in range(len(prog.blocks)):
    state = prog.run_block(i, params, state)
  return prog.suffix(params, state)


def test_linen_model_block_by_block_equals_apply(net):
  m, params, tokens = net
  fn = lambda p, t: m.apply({"params": p}, t)
  prog = graph.trace(fn, params, tokens)
  assert prog.blocks == ("layers_0", "layers_1", "layers_2")
  assert [s.name for s in prog.segments] == ["prefix", "layers_0", "layers_1", "layers_2", "suffix"]
  np.testing.assert_array_equal(_run_all(prog, params, tokens), fn(params, tokens))
  # Alike blocks share one structure key, hence one compiled step.
  assert len({s.key for s in prog.block_segments}) == 1
  # The suffix reads the head, the prefix the embedding; blocks only their own parameters.
  assert prog.segment("prefix").params == ("embed/embedding",)
  assert all(p.startswith("layers_1/") for p in prog.segment("layers_1").params)


def test_jitted_step_is_shared_and_records_relative_paths(net):
  m, params, tokens = net
  prog = graph.trace(lambda p, t: m.apply({"params": p}, t), params, tokens)
  flat = dict(zip(prog.param_paths, graph._flat_params(params)))
  state = prog.prefix(params, tokens)
  for seg in prog.block_segments:
    outs, xs = prog.jitted(seg, record=True)(prog.block_params(flat, seg), graph.state_list(seg, state))
    assert sorted(xs) == ["down/kernel", "up/kernel"]
    state = graph.updated(seg, state, outs)
  assert len(prog._jit_cache) == 1
  want = m.apply({"params": params}, tokens)
  np.testing.assert_allclose(prog.suffix(params, state), want, rtol=1e-5, atol=1e-5)


def test_quantized_params_run_block_by_block(net):
  m, params, tokens = net
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=16)
  qp = jquant.quantize_params(params, [jquant.Rule(r"layers_\d+/.*/kernel", spec)])
  fn = lambda p, t: m.apply({"params": p}, t)
  prog = graph.trace(fn, qp, tokens)
  np.testing.assert_allclose(_run_all(prog, qp, tokens), jquant.quantized(fn)(qp, tokens), rtol=1e-6, atol=1e-6)


def test_nnx_list_of_blocks():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
      return x + jax.nn.relu(self.lin(x))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([Block(rngs) for _ in range(3)])
      self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      for b in self.layers:
        x = b(x)
      return self.head(x)

  fn, state = graph.as_apply(Net(nnx.Rngs(0)))
  x = jnp.ones((2, 16))
  prog = graph.trace(fn, state, x)
  assert prog.blocks == ("layers/0", "layers/1", "layers/2")
  np.testing.assert_allclose(_run_all(prog, state, x), fn(state, x), rtol=1e-6)


def test_find_blocks_defaults_and_errors():
  paths = ["decoder/layer_0/attn/w", "decoder/layer_1/attn/w", "decoder/layer_10/attn/w", "embedder/table",
           "final_norm/scale"]
  assert graph.find_blocks(paths) == ("decoder/layer_0", "decoder/layer_1", "decoder/layer_10")
  assert graph.find_blocks(paths, r"layer_1\d*") == ("decoder/layer_1", "decoder/layer_10")
  with pytest.raises(graph.GraphError, match=r"no repeated numbered blocks.*blocks=r"):
    graph.find_blocks(["a/kernel", "b/kernel"])
  with pytest.raises(graph.GraphError, match="matches no parameter path"):
    graph.find_blocks(paths, r"block_\d+")


def test_interleaved_blocks_are_refused():
  def fn(p, x):
    x = x @ p["layers_0"]["w"]
    x = x @ p["layers_1"]["w"]
    return x @ p["layers_0"]["v"]

  p = {"layers_0": {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 4))}, "layers_1": {"w": jnp.ones((4, 4))}}
  with pytest.raises(graph.GraphError, match="still reads its parameters"):
    graph.trace(fn, p, jnp.ones((2, 4)))


class _ConstBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    gain = np.linspace(0.5, 1.5, x.shape[-1]).astype(np.float32)  # numpy constant: a top-level constvar
    return x + nn.Dense(32, name="down")(jax.nn.gelu(nn.Dense(64, name="up")(x * gain)))


class _ConstNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = _ConstBlock(name=f"layers_{i}")(x)
    return x


def test_program_with_constants_runs_block_by_block():
  # A model closing over numpy arrays traces to a program with constvars; every segment must bind them.
  m = _ConstNet()
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  params = m.init(jax.random.key(1), x)["params"]
  fn = lambda p, t: m.apply({"params": p}, t)
  prog = graph.trace(fn, params, x)
  assert prog.jaxpr.constvars
  np.testing.assert_allclose(_run_all(prog, params, x), fn(params, x), rtol=1e-6, atol=1e-6)
  seg = prog.block_segments[0]
  flat = dict(zip(prog.param_paths, graph._flat_params(params)))
  state = prog.prefix(params, x)
  outs, inputs = prog.jitted(seg, record=True)(prog.block_params(flat, seg), graph.state_list(seg, state))
  assert sorted(inputs) == ["down/kernel", "up/kernel"]


def test_a_model_whose_forward_is_one_jitted_call_is_cut_at_its_blocks():
  """gemma's Transformer wraps __call__ in nn.jit: the whole forward is one pjit at the top level."""
  import functools

  class Net(nn.Module):
    @functools.partial(nn.jit, static_argnames=("self",))
    @nn.compact
    def __call__(self, x):
      for i in range(3):
        x = x + nn.Dense(16, name=f"layer_{i}")(x)
      return x

  m, x = Net(), jnp.ones((2, 16))
  p = m.init(jax.random.key(0), x)["params"]
  fn = lambda p, x: m.apply({"params": p}, x)
  prog = graph.trace(fn, p, x)
  assert prog.blocks == ("layer_0", "layer_1", "layer_2")
  np.testing.assert_allclose(_run_all(prog, p, x), fn(p, x), rtol=1e-6)
