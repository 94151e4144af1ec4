"""Rotations (jquant.rotation) and the low-bit integer products of jquant.ops (W4A8, W4A4).

Bounds: float32 unit roundoff ``u = 2^-24``. A rotated model is the float model up to one rounding of each
rotated weight and a different summation order: a relative change of the logits of a few hundred ``u`` on
these two-block toys (`_MODEL_RTOL`). The integer paths are compared bit for bit with int64 NumPy.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fold_models as M
import jquant
from jquant import ops
from jquant.rotation import (OnlineRotation, Rotation, RotationConfig, RotationError, core, derive_plan, hadamard,
                             has_hadamard, rotate, untie_embeddings)

U = 2.0 ** -24
_MODEL_RTOL = 512 * U  # ~3e-5: two blocks of rotated weights, each rounded once to float32


# ---------------------------------------------------------------------------
# Hadamard matrices and the fast transform.


@pytest.mark.parametrize("n,p", [(1, 1), (64, 1), (12, 12), (40, 20), (576, 72), (1536, 12)])
def test_hadamard_is_exact_integer_hadamard(n, p):
  h = hadamard(n)
  assert set(np.unique(h)) <= {-1.0, 1.0}
  assert np.array_equal(h @ h.T, n * np.eye(n))  # float64 products of +-1: exact integers
  assert Rotation.hadamard(n).p == p


@pytest.mark.parametrize("n,kind", [(576, "hadamard"), (1536, "hadamard"), (64, "hadamard"), (24, "orthogonal"),
                                    (3 * 8, "hadamard"), (9 * 4, "hadamard")])
def test_fast_transform_matches_dense_orthogonal_matrix(n, kind):
  r = Rotation.random(n, seed=1, kind=kind)
  q = r.matrix()
  np.testing.assert_allclose(q @ q.T, np.eye(n), atol=64 * 2.0 ** -53 * n)
  x = np.random.default_rng(0).normal(size=(3, 5, n)).astype(np.float32)
  y = np.asarray(jax.jit(r.apply)(x), np.float64)
  ref = x.astype(np.float64) @ q
  # Each butterfly stage and the p x p factor add at most ~u * ||x|| (they are orthogonal up to scaling).
  bound = (math.log2(n) + r.p + 4) * U * np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)
  assert np.all(np.abs(y - ref) <= bound)


def test_sizes_without_construction_fall_back_or_raise():
  assert not has_hadamard(3) and not has_hadamard(9) and has_hadamard(36 * 2)
  assert Rotation.random(9, seed=0).kind == "orthogonal"
  with pytest.raises(RotationError, match=r"n=9 .*Rotation.random"):
    Rotation.hadamard(9)
  for bad in (0, -4, 2.5, True):
    with pytest.raises(RotationError, match="n="):
      Rotation.random(bad)
  with pytest.raises(RotationError, match="kind='householder'"):
    Rotation.random(8, kind="householder")
  with pytest.raises(RotationError, match=r"allowed: \(\.\.\., 8\)"):
    Rotation.hadamard(8).apply(jnp.ones((2, 6)))
  with pytest.raises(ValueError, match="kind="):
    RotationConfig(kind="spin")


def test_online_rotation_leaf_is_the_plain_product():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 96)).astype(np.float32)
  w = rng.normal(size=(96, 8)).astype(np.float32)
  r = Rotation.hadamard(96)
  leaf = OnlineRotation(core.rotate_input(jnp.asarray(w), (0,), r.matrix()), r)
  y = np.asarray(ops.qdot(jnp.asarray(x), leaf), np.float64)
  ref = x.astype(np.float64) @ w
  bound = 64 * U * np.abs(x).astype(np.float64) @ np.abs(w) + 64 * U * np.linalg.norm(x, axis=-1,
                                                                                     keepdims=True) * np.abs(w).max()
  assert np.all(np.abs(y - ref) <= bound)
  with pytest.raises(RotationError, match="96"):
    ops.qdot(jnp.ones((2, 48)), leaf)


# ---------------------------------------------------------------------------
# Whole models: the rotated float model computes the original function.


class _Gemma1Block(nn.Module):
  """Gemma 1 style: ``x * (1 + scale)`` pre-norms only, einsum parameters, GeGLU."""

  @nn.compact
  def __call__(self, x):
    t = x.shape[1]
    init = nn.initializers.normal(0.2)
    h = M.GemmaNorm(name="pre_attention_norm")(x)
    q = jnp.einsum("BTD,NDH->BTNH", h, self.param("q_einsum", init, (M.H, M.D, M.HD)))
    k = jnp.einsum("BTD,NDH->BTNH", h, self.param("k_einsum", init, (M.H, M.D, M.HD)))
    v = jnp.einsum("BTD,NDH->BTNH", h, self.param("v_einsum", init, (M.H, M.D, M.HD)))
    s = jnp.einsum("BTNH,BSNH->BTNS", q, k) / math.sqrt(M.HD)
    p = jax.nn.softmax(jnp.where(M._causal(t)[None, :, None, :], s, -1e9), axis=-1)
    o = jnp.einsum("BTNS,BSNH->BTNH", p, v)
    x = x + jnp.einsum("BTNH,NHD->BTD", o, self.param("attn_vec_einsum", init, (M.H, M.HD, M.D)))
    h = M.GemmaNorm(name="pre_ffw_norm")(x)
    gate, up = jnp.einsum("BTD,CFD->CBTF", h, self.param("gating_einsum", init, (2, M.F, M.D)))
    return x + jnp.einsum("BTF,FD->BTD", jax.nn.gelu(gate) * up, self.param("linear", init, (M.F, M.D)))


class Gemma1(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(M.V, M.D, name="embedder")(tokens) * math.sqrt(M.D)
    for i in range(2):
      x = _Gemma1Block(name=f"layer_{i}")(x)
    return nn.Dense(M.V, use_bias=False, name="head")(M.GemmaNorm(name="final_norm")(x))


class PostNorm(nn.Module):
  """One Gemma 2 style sublayer: ``x + norm(o(norm(x)))``: the post-norm's gain does not commute with Q."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(M.V, M.D, name="embed")(tokens)
    h = nn.Dense(M.D, use_bias=False, name="o")(M.GemmaNorm(name="pre_norm")(x))
    x = x + M.GemmaNorm(name="post_norm")(h)
    return nn.Dense(M.V, use_bias=False, name="head")(M.GemmaNorm(name="final_norm")(x))


def _init(model, tokens, seed=0):
  """`fold_models.init`, jitted (one compilation instead of one per op)."""
  return jax.jit(model.init)(jax.random.key(seed), tokens)["params"]


def _outputs_close(model, params, rot, tokens):
  """The rotated model's outputs, recomputed here, against the original's; and `rotate`'s own check."""
  ref = np.asarray(jax.jit(jquant.graph.as_apply(model)[0])(params, tokens), np.float64)
  out = np.asarray(jax.jit(rot.model.apply)(rot.params, tokens), np.float64)
  change = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert change <= _MODEL_RTOL and rot.change <= _MODEL_RTOL


@pytest.fixture(scope="module")
def llama():
  """A jquant Llama (GQA 4/2 heads of 12, d = 48 = 12 * 4), untied, with a residual outlier channel."""
  cfg = jquant.models.LlamaConfig(dim=48, n_heads=4, n_kv_heads=2, ffn_dim=96)
  m = untie_embeddings(jquant.models.llama_init(cfg, jax.random.key(0)))
  m.params["embed"]["embedding"] = m.params["embed"]["embedding"].at[:, 5].multiply(20.0)
  return m


@pytest.fixture(scope="module")
def llama_tokens(llama):
  return M.tokens(2, 16) % llama.config.vocab_size


@pytest.fixture(scope="module")
def rotated_llama(llama, llama_tokens):
  return rotate(llama, llama.params, llama_tokens)


def test_jquant_llama_plan_and_exact_rotation(llama, llama_tokens, rotated_llama):
  rot, plan = rotated_llama, rotated_llama.plan
  # 2 blocks: q,k,v,gate,up read a norm (plus the head after the final norm); o, down write the residual.
  assert plan.d == 48 and plan.embeddings == ("embed/embedding",)
  assert sorted(c for f in plan.norms for c in f.consumers)[-1] == "lm_head/kernel"
  assert sum(len(f.consumers) for f in plan.norms) == 11
  assert [w.path for w in plan.writers] == [f"layers_{i}/{m}/kernel" for i in (0, 1) for m in ("attn/o", "mlp/down")]
  assert [(h.fold.source, h.m) for h in plan.heads] == [(f"layers_{i}/attn/v/kernel", 12) for i in (0, 1)]
  assert [p for p, _ in plan.online] == ["layers_0/mlp/down/kernel", "layers_1/mlp/down/kernel"]
  _outputs_close(llama, llama.params, rot, llama_tokens)
  assert np.all(np.asarray(rot.params["layers_0"]["attn_norm"]["scale"]) == 1.0)  # gains folded away
  # The point of it: the residual channel 20x larger than the rest is spread over all 48 channels.
  ratio = lambda e: np.abs(e).max() / np.sqrt(np.mean(np.square(e)))
  assert ratio(np.asarray(rot.params["embed"]["embedding"])) < ratio(np.asarray(llama.params["embed"]["embedding"])) / 2


@pytest.mark.parametrize("config", [RotationConfig(residual=False), RotationConfig(kind="orthogonal", seed=3)],
                         ids=["heads-and-online", "orthogonal"])
def test_jquant_llama_partial_and_orthogonal_rotations(llama, llama_tokens, rotated_llama, config):
  rot = rotate(llama, llama.params, llama_tokens, config=config, plan=rotated_llama.plan)
  assert rot.change <= _MODEL_RTOL
  same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
  assert same(rot.params["embed"]["embedding"], llama.params["embed"]["embedding"]) == (not config.residual)
  assert not same(rot.params["layers_1"]["mlp"]["down"]["kernel"], llama.params["layers_1"]["mlp"]["down"]["kernel"])


def test_linen_llama_with_dense_general_and_einsum():
  model = M.LinenLlama()
  tokens = M.tokens(2, 16)
  params = M.outliers(_init(model, tokens), ["layers_0/attn_norm/scale", "final_norm/scale"])
  rot = rotate(model, params, tokens)
  assert len(rot.plan.heads) == 2 and len(rot.plan.online) == 2
  assert rot.change <= _MODEL_RTOL  # rotate's own check: original against rotated outputs


def test_gemma_style_one_plus_scale_norms():
  model = Gemma1()
  tokens = M.tokens(2, 16)
  params = M.outliers(_init(model, tokens), ["layer_0/pre_attention_norm/scale"], one_plus=True)
  rot = rotate(model, params, tokens)
  assert {f.kind for f in rot.plan.norms} == {"norm_one_plus_scale"}
  assert [p for p, _ in rot.plan.online] == ["layer_0/linear", "layer_1/linear"]
  assert len(rot.plan.heads) == 2 and rot.change <= _MODEL_RTOL
  assert np.all(np.asarray(rot.params["layer_0"]["pre_ffw_norm"]["scale"]) == 0.0)


def test_unsupported_models_are_refused_with_the_reason(llama):
  tokens = M.tokens(2, 8)
  tied = jquant.models.llama_init(jquant.models.LlamaConfig(dim=48, n_heads=4, n_kv_heads=2), jax.random.key(0))
  with pytest.raises(RotationError, match="untie_embeddings"):
    rotate(tied, tied.params, tokens % 256)
  post = PostNorm()  # a norm between the sublayer and the residual (Gemma 2/3's post-attention norms)
  with pytest.raises(RotationError, match="differ from the original's by"):
    rotate(post, _init(post, tokens), tokens)
  with pytest.raises(TypeError, match="RotationConfig"):
    rotate(llama, llama.params, tokens % 256, config={"residual": True})
  with pytest.raises(TypeError, match="jquant.models Llama"):
    untie_embeddings(post)


# ---------------------------------------------------------------------------
# Integer products: int4 x int4 -> int32, W4A8, W4A4.


def test_int4_matmul_is_bit_exact():
  rng = np.random.default_rng(0)
  x = rng.integers(-8, 8, size=(3, 7, 300)).astype(np.int8)
  w = rng.integers(-8, 8, size=(300, 40)).astype(np.int8)
  x[0, 0], w[:, 0] = -8, -8  # the extreme product, summed K times: 64 * 300
  got = np.asarray(jax.jit(ops.int4_matmul)(x, w))
  ref = x.astype(np.int64) @ w.astype(np.int64)
  assert got.dtype == np.int32 and np.array_equal(got, ref) and ref[0, 0, 0] == 64 * 300


@pytest.mark.parametrize("group_size", [None, 64, 128])
def test_grouped_int_matmul_is_bit_exact_per_group(group_size):
  rng = np.random.default_rng(1)
  x = rng.integers(-127, 128, size=(2, 5, 200)).astype(np.int8)
  w = rng.integers(-8, 8, size=(200, 16)).astype(np.int8)
  got = np.asarray(ops.grouped_int_matmul(jnp.asarray(x), jnp.asarray(w), group_size))
  gs = group_size or 200
  ref = np.stack([x[..., i:i + gs].astype(np.int64) @ w[i:i + gs].astype(np.int64) for i in range(0, 200, gs)],
                 axis=-2)
  assert np.array_equal(got, ref)


@pytest.mark.parametrize("act_bits", [8, 4], ids=["W4A8", "W4A4"])
@pytest.mark.parametrize("spec", [jquant.QuantSpec(bits=4, granularity="group", group_size=64, pad_groups=True),
                                  jquant.QuantSpec(bits=4, granularity="channel")], ids=["g64", "channel"])
def test_int_matmul_weight_against_float64(act_bits, spec):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 200)).astype(np.float32)
  x[..., 7] *= 30.0  # an outlier channel
  q = jquant.quantize(jnp.asarray(rng.normal(size=(200, 24)).astype(np.float32)), spec)
  y = np.asarray(jax.jit(ops.qdot)(jnp.asarray(x), ops.IntMatmulWeight(q, act_bits)), np.float64)
  xq, xs = (np.asarray(a, np.float64) for a in ops.quantize_activations_per_token(jnp.asarray(x), act_bits))
  wc, ws = np.asarray(q.codes(), np.float64), np.asarray(q.scale, np.float64)
  assert np.abs(xq).max() <= 2 ** (act_bits - 1) - 1 and -8 <= wc.min() and wc.max() <= 7
  gs = spec.group_length(200) if spec.granularity == "group" else 200
  parts = np.stack([xq[..., i:i + gs] @ wc[i:i + gs] for i in range(0, 200, gs)], axis=-2)  # exact integers
  ref = np.sum(parts * ws, axis=-2) * xs
  # float32 epilogue: each of the G products and the G - 1 sums and the final scaling round once.
  bound = (parts.shape[-2] + 3) * U * np.sum(np.abs(parts * ws), axis=-2) * xs
  assert np.all(np.abs(y - ref) <= bound)


def test_int_matmul_weight_bad_input():
  w = jnp.ones((64, 8))
  q4 = jquant.quantize(w, jquant.QuantSpec(bits=4))
  with pytest.raises(ValueError, match="act_bits"):
    ops.qdot(jnp.ones((2, 64)), ops.IntMatmulWeight(q4, 9))
  with pytest.raises(ValueError, match="symmetric"):
    ops.qdot(jnp.ones((2, 64)), ops.IntMatmulWeight(jquant.quantize(w, jquant.QuantSpec(bits=4, symmetric=False))))
  with pytest.raises(ValueError, match=r"\[-9, -9\]; allowed: \[-8, 7\]"):
    ops.int4_matmul(np.full((1, 4), -9, np.int8), np.ones((4, 2), np.int8))
  with pytest.raises(TypeError, match="float32"):
    ops.int4_matmul(np.ones((1, 4), np.float32), np.ones((4, 2), np.int8))
  with pytest.raises(ValueError, match="shapes"):
    ops.int4_matmul(np.ones((1, 4), np.int8), np.ones((5, 2), np.int8))


def test_readme_example_w4a4_through_a_rotated_model():
  """The README section's example as written: W4A4 through a rotated model, down behind its online Hadamard."""
  import os
  import re
  text = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")).read()
  m = re.search(r"^## Rotations, W4A8 and W4A4 \(`jquant.rotation`\)\n(.*?)(?=^## )", text, re.S | re.M)
  assert m, "README has no rotation section"
  (code,) = re.findall(r"```python\n(.*?)```", m.group(1), re.S)
  scope = {}
  exec(compile(code, "README rotation", "exec"), scope)
  assert scope["rot"].change <= _MODEL_RTOL
  y = np.asarray(scope["logits"])
  ref = np.asarray(jax.jit(scope["model"].apply)(scope["model"].params, scope["tokens"]))
  leaf = scope["w4a4"]["layers_0"]["mlp"]["down"]["kernel"]
  assert isinstance(leaf, ops.IntMatmulWeight) and leaf.act_bits == 4
  # A 4-bit model is not the float one, but close on this toy; NaN or a missed rotation would not be.
  assert np.all(np.isfinite(y)) and np.linalg.norm(y - ref) < 0.5 * np.linalg.norm(ref)


def test_kept_channels_stay_fixed_with_their_gain(llama, llama_tokens, rotated_llama):
  cfg = RotationConfig(keep_channels=(5,))
  rot = rotate(llama, llama.params, llama_tokens, config=cfg, plan=rotated_llama.plan)
  assert rot.change <= _MODEL_RTOL
  e0, e1 = np.asarray(llama.params["embed"]["embedding"]), np.asarray(rot.params["embed"]["embedding"])
  np.testing.assert_array_equal(e1[:, 5], e0[:, 5])  # the column is not mixed with the others
  g0, g1 = (np.asarray(p["layers_1"]["mlp_norm"]["scale"]) for p in (llama.params, rot.params))
  assert g1[5] == g0[5] and np.all(np.delete(g1, 5) == 1.0)
  with pytest.raises(RotationError, match=r"keep_channels=\(48,\)"):
    rotate(llama, llama.params, llama_tokens, config=RotationConfig(keep_channels=(48,)), plan=rotated_llama.plan)


def test_rotate_refuses_quantized_or_non_finite_params_and_an_int_keep(llama, llama_tokens):
  # Reported: both were blamed on the model's structure ("a LayerNorm, a norm after a sublayer ...").
  q = jquant.quantize_params(llama.params, [jquant.Rule("kernel$", jquant.QuantSpec(bits=4))])
  with pytest.raises(ValueError, match="params holds quantized leaves"):
    rotate(llama, q, llama_tokens)
  k = llama.params["layers_0"]["attn"]["q"]["kernel"]
  bad = {**llama.params, "layers_0": {**llama.params["layers_0"],
                                      "attn": {**llama.params["layers_0"]["attn"], "q": {"kernel": k.at[0, 0].set(jnp.nan)}}}}
  with pytest.raises(ValueError, match="layers_0/attn/q/kernel"):
    rotate(llama, bad, llama_tokens)
  with pytest.raises(TypeError, match=r"keep_channels=5; allowed: a tuple"):
    RotationConfig(keep_channels=5)
