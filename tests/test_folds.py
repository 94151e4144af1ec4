"""jquant.folds: folds derived from user models' programs, verified numerically, bad ones refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fold_models as M
from jquant import folds
from jquant.folds import Fold, FoldError
from jquant.utils import path_str

RTOL = folds.DEFAULT_RTOL


def _summary(found):
  return {(f.kind, f.name, f.consumers, f.bias, f.tie) for f in found.folds}


def _rel_change(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def _flat(params):
  return {path_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _check_exact(apply, params, x, fs):
  """All folds applied at random scales leave the float outputs unchanged to the fold tolerance."""
  flat = _flat(params)
  scales = {f.name: f.tie_stat(jnp.asarray(folds.random_scales(folds.check_fold(flat, f), 7 + i)))
            for i, f in enumerate(fs)}
  folded = folds.apply(params, fs, scales)
  change = _rel_change(apply(params, x), apply(folded, x))
  assert change < RTOL, change
  # ...and every fold really moved its weights (a no-op would pass trivially).
  new = _flat(folded)
  assert all(not np.allclose(flat[p], new[p]) for f in fs for p in f.paths())


@pytest.fixture(scope="module")
def llama():
  m = M.LinenLlama()
  tok = M.tokens(4, 12)
  return m, M.init(m, tok), tok


def test_llama_style_linen_model_gets_norm_gqa_and_mlp_folds(llama):
  m, params, tok = llama
  found = folds.derive(m, params, tok)
  b = "layers_0"
  k = lambda *n: tuple(f"{b}/{x}/kernel" for x in n)
  want = {("norm_scale", f"{b}/attn_norm", k("q", "k", "v"), None, None),
          ("linear", f"{b}/v", k("o"), None, (2, 8)),        # o reads each kv head once per query head of its group
          ("norm_scale", f"{b}/mlp_norm", k("gate", "up"), None, None),
          ("linear", f"{b}/up", k("down"), None, None)}      # silu(gate) * up is linear in up, not in gate
  got = _summary(found)
  assert want <= got and len(got) == 8
  assert {f.consumer_axes for f in found.folds if f.name == f"{b}/v"} == {((0, 1),)}  # DenseGeneral o
  assert all(r.change > 1e-3 for r in found.rejected)
  apply = lambda p, t: m.apply({"params": p}, t)
  _check_exact(apply, params, tok, found.folds)


def test_gemma_one_plus_scale_norms_and_einsum_params():
  m = M.LinenGemma()
  tok = M.tokens(2, 10)
  params = M.outliers(M.init(m, tok), ["layer_0/pre_attention_norm/scale"], one_plus=True)
  found = folds.derive(m, params, tok)
  got = {(f.kind, f.name, f.consumers, f.consumer_axes) for f in found.folds}
  for b in ("layer_0", "layer_1"):
    assert ("norm_one_plus_scale", f"{b}/pre_attention_norm", (f"{b}/q_einsum", f"{b}/kv_einsum"), ((1,), (2,))) in got
    assert ("norm_one_plus_scale", f"{b}/pre_ffw_norm", (f"{b}/gating_einsum",), ((2,),)) in got
  assert len(got) == 4  # v and up are slices of stacked parameters: no exact linear fold
  # Reading a (1 + scale) norm as x * scale is refused by the check.
  assert any(r.fold.kind == "norm_scale" and r.fold.name == "layer_0/pre_attention_norm" for r in found.rejected)
  _check_exact(lambda p, t: m.apply({"params": p}, t), params, tok, found.folds)


@pytest.mark.parametrize("act", ["none", "relu"])
def test_linear_source_bias_is_divided(act):
  """The issue's up(+bias) -> down pair: dividing the kernel but not the bias moved outputs by ~15%."""
  m = M.LinenMLP(act)
  x = jax.random.normal(jax.random.key(0), (4, 6, M.D))
  params = M.random_biases(M.init(m, x))
  apply = lambda p, t: m.apply({"params": p}, t)
  found = folds.derive(m, params, x)
  up = [f for f in found.folds if f.name == "layers_0/up"]
  assert len(up) == 1 and up[0].kind == "linear" and up[0].bias == "layers_0/up/bias"
  _check_exact(apply, params, x, found.folds)
  # The old behaviour (bias left undivided) changes the model and is refused, by name.
  no_bias = Fold("linear", "layers_0/up/kernel", ("layers_0/down/kernel",))
  s = jnp.asarray(folds.random_scales(M.F, 3))
  assert _rel_change(apply(params, x), apply(folds.apply(params, [no_bias], {no_bias.name: s}), x)) > 0.01
  with pytest.raises(FoldError, match=r"'layers_0/up'.*changes the float outputs"):
    folds.verify(m, params, (x,), [no_bias])
  assert folds.verify(m, params, (x,), up) < RTOL


def test_fold_across_gelu_is_refused():
  m = M.LinenMLP("gelu")
  x = jax.random.normal(jax.random.key(0), (4, 6, M.D))
  params = M.random_biases(M.init(m, x))
  found = folds.derive(m, params, x)
  assert [f.name for f in found.folds] == ["layers_0/norm", "layers_1/norm"]
  assert {r.fold.name for r in found.rejected if r.fold.kind == "linear"} >= {"layers_0/up", "layers_1/up"}
  bad = Fold("linear", "layers_1/up/kernel", ("layers_1/down/kernel",), bias="layers_1/up/bias")
  with pytest.raises(FoldError, match=r"fold 'layers_1/up' \(linear: .*\) changes the float outputs by"):
    folds.verify(m, params, (x,), list(found.folds) + [bad])


def test_post_norm_bert_folds_only_v_into_o():
  m = M.LinenBert()
  tok = M.tokens(2, 8)
  params = M.random_biases(M.init(m, tok))
  found = folds.derive(m, params, tok)
  assert _summary(found) == {("linear", f"layers_{i}/v", (f"layers_{i}/o/kernel",), f"layers_{i}/v/bias", None)
                             for i in range(2)}
  # The post-attention LayerNorm also feeds the residual stream: folding into it changes the model.
  ln = Fold("norm_scale", "layers_0/attn_norm/scale", ("layers_0/up/kernel",), bias="layers_0/attn_norm/bias")
  with pytest.raises(FoldError, match="layers_0/attn_norm"):
    folds.verify(m, params, (tok,), [ln])
  _check_exact(lambda p, t: m.apply({"params": p}, t), params, tok, found.folds)


def test_nnx_model():
  net = M.NNXLlama(nnx.Rngs(0))
  graphdef, state = nnx.split(net)
  tok = M.tokens(2, 8)
  found = folds.derive(net, None, tok)
  b = "layers/0"
  names = {(f.kind, f.name, f.bias) for f in found.folds}
  assert {("norm_scale", f"{b}/attn_norm", None), ("linear", f"{b}/v", None), ("norm_scale", f"{b}/mlp_norm", None),
          ("linear", f"{b}/up", None)} <= names and len(names) == 8
  _check_exact(lambda s, t: nnx.merge(graphdef, s)(t), state, tok, found.folds)


def test_model_without_blocks_is_checked_whole():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(16, name="up")(nn.LayerNorm(name="norm")(x))
      return nn.Dense(8, name="down")(jax.nn.relu(h))

  x = jax.random.normal(jax.random.key(0), (3, 8))
  params = M.random_biases(M.init(Net(), x))
  found = folds.derive(Net(), params, x)
  assert _summary(found) == {("norm_scale", "norm", ("up/kernel",), "norm/bias", None),
                             ("linear", "up", ("down/kernel",), "up/bias", None)}


def test_fold_math_matches_float64():
  """Tied N-D linear fold and a (1 + scale) norm fold, against a float64 NumPy computation."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 6))
  src = rng.normal(size=(6, 2, 3))                   # (in, kv heads, head_dim)
  bias = rng.normal(size=(2, 3))
  cons = rng.normal(size=(2, 2, 3, 4))               # (kv, copies, head_dim, out): contracted on (0, 1, 2)
  fold = Fold("linear", "src", ("cons",), bias="bias", consumer_axes=((0, 1, 2),), tie=(2, 3))

  def forward(p):
    y = np.einsum("ni,ikd->nkd", x, p["src"]) + p["bias"]
    y = np.repeat(y[:, :, None, :], 2, axis=2)      # each kv head read by 2 query heads
    return np.einsum("nkcd,kcdo->no", y, p["cons"])

  params = {"src": src, "bias": bias, "cons": cons}
  s = np.exp(rng.uniform(-1, 1, 12))
  out = folds.apply_fold({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, fold, s)
  got = forward({k: np.asarray(v, np.float64) for k, v in out.items()})
  np.testing.assert_allclose(got, forward(params), rtol=0, atol=1e-5 * np.abs(forward(params)).max())
  # The source's channels are read at each group's first copy: s is tied before use.
  np.testing.assert_allclose(np.asarray(out["cons"], np.float64) / cons,
                             np.broadcast_to(s.reshape(2, 2, 3)[:, :1, :, None], cons.shape), rtol=1e-6)

  scale = rng.normal(size=6)
  w = rng.normal(size=(6, 4))
  s = np.exp(rng.uniform(-1, 1, 6))
  f = Fold("norm_one_plus_scale", "scale", ("w",))
  p = folds.apply_fold({"scale": jnp.asarray(scale, jnp.float32), "w": jnp.asarray(w, jnp.float32)}, f, s)
  y = x * (1 + scale)
  np.testing.assert_allclose((x * (1 + np.asarray(p["scale"], np.float64))) @ np.asarray(p["w"], np.float64), y @ w,
                             rtol=0, atol=1e-5 * np.abs(y @ w).max())


def test_bad_folds_and_arguments_raise():
  with pytest.raises(ValueError, match="kind='norm'"):
    Fold("norm", "a/scale", ("b/kernel",))
  with pytest.raises(ValueError, match="consumers='b/kernel'"):
    Fold("norm_scale", "a/scale", "b/kernel")
  with pytest.raises(ValueError, match="tie="):
    Fold("norm_scale", "a/scale", ("b/kernel",), tie=(2, 4))
  params = {"a/scale": jnp.ones(4), "b/kernel": jnp.ones((4, 3)), "c/kernel": jnp.ones((5, 3))}
  with pytest.raises(FoldError, match="no parameter 'x/kernel'"):
    folds.apply_fold(params, Fold("norm_scale", "a/scale", ("x/kernel",)), jnp.ones(4))
  with pytest.raises(FoldError, match="contract different sizes"):
    folds.apply_fold(params, Fold("norm_scale", "a/scale", ("b/kernel", "c/kernel")), jnp.ones(4))
  with pytest.raises(FoldError, match=r"s has shape \(3,\); allowed: \(4,\)"):
    folds.apply_fold(params, Fold("norm_scale", "a/scale", ("b/kernel",)), jnp.ones(3))
  with pytest.raises(FoldError, match="has 4 output channels but its consumers read 5"):
    folds.apply_fold(params, Fold("norm_scale", "a/scale", ("c/kernel",)), jnp.ones(5))
  assert Fold("linear", "blk/mlp/up/kernel", ("blk/mlp/down/kernel",)).name == "blk/mlp/up"
  assert Fold("linear", "layer_0/linear", ("x",)).name == "layer_0/linear"
  with pytest.raises(ValueError, match="no inputs"):
    folds.derive(M.LinenMLP(), {"a": jnp.ones(2)})
