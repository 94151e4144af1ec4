"""GPTQ model pass on a two-block toy Llama (jquant's own model, through the same generic path as any model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import gptq, models

SPEC = jquant.QuantSpec(bits=3, granularity="group", group_size=32)
RULES = [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel$", SPEC)]


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
  qparams, _ = single
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
