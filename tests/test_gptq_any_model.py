"""GPTQ on user-written models that use only Flax's own layers (Linen and NNX), unmodified."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from test_gptq_model import gptq_paper_options
from jquant import gptq, graph

D, HEADS, HD, FF, VOCAB, T = 32, 4, 8, 64, 40, 16
SPEC = jquant.QuantSpec(bits=3, symmetric=False, granularity="group", group_size=16)
RULES = [jquant.Rule(r"(layers|blocks)[_/]\d+/.*(kernel|w)$", SPEC)]
U = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff


def _attend(q, k, v):
  """Causal softmax attention on (B, T, H, hd) heads."""
  s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool)), s, -1e30)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


# --- Linen, nn.Dense only -----------------------------------------------------------------------


class DenseBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    h = nn.LayerNorm(name="attn_norm")(x)
    q, k, v = (nn.Dense(D, name=n)(h).reshape(b, t, HEADS, HD) for n in ("q", "k", "v"))
    x = x + nn.Dense(D, name="o")(_attend(q, k, v).reshape(b, t, D))
    h = nn.LayerNorm(name="mlp_norm")(x)
    return x + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(FF, name="up")(h)))


class DenseLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed")(tokens)
    for i in range(2):
      x = DenseBlock(name=f"layers_{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="final_norm")(x))


# --- Linen, Gemma/MaxText style: DenseGeneral and Einsum ------------------------------------------


class GeneralBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.RMSNorm(name="attn_norm")(x)
    q = nn.Einsum((HEADS, D, HD), "btd,ndh->btnh", use_bias=False, name="q")(h)  # Gemma: (heads, d, hd) @ 1
    k = nn.DenseGeneral((HEADS, HD), use_bias=False, name="k")(h)  # (d, heads, hd) @ 0
    v = nn.DenseGeneral((HEADS, HD), use_bias=False, name="v")(h)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o")(_attend(q, k, v))  # (heads, hd, d) @ (0, 1)
    h = nn.RMSNorm(name="mlp_norm")(x)
    gate, up = nn.Einsum((2, FF, D), "btd,cfd->cbtf", use_bias=False, name="gating")(h)  # (2, ff, d) @ 2
    return x + nn.Einsum((FF, D), "btf,fd->btd", use_bias=False, name="down")(jax.nn.gelu(gate) * up)


class GeneralNet(nn.Module):
  """Takes embeddings (B, T, d), not tokens: calibration data of any kind."""

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = GeneralBlock(name=f"layers_{i}")(x)
    return nn.RMSNorm(name="final_norm")(x)


# --- NNX -------------------------------------------------------------------------------------------


class NnxLinearBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.q, self.k, self.v, self.o = (nnx.Linear(D, D, rngs=rngs) for _ in range(4))
    self.mlp_norm = nnx.LayerNorm(D, rngs=rngs)
    self.up, self.down = nnx.Linear(D, FF, rngs=rngs), nnx.Linear(FF, D, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    h = self.norm(x)
    q, k, v = (f(h).reshape(b, t, HEADS, HD) for f in (self.q, self.k, self.v))
    x = x + self.o(_attend(q, k, v).reshape(b, t, D))
    return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class NnxGeneralBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(D, rngs=rngs)
    self.q = nnx.Einsum("btd,ndh->btnh", (HEADS, D, HD), rngs=rngs)
    self.k = nnx.LinearGeneral(D, (HEADS, HD), use_bias=False, rngs=rngs)
    self.v = nnx.LinearGeneral(D, (HEADS, HD), use_bias=False, rngs=rngs)
    self.o = nnx.LinearGeneral((HEADS, HD), D, axis=(-2, -1), use_bias=False, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(D, rngs=rngs)
    self.up = nnx.Einsum("btd,df->btf", (D, FF), rngs=rngs)
    self.down = nnx.LinearGeneral(FF, D, rngs=rngs)

  def __call__(self, x):
    h = self.norm(x)
    x = x + self.o(_attend(self.q(h), self.k(h), self.v(h)))
    return x + self.down(jax.nn.relu(self.up(self.mlp_norm(x))))


class NnxLM(nnx.Module):
  def __init__(self, block, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.blocks = nnx.List([block(rngs) for _ in range(2)])
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for b in self.blocks:
      x = b(x)
    return self.head(x)


# --- helpers ---------------------------------------------------------------------------------------


def _tokens(seed, n=12):
  return np.asarray(jax.random.randint(jax.random.key(seed), (n, T), 0, VOCAB), np.int32)


def _kernel_paths(params, prefix):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [jquant.utils.path_str(k) for k, v in leaves if jnp.ndim(v) >= 2]
  return sorted(p for p in paths if p.startswith(prefix))


def _check_pass(fn, params, q, report, x, blocks):
  """Every block weight solved, beating RTN per layer; the packed tree runs like the dequantized float model."""
  want = sorted(p for b in blocks for p in _kernel_paths(params, b + "/"))
  assert sorted(l.path for l in report.layers) == want
  assert all(l.loss < l.rtn_loss for l in report.layers), str(report)
  assert report.total_loss < 0.9 * report.total_rtn_loss
  flat_q = {jquant.utils.path_str(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(q, is_leaf=lambda v: isinstance(v, jquant.QArray))[0]}
  assert all(isinstance(flat_q[p], jquant.QArray) for p in want)
  got = jax.jit(jquant.quantized(fn))(q, x)
  ref = jax.jit(fn)(jquant.dequantize_params(q), x)
  # Same weights and inputs: only float32 summation order differs (|err| <~ K u sum|x w| per matmul, a few
  # matmuls deep, K <= 64), far below the 2e-5 relative bound used here.
  assert 64 * U < 2e-5
  assert float(jnp.max(jnp.abs(got - ref))) <= 2e-5 * float(jnp.max(jnp.abs(ref))) + 1e-6
  return flat_q


# --- tests -----------------------------------------------------------------------------------------


def test_linen_dense_model():
  m = DenseLM()
  calib = _tokens(1)
  params = m.init(jax.random.key(0), calib[:1])["params"]
  rules = RULES + [jquant.Rule(r"head/kernel", jquant.QuantSpec(bits=8))]
  q, rep = gptq.quantize_model(m, params, calib, rules, batch_size=5, progress=False, return_report=True)
  fn = lambda p, t: m.apply({"params": p}, t)
  flat = _check_pass(fn, params, q, rep, calib, ("layers_0", "layers_1"))
  # The untied head is outside the blocks: round-to-nearest, and the report says so.
  assert rep.rtn_leaves == ("head/kernel",) and isinstance(flat["head/kernel"], jquant.QArray)
  assert rep.tokens == 12 * T  # the padded 3rd batch (5 + 5 + 2 real) counts only real rows
  assert "round-to-nearest (no captured input): head/kernel" in str(rep)


def test_linen_dense_general_and_einsum_on_embeddings():
  m = GeneralNet()
  x = jax.random.normal(jax.random.key(1), (8, T, D))
  params = m.init(jax.random.key(0), x[:1])["params"]
  q, rep = gptq.quantize_model(m, params, x, RULES, batch_size=4, progress=False, return_report=True,
                               act_order=True)
  flat = _check_pass(lambda p, x: m.apply({"params": p}, x), params, q, rep, x, ("layers_0", "layers_1"))
  axes = {l.path: l.axes for l in rep.layers}
  assert axes["layers_0/q/kernel"] == (1,) and axes["layers_0/k/kernel"] == (0,)
  assert axes["layers_0/o/kernel"] == (0, 1) and axes["layers_0/gating/kernel"] == (2,)
  o = flat["layers_1/o/kernel"]
  assert o.shape == (HEADS, HD, D) and o.axis_shape == (HEADS, HD)
  assert flat["layers_1/q/kernel"].scale.shape == (HEADS, D // 16, HD)  # groups along d, Gemma's layout kept


def test_nd_kernel_codes_equal_a_direct_solve_on_its_matrix_view():
  """Block 0's Gemma-style query (heads, d, hd) and DenseGeneral output (heads, hd, d): the pass gives the codes
  that gptq.solve gives on to_matrix(w, axes) with the Hessian of the captured inputs."""
  m = GeneralNet()
  x = jax.random.normal(jax.random.key(1), (8, T, D))
  params = m.init(jax.random.key(0), x[:1])["params"]
  # The paper's options, one capture: the same Hessian and solver as the direct solve below.
  q = gptq.quantize_model(m, params, x, RULES, batch_size=8, progress=False, **gptq_paper_options())
  cap = jquant.capture.capture(lambda p, x: m.apply({"params": p}, x), params, x)
  for name in ("q", "o"):
    path = f"layers_0/{name}/kernel"
    ka = cap.axes[path]
    w2 = jquant.qarray.to_matrix(params["layers_0"][name]["kernel"], ka)
    want, _ = gptq.solve(w2, gptq.hessian(cap.inputs[path]), SPEC)
    got = jquant.qarray.to_matrix(q["layers_0"][name]["kernel"].codes(), ka)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.codes()), err_msg=path)


@pytest.mark.parametrize("block", [NnxLinearBlock, NnxGeneralBlock], ids=["linear", "linear_general_einsum"])
def test_nnx_model(block):
  model = NnxLM(block, nnx.Rngs(0))
  calib = _tokens(2, n=8)
  q, rep = gptq.quantize_model(model, None, calib, RULES, batch_size=4, progress=False, return_report=True)
  graphdef, state = nnx.split(model)
  fn = lambda s, t: nnx.merge(graphdef, s)(t)
  flat = _check_pass(fn, state, q, rep, calib, ("blocks/0", "blocks/1"))
  assert rep.rtn_leaves == ()
  if block is NnxGeneralBlock:
    assert flat["blocks/0/o/kernel"].axis_shape == (HEADS, HD)
    assert {l.path: l.axes for l in rep.layers}["blocks/1/q/kernel"] == (1,)
  # The model itself is untouched.
  assert not isinstance(nnx.split(model)[1]["blocks"][0]["q"]["kernel"].value, jquant.QArray)


class _MlpNet(nn.Module):
  """Blocks on (B, K) rows: no position axis."""

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = x + nn.Dense(D, name=f"layers_{i}")(jax.nn.relu(x))
    return x


def test_errors_name_the_leaf_and_the_argument():
  m = _MlpNet()
  x = jax.random.normal(jax.random.key(0), (8, D))
  params = m.init(jax.random.key(1), x)["params"]
  rules = [jquant.Rule("kernel", SPEC)]
  with pytest.raises(ValueError, match=r"skip_positions/position_weights apply to axis -2.*'kernel'.*\(8, 32\)"):
    gptq.quantize_model(m, params, x, rules, skip_positions=1, progress=False)
  bad = jax.tree_util.tree_map(lambda a: a, params)
  bad["layers_1"]["kernel"] = bad["layers_1"]["kernel"].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"float parameters hold non-finite.*at layers_1/kernel \(1 value\)"):
    gptq.quantize_model(m, bad, x, rules, progress=False)
  with pytest.raises(ValueError, match=r"calibration inputs hold non-finite.* at calib \(1 value\)"):
    gptq.quantize_model(m, params, x.at[0, 0].set(jnp.inf), rules, progress=False)
  big = x.at[0, 0].set(3e38)  # finite input whose square overflows: named by the layer whose Hessian it reaches
  with pytest.raises(ValueError, match=r"Hessian of \['layers_0/kernel'\] is non-finite.*every parameter"):
    gptq.quantize_model(m, params, big, rules, progress=False, token_norm_cap=None)  # (the cap would drop the row)
  with pytest.raises(ValueError, match=r"quantize_model \(layers_0: layers_0/kernel\).*d in \[0, 0\]"):
    gptq.quantize_model(m, params, x, rules, damp=0.0, damp_tries=2, progress=False)  # 8 rows: H has rank 8 < 32
  with pytest.raises(ValueError, match=r"params=None"):
    gptq.quantize_model(m, None, x, rules, progress=False)
  with pytest.raises(graph.GraphError, match=r"matches no parameter path"):
    gptq.quantize_model(m, params, x, rules, blocks=r"decoder_\d+", progress=False)
  with pytest.raises(ValueError, match=r"calibration data is empty"):
    gptq.quantize_model(m, params, [], rules, progress=False)


def test_list_of_batches_and_wrapped_params():
  m = _MlpNet()
  x = jax.random.normal(jax.random.key(0), (10, D))
  params = m.init(jax.random.key(1), x)["params"]
  rules = [jquant.Rule("kernel", SPEC)]
  a, ra = gptq.quantize_model(m, params, [x[:6], x[6:]], rules, progress=False, return_report=True)
  b, rb = gptq.quantize_model(m, {"params": params}, x, rules, batch_size=10, progress=False, return_report=True)
  assert list(b) == ["params"] and ra.tokens == rb.tokens == 10
  for k in ("layers_0", "layers_1"):
    np.testing.assert_array_equal(np.asarray(a[k]["kernel"].codes()), np.asarray(b["params"][k]["kernel"].codes()))


class _TimeMajorNet(nn.Module):
  """Blocks that put time first: the recorded inputs are (T, B, K), without the batch on axis 0."""

  @nn.compact
  def __call__(self, x):
    x = jnp.swapaxes(x, 0, 1)
    for i in range(2):
      x = x + nn.Dense(D, name=f"layers_{i}")(x)
    return x


def test_padding_needs_the_batch_on_axis_0():
  m = _TimeMajorNet()
  x = jax.random.normal(jax.random.key(0), (6, 3, D))
  params = m.init(jax.random.key(1), x)["params"]
  rules = [jquant.Rule("kernel", SPEC)]
  with pytest.raises(ValueError, match=r"padded to whole batches of 4.*'kernel' has shape \(3, 4, 32\)"):
    gptq.quantize_model(m, params, x, rules, batch_size=4, progress=False)
  q = gptq.quantize_model(m, params, x, rules, batch_size=3, progress=False)  # no padding: fine
  assert isinstance(q["layers_1"]["kernel"], jquant.QArray)
