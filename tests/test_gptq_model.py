"""GPTQ model pass on a two-block toy Llama (jquant's own model, through the same generic path as any model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import gptq, models

SPEC = jquant.QuantSpec(bits=3, granularity="group", group_size=32)
RULES = [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel$", SPEC)]


def gptq_paper_options():
  """quantize_model options that make it solve as `gptq.solve` does on one capture of the float block."""
  return dict(true_sequential=False, act_order=False, damp=0.01, token_norm_cap=None)


@pytest.fixture(scope="module")
def toy():
  cfg = models.LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)  # q|k|v and gate|up: one solve shape
  m = models.llama_init(cfg, jax.random.key(0))
  calib = np.asarray(jax.random.randint(jax.random.key(1), (12, 32), 0, 256), np.int32)
  evalw = np.asarray(jax.random.randint(jax.random.key(2), (8, 32), 0, 256), np.int32)
  return m, calib, evalw


@pytest.fixture(scope="module")
def single(toy):
  m, calib, _ = toy
  return gptq.quantize_model(m, m.params, calib, RULES, batch_size=4, progress=False, return_report=True)


def test_model_pass_beats_rtn(toy, single):
  m, _, evalw = toy
  qparams, report = single
  kernels = [f"layers_{i}/{p}/kernel" for i in range(2)
             for p in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")]
  assert [l.path for l in report.layers] == kernels
  for i in range(2):
    for sub, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
      for nm in names:
        assert isinstance(qparams[f"layers_{i}"][sub][nm]["kernel"], jquant.QArray)
  assert not isinstance(qparams["embed"]["embedding"], jquant.QArray)
  # Every layer's GPTQ loss is below round-to-nearest's on the same Hessian.
  assert all(l.loss < l.rtn_loss for l in report.layers), str(report)
  assert report.total_loss < 0.8 * report.total_rtn_loss
  assert report.tokens == 12 * 32
  # And the model's logits are closer to the float model's than with RTN.
  apply = jax.jit(m.apply)
  ref = apply(m.params, evalw)
  err = lambda p: float(jnp.mean((apply(p, evalw) - ref) ** 2))
  rtn = jax.jit(lambda p: jquant.quantize_params(p, RULES))(m.params)
  assert err(qparams) < err(rtn)
  assert "total loss" in str(report)


def test_shared_inputs_share_one_hessian(toy, single):
  """q, k, v receive one array; the pass solves them side by side with one Hessian, and q
  comes out as if solved alone with the Hessian of the recorded inputs."""
  m, calib, _ = toy
  qparams = gptq.quantize_model(m, m.params, calib, RULES, batch_size=4, progress=False, **gptq_paper_options())
  cap = jquant.capture.capture(m.apply, m.params, jnp.asarray(calib))
  assert ["layers_0/attn/q/kernel", "layers_0/attn/k/kernel", "layers_0/attn/v/kernel"] in cap.groups
  assert ["layers_0/mlp/gate/kernel", "layers_0/mlp/up/kernel"] in cap.groups

  @jax.jit
  def hess_q(params, tokens):
    return gptq.hessian(jquant.capture.capture(m.apply, params, tokens).inputs["layers_0/attn/q/kernel"])

  hess = hess_q(m.params, jnp.asarray(calib))
  q, _ = gptq.solve(m.params["layers_0"]["attn"]["q"]["kernel"], hess, SPEC)
  np.testing.assert_array_equal(np.asarray(q.codes()),
                                np.asarray(qparams["layers_0"]["attn"]["q"]["kernel"].codes()))


def test_mesh_pass_equals_single_device(toy, single, cpu_mesh):
  m, calib, _ = toy
  qparams, report = single
  qm, rm = gptq.quantize_model(m, m.params, calib, RULES, batch_size=4, mesh=cpu_mesh, progress=False,
                               return_report=True)
  flat = jax.tree_util.tree_leaves_with_path(qparams)
  flat_m = jax.tree_util.tree_leaves(qm)
  assert len(flat) == len(flat_m)
  for (path, a), b in zip(flat, flat_m):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype in (np.uint8, np.int8):  # packed codes: identical integers
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    else:  # psum adds the Hessian's partial sums in another order: scales agree to float rounding
      np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(rm.total_loss, report.total_loss, rtol=1e-4)


def test_skip_positions_and_options(toy):
  m, calib, _ = toy
  rules = [jquant.Rule(r"layers_0/mlp/\w+/kernel$", SPEC), jquant.Rule(r"embed", jquant.QuantSpec(bits=8))]
  q, rep = gptq.quantize_model(m, m.params, calib, rules, batch_size=4, skip_positions=1, progress=False,
                               return_report=True)
  assert [l.path for l in rep.layers] == ["layers_0/mlp/gate/kernel", "layers_0/mlp/up/kernel",
                                          "layers_0/mlp/down/kernel"]
  assert rep.tokens == 12 * 31
  assert rep.rtn_leaves == ("embed/embedding",) and isinstance(q["embed"]["embedding"], jquant.QArray)
  assert not isinstance(q["layers_0"]["attn"]["q"]["kernel"], jquant.QArray)
  # A zero weight on position 0 is the same Hessian as skipping it: the same codes.
  pw = np.ones(32, np.float32)
  pw[0] = 0.0
  q2, rep2 = gptq.quantize_model(m, m.params, calib, rules, batch_size=4, position_weights=pw, progress=False,
                                 return_report=True)
  assert rep2.tokens == 12 * 31
  for name in ("gate", "up", "down"):
    np.testing.assert_array_equal(np.asarray(q2["layers_0"]["mlp"][name]["kernel"].codes()),
                                  np.asarray(q["layers_0"]["mlp"][name]["kernel"].codes()))
  with pytest.raises(ValueError, match=r"position_weights must be 32"):
    gptq.quantize_model(m, m.params, calib, rules, progress=False, position_weights=np.ones(31))
  with pytest.raises(TypeError, match="unknown solver options"):
    gptq.quantize_model(m, m.params, calib, rules, progress=False, blocksize=64)
  with pytest.raises(ValueError, match="skip_positions=32"):
    gptq.quantize_model(m, m.params, calib, rules, progress=False, skip_positions=32)


# ------------------------------------------------------------------ true-sequential against float64 NumPy

import flax.linen as nn

from test_gptq import _assert_codes_match, ref_gptq

_D, _F = 48, 64
_TS_SPEC = jquant.QuantSpec(bits=3, symmetric=False, granularity="group", group_size=16)


class _GluBlock(nn.Module):
  """``x + down(relu(up x) * gate x)``: gate|up share one input, down reads their product."""

  @nn.compact
  def __call__(self, x):
    up = nn.Dense(_F, use_bias=False, name="up")
    gate = nn.Dense(_F, use_bias=False, name="gate")
    return x + nn.Dense(_D, use_bias=False, name="down")(jax.nn.relu(up(x)) * gate(x))


class _GluNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = _GluBlock(name=f"layers_{i}")(x)
    return x


def _np_true_sequential(params, x):
  """The GPTQ reference's true-sequential pass, float64: each group's Hessian from the block run with the
  groups before it already quantized; the next block reads the quantized block's output."""
  out = {}
  w = {f"{b}/{k}": np.asarray(v["kernel"], np.float64) for b, sub in params.items() for k, v in sub.items()}
  x = np.asarray(x, np.float64)
  relu = lambda a: np.maximum(a, 0.0)

  def solve(name, inputs):
    c, r, _, w[name] = ref_gptq(w[name], 2.0 / len(inputs) * inputs.T @ inputs, 3, False, 16, with_deq=True)
    out[name] = (c, r)

  for i in range(2):
    up, gate, down = (f"layers_{i}/{n}" for n in ("up", "gate", "down"))
    solve(up, x)
    solve(gate, x)
    solve(down, relu(x @ w[up]) * (x @ w[gate]))
    x = x + (relu(x @ w[up]) * (x @ w[gate])) @ w[down]
  return out


def test_true_sequential_matches_float64_reference():
  net = _GluNet()
  x = jax.random.normal(jax.random.key(3), (256, _D))
  params = net.init(jax.random.key(4), x)["params"]
  rules = [jquant.Rule("kernel", _TS_SPEC)]
  ref = _np_true_sequential(params, x)
  q, rep = gptq.quantize_model(net, params, x, rules, batch_size=128, progress=False, return_report=True,
                               **{**gptq_paper_options(), "true_sequential": True})
  assert [l.path for l in rep.layers] == [f"layers_{i}/{n}/kernel" for i in range(2) for n in ("up", "gate", "down")]
  codes = lambda p, name: np.asarray(jquant.utils.get_path(p, name + "/kernel").codes())
  for name, (c, ratio) in ref.items():
    _assert_codes_match(codes(q, name), c, ratio, min_exact_cols=0.9)
  # The one-capture pass calibrates down (and block 1) on float-model inputs: it does not match.
  q1 = gptq.quantize_model(net, params, x, rules, batch_size=128, progress=False, **gptq_paper_options())
  for name in ("layers_0/up", "layers_0/gate"):  # the first group sees the same inputs either way
    np.testing.assert_array_equal(codes(q1, name), codes(q, name))
  differs = lambda name: np.mean(codes(q1, name) != ref[name][0])
  assert differs("layers_0/down") > 0.02 and differs("layers_1/up") > 0.02


@pytest.mark.parametrize("path", ["layers_0/mlp/up/kernel", "layers_1/mlp/down/kernel", "final_norm/scale"])
def test_non_finite_parameters_are_named_up_front(toy, path):
  """Issue inputs: a NaN in layers_0/mlp/up used to surface as a Hessian error on mlp/down; one in the last
  block passed silently with a NaN total loss; one in a float leaf no rule selects poisons every block after it."""
  m, calib, _ = toy
  leaf = jquant.utils.get_path(m.params, path)
  bad = jquant.utils.set_path(m.params, path, leaf.at[(0,) * leaf.ndim].set(jnp.nan))
  with pytest.raises(ValueError, match=rf"gptq.quantize_model: the float parameters hold non-finite values .* at "
                                       rf"{path} \(1 value\)"):
    gptq.quantize_model(m, bad, calib, RULES, batch_size=4, progress=False)


def test_rules_matching_no_parameter_are_refused(toy):
  """Reviewed: a rule whose pattern matches nothing (a typo, another model's names) left those weights float
  without a word; now every such rule is named with the nearest parameter paths."""
  m, calib, _ = toy
  rules = RULES + [jquant.Rule(r"attn/q_proj/kernel", SPEC)]
  with pytest.raises(ValueError, match=r"gptq.quantize_model: rules\[1\] \(pattern 'attn/q_proj/kernel', "
                                       r"nearest paths \[.*\]\) matches no parameter"):
    gptq.quantize_model(m, m.params, calib, rules, batch_size=4, progress=False)
  with pytest.raises(ValueError, match="gptq.quantize_model: rules is empty"):  # returned the float tree
    gptq.quantize_model(m, m.params, calib, [], progress=False)
  with pytest.raises(TypeError, match="rules must be a list of jquant.Rule objects; got one Rule: wrap it"):
    gptq.quantize_model(m, m.params, calib, RULES[0], progress=False)


# ------------------------------------------------------------------ attention-sink remedy


class _SinkBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(_D, use_bias=False, name="down")(jax.nn.gelu(nn.Dense(_F, use_bias=False, name="up")(x)))


class _SinkNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = _SinkBlock(name=f"layers_{i}")(x)
    return x


def _sink_windows(key, n, t=16):
  """Correlated token rows; position 0 carries a massive activation (200 in 4 channels, ~60x the norm of
  the other tokens), like the attention sink of windows that start without BOS."""
  mix = jax.random.normal(jax.random.key(9), (_D, _D)) / 8
  x = jax.random.normal(key, (n, t, _D)) @ (jnp.eye(_D) + mix)
  return x.at[:, 0, :4].set(200.0)


def test_token_norm_cap_makes_gptq_beat_rtn_with_a_planted_sink():
  """Plain GPTQ spends its error budget on the sink row and loses to RTN on every other position; with the
  sink's Hessian weight capped it beats RTN there and keeps the sink's own error far below RTN's."""
  net = _SinkNet()
  x, ev = _sink_windows(jax.random.key(3), 16), _sink_windows(jax.random.key(4), 16)
  params = net.init(jax.random.key(5), x)["params"]
  rules = [jquant.Rule("kernel", _TS_SPEC)]
  ref = net.apply({"params": params}, ev)
  run = jax.jit(jquant.quantized(net.apply))

  def errors(p):  # mean squared output error at positions 1+ and at the sink
    d = run({"params": p}, ev) - ref
    return float(jnp.mean(d[:, 1:] ** 2)), float(jnp.mean(d[:, 0] ** 2))

  rtn = errors(jquant.quantize_params(params, rules))
  paper = gptq_paper_options()
  plain = errors(gptq.quantize_model(net, params, x, rules, progress=False, **paper))
  capped = errors(gptq.quantize_model(net, params, x, rules, progress=False, **{**paper, "token_norm_cap": 10.0}))
  assert capped[0] < 0.8 * min(rtn[0], plain[0]) and capped[1] < 0.2 * rtn[1], (rtn, plain, capped)
  with pytest.raises(ValueError, match=r"token_norm_cap=0.5; allowed: None or a finite float >= 1"):
    gptq.quantize_model(net, params, x, rules, token_norm_cap=0.5, progress=False)


def test_capped_rows_count_at_the_bound():
  """The cap's weights: a row of norm r > cap * median counts (cap * median / r)^2; others count 1."""
  from jquant.gptq.model import _cap_weights
  x = np.ones((1, 5, 4), np.float32)
  x[0, 0] *= 40.0  # norm 80 vs median 2
  w = np.asarray(_cap_weights(jnp.asarray(x), None, 10.0))
  np.testing.assert_allclose(w, [[(20.0 / 80.0) ** 2, 1, 1, 1, 1]], rtol=1e-6)
  w = np.asarray(_cap_weights(jnp.asarray(x), jnp.asarray([[1.0, 1, 1, 0, 0]]), 10.0))  # median of counted rows
  np.testing.assert_allclose(w, [[(20.0 / 80.0) ** 2, 1, 1, 0, 0]], rtol=1e-6)


def test_importance_reaches_the_static_group_search(toy):
  """``importance={path: (K,)}`` replaces the Hessian's diagonal in the static groups' ``clip="fit"`` search of
  that weight (and the weights sharing its input): with all weight on one input row, that row is nearly exact;
  a path that is not a parameter is refused before any work."""
  m, calib, _ = toy
  spec = jquant.QuantSpec(bits=3, granularity="group", group_size=32, clip="fit")
  rules = [jquant.Rule(r"layers_0/mlp/down/kernel$", spec)]
  imp = np.full(64, 1e-6, np.float32)
  imp[5] = 1.0
  kw = dict(batch_size=4, progress=False, static_groups=True, act_order=False, damp=0.01)
  q_imp = gptq.quantize_model(m, m.params, calib, rules, importance={"params/layers_0/mlp/down/kernel": imp}, **kw)
  q_h = gptq.quantize_model(m, m.params, calib, rules, **kw)
  w = m.params["layers_0"]["mlp"]["down"]["kernel"]
  row_err = lambda q: float(jnp.max(jnp.abs(q["layers_0"]["mlp"]["down"]["kernel"].dequantize()[5] - w[5])))  # noqa: E731
  assert row_err(q_imp) < 0.5 * row_err(q_h)
  with pytest.raises(ValueError, match=r"importance names \['layers_0/mlp/dwn/kernel'\], not parameters"):
    gptq.quantize_model(m, m.params, calib, rules, importance={"layers_0/mlp/dwn/kernel": imp}, **kw)
  # Importance that would be ignored is refused: min-max specs, dynamic groups.
  with pytest.raises(ValueError, match=r"takes min-max ranges \(clip=minmax\): it would be ignored"):
    gptq.quantize_model(m, m.params, calib, [jquant.Rule(r"layers_0/mlp/down/kernel$", spec.replace(clip="minmax"))],
                        importance={"layers_0/mlp/down/kernel": imp}, **kw)
  with pytest.raises(ValueError, match="weights static group parameters only; pass static_groups=True"):
    gptq.quantize_model(m, m.params, calib, rules, importance={"layers_0/mlp/down/kernel": imp},
                        **dict(kw, static_groups=False))


def test_two_level_rules_need_static_groups(toy):
  # GGUF k-quant grids (a super-group's scale spans its groups) before any block runs, naming the option.
  m, calib, _ = toy
  spec = jquant.QuantSpec(bits=4, symmetric=False, offset="min", granularity="group", group_size=32, scale_bits=6,
                          super_group_size=64, scale_dtype="float16")
  rules = [jquant.Rule(r"layers_0/mlp/down/kernel$", spec)]
  with pytest.raises(ValueError, match=r"static_groups=False, but the rules give \['layers_0/mlp/down/kernel'\] "
                     r"two-level specs .*pass static_groups=True"):
    gptq.quantize_model(m, m.params, calib, rules, batch_size=4, progress=False)
  w = np.asarray(m.params["layers_0"]["mlp"]["down"]["kernel"])
  with pytest.raises(ValueError, match=r"gptq.solve: static_groups=False with a two-level spec \(scale_bits=6"):
    gptq.solve(w, np.eye(w.shape[0], dtype=np.float32), spec)
  q, _ = gptq.solve(w, np.eye(w.shape[0], dtype=np.float32), spec, static_groups=True)
  assert q.spec.two_level
