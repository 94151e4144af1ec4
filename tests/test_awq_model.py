"""AWQ model pass on two-block toy Llama models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import awq, models

SPEC = jquant.QuantSpec(bits=3, granularity="group", group_size=32)
RULES = [jquant.Rule(r"(attn|mlp)/\w+/kernel$", SPEC)]


def _toy(n_kv_heads, seed=0):
  """A two-block toy whose norms plant outlier input channels (as trained LLMs have)."""
  cfg = models.LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=128)
  m = models.llama_init(cfg, jax.random.key(seed))
  params = dict(m.params)
  for i, name in enumerate(m.block_names):
    bp = dict(params[name])
    bp["attn_norm"] = {"scale": bp["attn_norm"]["scale"].at[3 + i].set(25.0).at[40].set(12.0)}
    bp["mlp_norm"] = {"scale": bp["mlp_norm"]["scale"].at[7].set(20.0)}
    params[name] = bp
  return models.Model(cfg, params)


@pytest.fixture(scope="module")
def mha():
  m = _toy(n_kv_heads=4)
  calib = jax.random.randint(jax.random.key(1), (4, 32), 0, m.config.vocab_size)
  return m, calib


def _logit_mse(m, params, ref, tokens):
  return float(jnp.mean(jnp.square(m.apply(params, tokens) - ref)))


def test_folding_leaves_float_outputs_unchanged(mha):
  m, calib = mha
  scaled = awq.scale_model(m, m.params, calib, RULES, clip=False, progress=False)
  # The folds really moved weights: scales far from 1 went into norms, v and up.
  s = scaled.scales["layers_0/attn_in"]
  assert float(s.max() / s.min()) > 1.5
  assert not np.allclose(scaled.params["layers_0"]["attn_norm"]["scale"], m.params["layers_0"]["attn_norm"]["scale"])
  assert {"layers_0/attn_in", "layers_0/attn_out", "layers_0/mlp_in", "layers_0/mlp_out"} <= set(scaled.scales)
  ref = m.apply(m.params, calib)
  got = m.apply(scaled.params, calib)
  # Each fold adds one float32 rounding (relative 2^-24) per weight; a two-block net amplifies it by
  # at most a small factor: 64 eps of the logits' scale is a loose, math-derived bound.
  tol = 64 * np.finfo(np.float32).eps * float(jnp.abs(ref).max())
  assert float(jnp.abs(got - ref).max()) < tol


def test_model_pass_two_blocks_beats_rtn_and_packs_every_kernel(mha):
  m, calib = mha
  qparams, scaled = awq.quantize_model(m, m.params, calib, RULES, n_grid=20, progress=False,
                                       return_scaled_float=True)
  for name in m.block_names:
    for path in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"):
      leaf = qparams[name][path.split("/")[0]][path.split("/")[1]]["kernel"]
      assert isinstance(leaf, jquant.QArray) and leaf.bits == 3
  assert {(r.block, r.group) for r in scaled.reports} == {
      (b, g) for b in m.block_names for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
  for r in scaled.reports:  # alpha = 0 is RTN and is a candidate: the search never loses to it
    assert r.error <= r.rtn_error and 0.0 <= r.alpha < 1.0
  assert any(r.alpha > 0 for r in scaled.reports if r.group == "attn_in")
  ref = m.apply(m.params, calib)
  rtn = _logit_mse(m, jquant.quantize_params(m.params, RULES), ref, calib)
  got = _logit_mse(m, qparams, ref, calib)
  assert np.isfinite(got) and got < 0.8 * rtn


def test_gqa_skips_v_to_o_and_other_options_run():
  m = _toy(n_kv_heads=2, seed=3)
  calib = jax.random.randint(jax.random.key(2), (4, 32), 0, m.config.vocab_size)
  scaled = awq.scale_model(m, m.params, calib, RULES, progress=False, propagate="quantized", skip_positions=1,
                           variant="both", score_windows=2, clip=False)
  assert {r.group for r in scaled.reports} == {"attn_in", "mlp_in", "mlp_out"}
  assert all(np.all(np.isfinite(s)) for s in scaled.scales.values())
  ref = m.apply(m.params, calib)
  np.testing.assert_allclose(m.apply(scaled.params, calib), ref, atol=64 * 1.2e-7 * float(jnp.abs(ref).max()))


def test_zero_channel_model_stays_finite(mha):
  m, calib = mha
  params = dict(m.params)
  bp = dict(params["layers_0"])
  bp["attn_norm"] = {"scale": bp["attn_norm"]["scale"].at[0:5].set(0.0)}  # five dead input channels
  bp["mlp"] = dict(bp["mlp"], up={"kernel": bp["mlp"]["up"]["kernel"].at[:, :32].set(0.0)})  # dead down inputs
  params["layers_0"] = bp
  qparams, scaled = awq.quantize_model(m, params, calib, RULES, progress=False, return_scaled_float=True)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(scaled.params))
  assert bool(jnp.all(jnp.isfinite(m.apply(qparams, calib))))


def test_rules_leave_layers_float_and_bad_options_raise(mha):
  m, calib = mha
  rules = [jquant.Rule(r"mlp/down", None), jquant.Rule(r"mlp/\w+/kernel$", SPEC)]
  scaled = awq.scale_model(m, m.params, calib, rules, progress=False, clip=False)
  assert {r.group for r in scaled.reports} == {"mlp_in"}  # attention unquantized, down float
  with pytest.raises(TypeError, match="unknown options"):
    awq.scale_model(m, m.params, calib, rules, n_grids=4)
  with pytest.raises(ValueError, match="variant"):
    awq.AWQConfig(variant="weights")
  with pytest.raises(ValueError, match="calib_windows"):
    awq.scale_model(m, m.params, calib.astype(jnp.float32), rules)


def test_bert_folds_v_into_o_exactly_and_quantizes():
  m = models.bert_init(models.BertConfig(), jax.random.key(6))
  params = dict(m.params)
  bp = dict(params["layers_0"])
  # Outlier channels entering o: scale some of v's output columns up.
  bp["attn"] = dict(bp["attn"], v={"kernel": bp["attn"]["v"]["kernel"].at[:, 5].multiply(30.0),
                                   "bias": bp["attn"]["v"]["bias"].at[5].set(2.0)})
  params["layers_0"] = bp
  tokens = jax.random.randint(jax.random.key(7), (4, 16), 0, m.config.vocab_size)
  q, scaled = awq.quantize_model(m, params, tokens, RULES, clip=False, progress=False, return_scaled_float=True)
  assert {(r.block, r.group) for r in scaled.reports} == {(b, "attn_out") for b in m.block_names}
  assert float(scaled.scales["layers_0/attn_out"][5]) > 1.0
  ref = m.apply(params, tokens)
  tol = 64 * np.finfo(np.float32).eps * float(jnp.abs(ref).max())
  assert float(jnp.abs(m.apply(scaled.params, tokens) - ref).max()) < tol
  assert isinstance(q["layers_1"]["mlp"]["down"]["kernel"], jquant.QArray)
  assert bool(jnp.all(jnp.isfinite(m.embed(q, tokens))))
