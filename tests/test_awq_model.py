"""AWQ model pass on user-written Flax models (Linen, NNX, Gemma style) and on jquant's own models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import fold_models as M
import jquant
from jquant import awq, capture, folds, models

SPEC = jquant.QuantSpec(bits=3, granularity="group", group_size=16)
RULES = [jquant.Rule(r"layers?[_/]\d+/.*(kernel|einsum|linear)$", SPEC)]
EPS = np.finfo(np.float32).eps


def _linen(m):
  return lambda p, t: m.apply({"params": p}, t)


def _max_rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


def _layer_losses(apply, params, qparams, folded_params, x, skip=()):
  """``{kernel: ||x W - x' Q(W')||^2}`` on the calibration batch, ``x'`` the input in the folded float model."""
  _, xs = capture.capture_inputs(apply, params, x)
  _, xs_scaled = capture.capture_inputs(apply, folded_params, x)
  axes = capture.contraction_axes(apply, params, x)
  flat = lambda t: {jquant.utils.path_str(kp): v for kp, v in
                    jax.tree_util.tree_flatten_with_path(t, is_leaf=jquant.is_qarray)[0]}
  fp, fq = flat(params), flat(qparams)
  out = {}
  for path, q in fq.items():
    if isinstance(q, jquant.QArray) and path not in skip:
      w = jquant.qarray.to_matrix(fp[path], axes[path])
      wq = jquant.qarray.to_matrix(jquant.dequantize(q), axes[path])
      out[path] = float(jnp.sum(jnp.square(xs[path] @ w - xs_scaled[path] @ wq)))
  return out


@pytest.fixture(scope="module")
def llama():
  m = M.LinenLlama()
  tok = M.tokens(6, 16)
  params = M.outliers(M.init(m, tok), [f"layers_{i}/{n}/scale" for i in range(2) for n in ("attn_norm", "mlp_norm")])
  qparams, scaled = awq.quantize_model(m, params, tok, RULES, n_grid=10, batch_size=4, progress=False,
                                       return_scaled_float=True)
  folded = awq.scale_model(m, params, tok, RULES, n_grid=10, batch_size=4, clip=False, progress=False)
  return m, params, tok, qparams, scaled, folded


def test_linen_general_model_folds_exactly_and_beats_rtn(llama):
  m, params, tok, qparams, scaled, folded = llama
  apply = _linen(m)
  # Norm -> q/k/v, norm -> gate/up and up -> down are scaled; v -> o is tied under GQA and skipped by default.
  assert {(r.block, r.group) for r in scaled.reports} == {
      (f"layers_{i}", g) for i in range(2) for g in ("attn_norm", "mlp_norm", "up")}
  assert any(f.name == "layers_0/v" for f in scaled.folds) is False
  for r in scaled.reports:  # alpha = 0 (RTN) is a candidate: a group's error never exceeds RTN's
    assert r.error <= r.rtn_error and 0.0 <= r.alpha < 1.0
  assert any(r.alpha > 0 and r.error < 0.9 * r.rtn_error for r in scaled.reports if r.group == "attn_norm")
  # Every kernel of the blocks is packed, N-D ones along the axes their own ops contract.
  q = qparams["layers_0"]
  assert q["o"]["kernel"].shape == (M.H, M.HD, M.D) and q["o"]["kernel"].axis_shape == (M.H, M.HD)
  assert all(isinstance(q[n]["kernel"], jquant.QArray) and q[n]["kernel"].bits == 3
             for n in ("q", "k", "v", "o", "gate", "up", "down"))
  # The packed tree runs in the unmodified model and equals the float model on the dequantized weights.
  packed = jax.jit(jquant.quantized(apply))(qparams, tok)
  deq = apply(jquant.dequantize_params(qparams), tok)
  assert _max_rel(deq, packed) < 1e-5
  # AWQ's layer losses (input x / s against the scaled, clipped, quantized kernel) beat RTN's. Fold
  # sources (up: its outputs are divided by the next scales) are compared through their consumers.
  rtn = jquant.quantize_params(params, RULES, axes=scaled.axes)
  sources = {f.source for f in scaled.folds if f.kind == "linear"}
  l_rtn = _layer_losses(apply, params, rtn, params, tok, sources)
  l_awq = _layer_losses(apply, params, qparams, folded.params, tok, sources)
  assert len(l_awq) == 12 and sum(l_awq.values()) < 0.7 * sum(l_rtn.values())
  assert l_awq["layers_1/down/kernel"] < l_rtn["layers_1/down/kernel"]
  ref = apply(params, tok)
  mse = lambda p: float(jnp.mean(jnp.square(jquant.quantized(apply)(p, tok) - ref)))
  assert mse(qparams) < 0.7 * mse(rtn)


def test_folding_is_exact_and_queries_keys_are_not_clipped(llama):
  m, params, tok, _, clipped, scaled = llama
  apply = _linen(m)
  ref = apply(params, tok)
  # One float32 rounding per folded weight, amplified by two blocks: 64 ulp of the output scale.
  assert float(jnp.max(jnp.abs(apply(scaled.params, tok) - ref))) < 64 * EPS * float(jnp.max(jnp.abs(ref)))
  assert not np.allclose(scaled.params["layers_0"]["attn_norm"]["scale"], params["layers_0"]["attn_norm"]["scale"])
  # Clipping skips the layers whose outputs meet in attention scores (q, k), read from the program.
  for n in ("q", "k"):
    np.testing.assert_array_equal(clipped.params["layers_1"][n]["kernel"], scaled.params["layers_1"][n]["kernel"])
  for n in ("v", "o", "gate", "up", "down"):
    assert not np.array_equal(clipped.params["layers_1"][n]["kernel"], scaled.params["layers_1"][n]["kernel"])


def test_gemma_style_one_plus_scale_norms():
  m = M.LinenGemma()
  tok = M.tokens(4, 12)
  params = M.outliers(M.init(m, tok), [f"layer_{i}/pre_attention_norm/scale" for i in range(2)], one_plus=True)
  apply = _linen(m)
  qparams, scaled = awq.quantize_model(m, params, tok, RULES, n_grid=8, clip=False, progress=False,
                                       return_scaled_float=True)
  assert {f.kind for f in scaled.folds} == {"norm_one_plus_scale"}
  assert {r.group for r in scaled.reports} == {"pre_attention_norm", "pre_ffw_norm"}
  ref = apply(params, tok)
  assert float(jnp.max(jnp.abs(apply(scaled.params, tok) - ref))) < 64 * EPS * float(jnp.max(jnp.abs(ref)))
  assert isinstance(qparams["layer_0"]["kv_einsum"], jquant.QArray)
  rtn = jquant.quantize_params(params, RULES, axes=scaled.axes)
  mse = lambda p: float(jnp.mean(jnp.square(jquant.quantized(apply)(p, tok) - ref)))
  assert mse(qparams) < mse(rtn)


def test_nnx_model_end_to_end():
  net = M.NNXLlama(nnx.Rngs(0))
  graphdef, state = nnx.split(net)
  tok = M.tokens(4, 12)
  apply = lambda s, t: nnx.merge(graphdef, s)(t)
  rules = [jquant.Rule(r"layers/\d+/\w+/kernel", SPEC)]
  qstate, scaled = awq.quantize_model(net, None, tok, rules, n_grid=8, progress=False, return_scaled_float=True)
  # Multi-head attention: v -> o is an ordinary fold here.
  assert {r.group for r in scaled.reports} == {"attn_norm", "v", "mlp_norm", "up"}
  assert isinstance(qstate["layers"][0]["down"]["kernel"].value, jquant.QArray)
  ref = apply(state, tok)
  out = jax.jit(jquant.quantized(apply))(qstate, tok)
  rtn = jquant.quantize_params(state, rules)
  assert float(jnp.mean(jnp.square(out - ref))) < float(jnp.mean(jnp.square(jquant.quantized(apply)(rtn, tok) - ref)))


def test_jquant_models_take_the_same_path():
  rules = [jquant.Rule(r"(attn|mlp)/\w+/kernel$", SPEC)]
  m = models.llama_init(models.LlamaConfig(n_heads=4, n_kv_heads=2), jax.random.key(0))
  tok = jax.random.randint(jax.random.key(1), (4, 16), 0, m.config.vocab_size)
  scaled = awq.scale_model(m, m.params, tok, rules, n_grid=4, clip=False, tied_folds=True, progress=False)
  assert {r.group for r in scaled.reports} == {"attn_norm", "attn/v", "mlp_norm", "mlp/up"}
  assert next(f for f in scaled.folds if f.name == "layers_0/attn/v").tie == (2, 16)  # GQA: 2 query heads per kv head
  ref = m.apply(m.params, tok)
  assert float(jnp.max(jnp.abs(m.apply(scaled.params, tok) - ref))) < 64 * EPS * float(jnp.max(jnp.abs(ref)))

  bert = models.bert_init(models.BertConfig(), jax.random.key(6))
  tok = jax.random.randint(jax.random.key(7), (4, 16), 0, bert.config.vocab_size)
  q, scaled = awq.quantize_model(bert, None, tok, rules, n_grid=4, clip=False, progress=False,
                                 return_scaled_float=True)
  # Post-LayerNorm: only v -> o (with v's bias) is exact; up -> down across the GELU is refused.
  assert {f.name.split("/", 1)[1] for f in scaled.folds} == {"attn/v"}
  assert all(f.bias.endswith("attn/v/bias") for f in scaled.folds)
  assert any(r.fold.name == "layers_0/mlp/up" for r in scaled.rejected)
  assert isinstance(q["layers_1"]["mlp"]["down"]["kernel"], jquant.QArray)


def test_options_uneven_batches_and_zero_channels(llama):
  m, params, tok, _, _, _ = llama
  p = jax.tree_util.tree_map(lambda a: a, params)
  p["layers_0"]["attn_norm"]["scale"] = p["layers_0"]["attn_norm"]["scale"].at[0:5].set(0.0)  # dead channels
  p["layers_0"]["up"]["kernel"] = p["layers_0"]["up"]["kernel"].at[:, :8].set(0.0)            # dead down inputs
  toks = M.tokens(7, 16)
  q, scaled = awq.quantize_model(m, p, toks, RULES, n_grid=4, batch_size=3, score_windows=4, propagate="quantized",
                                 skip_positions=1, variant="both", progress=False, return_scaled_float=True)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(scaled.params))
  assert all(np.isfinite(r.error) for r in scaled.reports)
  assert bool(jnp.all(jnp.isfinite(jquant.quantized(_linen(m))(q, toks))))
  # A list of batches of different shapes runs too (one traced program per shape).
  calib = [(toks[:4],), (toks[4:, :10],)]
  s2 = awq.scale_model(m, p, calib, RULES, n_grid=4, clip=False, score_windows=2, progress=False)
  assert len(s2.reports) == 6


def test_given_folds_rules_and_errors(llama):
  m, params, tok, _, scaled, _ = llama
  rules = [jquant.Rule(r"/down/", None), jquant.Rule(r"layers_\d+/(gate|up)/kernel", SPEC)]
  s = awq.scale_model(m, params, tok, rules, n_grid=4, clip=False, progress=False)
  assert {r.group for r in s.reports} == {"mlp_norm"}  # attention unquantized, down float
  # Folds passed by the user are verified; an inexact one is refused by name.
  s = awq.scale_model(m, params, tok, rules, folds=[f for f in scaled.folds if "mlp_norm" in f.name], n_grid=4,
                      clip=False, progress=False)
  assert {r.group for r in s.reports} == {"mlp_norm"}
  bad = folds.Fold("linear", "layers_0/gate/kernel", ("layers_0/down/kernel",))
  with pytest.raises(folds.FoldError, match=r"'layers_0/gate'.*changes the float outputs"):
    awq.scale_model(m, params, tok, RULES, folds=[bad], progress=False)
  odd = folds.Fold("norm_scale", "layers_0/mlp_norm/scale", ("layers_0/up/kernel",))
  with pytest.raises(folds.FoldError, match="not one group of matmuls sharing an input"):
    awq.scale_model(m, params, tok, RULES, folds=[odd], progress=False)
  with pytest.raises(TypeError, match="unknown options"):
    awq.scale_model(m, params, tok, RULES, n_grids=4)
  with pytest.raises(ValueError, match="variant"):
    awq.AWQConfig(variant="weights")
  with pytest.raises(ValueError, match="calibration data is empty"):
    awq.scale_model(m, params, [], RULES)
  with pytest.raises(TypeError, match="already quantized"):
    awq.scale_model(m, jquant.quantize_params(params, RULES, axes=scaled.axes), tok, RULES)
  # Reviewed: a rule matching no parameter (a typo) left weights float without a word.
  with pytest.raises(ValueError, match=rf"awq.scale_model: rules\[{len(RULES)}\] \(pattern 'attn/q_proj', nearest "
                                       r"paths \[.*\]\) matches no parameter"):
    awq.scale_model(m, params, tok, RULES + [jquant.Rule("attn/q_proj", SPEC)], progress=False)
  with pytest.raises(ValueError, match="awq.scale_model: rules is empty"):  # returned the float tree
    awq.quantize_model(m, params, tok, [], progress=False)


class _SqrtBlock(nn.Module):
  """``x + down(sqrt(up(x)))``: finite weights and inputs, NaN activations where ``up(x) < 0``."""

  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(x.shape[-1], name="down")(jnp.sqrt(nn.Dense(16, name="up")(x)))


class _SqrtNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = _SqrtBlock(name=f"layers_{i}")(x)
    return x


def test_non_finite_weights_inputs_and_activations_are_named(llama):
  m, params, tok, _, _, _ = llama
  p = jax.tree_util.tree_map(lambda a: a, params)
  p["layers_1"]["up"]["kernel"] = p["layers_1"]["up"]["kernel"].at[2, 3].set(jnp.nan)
  with pytest.raises(ValueError, match=r"awq\.scale_model: params hold non-finite .* at "
                                       r"layers_1/up/kernel \(1 value\)"):
    awq.quantize_model(m, p, tok, RULES, progress=False)
  # Activation statistics are checked as soon as a block computes them, naming the block's layers.
  x = jax.random.normal(jax.random.key(0), (4, 8, 16))
  net = _SqrtNet()
  q_params = net.init(jax.random.key(1), x)["params"]
  with pytest.raises(ValueError, match=r"statistics \(mean \|x\|\) of block 'layers_0' hold non-finite .* at "
                                       r"layers_0/down/kernel"):
    awq.quantize_model(net, q_params, x, [jquant.Rule(r"kernel$", SPEC)], n_grid=4, progress=False)
  with pytest.raises(ValueError, match=r"awq\.scale_model: the calibration inputs hold non-finite .* at "
                                       r"calib \(1 value\)"):
    awq.scale_model(net, q_params, x.at[1, 2, 3].set(jnp.inf), [jquant.Rule(r"kernel$", SPEC)], progress=False)
