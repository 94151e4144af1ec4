"""llama.cpp's CPU matmul arithmetic (`jquant.gguf.arith`): activation quantization bit for bit, products, models."""

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jquant
from jquant import models
from jquant.capture import capture_inputs
from jquant.gguf import arith
from jquant.intercept import as_matrix, dequantize_leaf

_F32 = np.float32


def _bits(a):
  return np.asarray(a, np.float32).view(np.int32)


def _acts(shape, seed=0):
  """Activations with per-row magnitudes over several decades, an all-zero block and exact ties."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * np.exp(2 * rng.standard_normal(shape[:-1] + (1,)))).astype(_F32)
  x[0, :32] = 0.0
  # amax 127 -> d = 1, id = 1: x * id lands exactly on halves (roundf and half-to-even disagree on 0.5, -2.5).
  x[1, :32] = np.array([127.0, 0.5, 1.5, -2.5, 3.5, -0.5] + [4.5] * 26, _F32)
  return x


# ---------------------------------------------------------------------------
# Independent float32 NumPy transcriptions of ggml's activation quantizers.


def _np_q8_0(x, impl):
  """quantize_row_q8_0_ref (impl "ref"), the x86 AVX path and the NEON path, per block of 32: values fp16(d) q."""
  out = np.empty_like(x)
  for r, row in enumerate(x.reshape(-1, 32)):
    amax = _F32(np.max(np.abs(row)))
    d = _F32(amax / _F32(127))
    if impl == "x86":
      inv = _F32(_F32(127) / amax) if amax != 0 else _F32(0)
    else:
      inv = _F32(_F32(1) / d) if d != 0 else _F32(0)
    t = (row * inv).astype(_F32)
    q = np.sign(t) * np.floor(np.abs(t.astype(np.float64)) + 0.5) if impl == "ref" else np.rint(t)
    out.reshape(-1, 32)[r] = _F32(np.float16(d)) * q.astype(np.int8).astype(_F32)   # int8 codes: no -0.0
  return out


def _nearest_int(fval):
  val = np.array([_F32(fval) + _F32(12582912.0)], _F32)
  return int((val.view(np.int32)[0] & 0x007FFFFF) - 0x00400000)


def _np_q8_k(x):
  """quantize_row_q8_K_ref, element by element: values d * q with d = 1 / iscale."""
  out = np.empty_like(x)
  for b, blk in enumerate(x.reshape(-1, 256)):
    mx, amax = _F32(0), _F32(0)
    for v in blk:
      if abs(v) > amax:
        amax, mx = _F32(abs(v)), v
    if not amax:
      out.reshape(-1, 256)[b] = 0
      continue
    iscale = _F32(_F32(-127.0) / mx)
    q = np.array([min(127, _nearest_int(_F32(iscale * v))) for v in blk], _F32)
    out.reshape(-1, 256)[b] = _F32(_F32(1) / iscale) * q
  return out


# ---------------------------------------------------------------------------
# Activation quantization.


@pytest.mark.parametrize("vdt", ["Q8_0", "Q8_1"])
def test_q8_0_bit_exact_vs_gguf_package(vdt):
  x = _acts((6, 128))
  t = gguf.GGMLQuantizationType.Q8_0
  want = gguf.quants.dequantize(gguf.quants.quantize(x, t), t).astype(_F32)
  np.testing.assert_array_equal(_bits(arith.quantize_activations(x, vdt, impl="ref")), _bits(want))
  np.testing.assert_array_equal(_bits(jax.jit(lambda a: arith.quantize_activations(a, vdt, impl="ref"))(x)),
                                _bits(want))
  assert np.all(want[0, :32] == 0) and want[1, 1] == 1.0  # all-zero block; roundf(0.5) = 1


@pytest.mark.parametrize("impl", ["ref", "x86", "arm"])
def test_q8_0_impls_bit_exact_vs_numpy(impl):
  x = _acts((4, 96), seed=1)
  want = _np_q8_0(x, impl)
  got = jax.jit(lambda a: arith.quantize_activations(a, "Q8_0", impl=impl))(x)
  np.testing.assert_array_equal(_bits(got), _bits(want))
  # The ties: half away from zero (ref) or half to even (x86, arm).
  assert want[1, 1:6].tolist() == ([1, 2, -3, 4, -1] if impl == "ref" else [0, 2, -2, 4, -0.0])


def test_q8_k_bit_exact_vs_numpy_transcription():
  rng = np.random.default_rng(2)
  x = (rng.standard_normal((2, 768)) * np.array([[0.01], [30.0]])).astype(_F32)
  x[0, :256] = 0                                    # an all-zero block
  x[0, 300] = -5.0                                  # a negative max
  x[1, 256:512] = np.linspace(-10, 10, 256).astype(_F32)
  x[1, 256] = -x[1, 511]                            # +a and -a tie for the largest magnitude: the first wins
  x[1, 600:610] = (np.arange(10) + 0.5) * (x[1].max() / 127)   # near-ties of iscale * x
  want = _np_q8_k(x)
  np.testing.assert_array_equal(_bits(arith.quantize_activations(x, "Q8_K")), _bits(want))
  np.testing.assert_array_equal(_bits(jax.jit(lambda a: arith.quantize_activations(a, "Q8_K"))(x)), _bits(want))
  assert np.all(want[0, :256] == 0)
  # Q8_K's values do not depend on the build (impl only concerns Q8_0/Q8_1).
  np.testing.assert_array_equal(_bits(arith.quantize_activations(x, "Q8_K", impl="ref")), _bits(want))


def test_float_vec_dot_types():
  x = _acts((2, 64), seed=3) * _F32(7)
  np.testing.assert_array_equal(np.asarray(arith.quantize_activations(x, "F16")), x.astype(np.float16).astype(_F32))
  np.testing.assert_array_equal(np.asarray(arith.quantize_activations(x, "BF16")),
                                x.astype(ml_dtypes.bfloat16).astype(_F32))
  np.testing.assert_array_equal(np.asarray(arith.quantize_activations(x, "F32")), x)


def test_non_finite_blocks_stay_non_finite():
  x = _acts((2, 256), seed=4)
  x[0, 3] = np.nan
  x[1, 7] = np.inf
  for vdt in ("Q8_0", "Q8_K"):
    got = np.asarray(arith.quantize_activations(x, vdt))
    assert not np.isfinite(got[0, 3]) and not np.isfinite(got[1, 7]), vdt


def test_activation_errors():
  with pytest.raises(ValueError, match=r"not a multiple of Q8_K's 256-value blocks"):
    arith.quantize_activations(jnp.ones((2, 576)), "Q8_K")
  with pytest.raises(ValueError, match=r"not a multiple of Q8_0's 32-value blocks"):
    arith.quantize_activations(jnp.ones((3, 40)), "Q8_0")
  with pytest.raises(ValueError, match=r"vec_dot_type='Q4_K'; allowed: F32, F16, BF16, Q8_0, Q8_1, Q8_K"):
    arith.quantize_activations(jnp.ones((1, 32)), "Q4_K")
  with pytest.raises(ValueError, match=r"impl='avx'; allowed"):
    arith.quantize_activations(jnp.ones((1, 32)), "Q8_0", impl="avx")
  with pytest.raises(TypeError, match="floating dtype"):
    arith.quantize_activations(jnp.ones((1, 32), jnp.int32), "Q8_0")
  with pytest.raises(ValueError, match="allowed: a QArray on a GGML grid"):
    arith.GGMLWeight("w", "Q8_0")


# ---------------------------------------------------------------------------
# The product.

_U = 2.0 ** -24


def _qarray(wtype, w, axis=0):
  """``w`` ((K, N) for axis 0, (rows, K) for axis -1) as a packed QArray of ``wtype``, without compiling a solver.

  One-level types: the gguf package's quantizer (llama.cpp's reference, NumPy). Q4_K: random codes, group scale
  and min codes and float16 super-scales of ``w``'s magnitude (any Q4_K tensor llama.cpp can hold).
  """
  rows_k = np.ascontiguousarray(w.T if axis == 0 else w)
  if wtype == "Q4_K":
    rng = np.random.default_rng(rows_k.shape[0])
    r, k = rows_k.shape
    d = np.float16(np.abs(rows_k).max() / (63 * 15))
    b = jquant.gguf.blocks.Blocks(rng.integers(0, 16, (r, k)).astype(np.int32),
                                  rng.integers(0, 64, (r, k // 32)).astype(np.int32),
                                  rng.integers(0, 64, (r, k // 32)).astype(np.int32),
                                  np.full((r, k // 256), d, np.float16), np.full((r, k // 256), d * 4, np.float16))
  else:
    b = jquant.gguf.blocks.decode(wtype, gguf.quants.quantize(rows_k, getattr(gguf.GGMLQuantizationType, wtype)))
  return jquant.gguf.blocks.to_qarray(wtype, b, axis=axis)


@pytest.mark.parametrize("wtype", ["Q4_0", "Q8_0", "Q4_K", "F16"])
def test_product_matches_float64_reference(wtype):
  rng = np.random.default_rng(5)
  w = rng.standard_normal((256, 256)).astype(_F32) * 0.05   # the toy model's kernel shape: compiled once
  x = _acts((5, 256), seed=6)
  if wtype == "F16":
    wq, wd = w.astype(np.float16), w.astype(np.float16).astype(np.float64)
  else:
    wq = _qarray(wtype, w)
    wd = np.asarray(jquant.dequantize(wq), np.float64)
  vdt = arith.VEC_DOT_TYPE[wtype]
  g = arith.GGMLWeight(wq, vdt)
  got = np.asarray(jax.jit(jquant.ops.qdot)(x, g), np.float64)
  xa = np.asarray(arith.quantize_activations(x, vdt), np.float64)
  want = xa @ wd
  bound = (256 + 2) * _U * (np.abs(xa) @ np.abs(wd))     # float32 summation of K products
  assert np.all(np.abs(got - want) <= bound)
  assert np.max(np.abs(want - x.astype(np.float64) @ wd)) > 0   # the activations were quantized


@pytest.mark.parametrize("wtype", ["Q4_1", "Q5_1"])
def test_q8_1_min_term_uses_fp16_block_sums(wtype):
  """Q4_1/Q5_1 x Q8_1: d_w d_a sum(q_w q_a) + m s_a with s_a = fp16(d_a sum(q_a)) (ggml_vec_dot_q4_1_q8_1)."""
  rng = np.random.default_rng(7)
  k, n = 256, 16
  w = (rng.standard_normal((k, n)) * 0.05 + 0.02).astype(_F32)
  x = _acts((3, k), seed=8)
  wq = _qarray(wtype, w)
  codes = np.asarray(wq.codes(), np.float64)
  scale, zmin = (np.asarray(a, np.float64) for a in wq.group_params())        # value = scale q - zmin, (G, N)
  g = k // 32
  # Q8_1 of x from the gguf package (values, codes and d); s in float32 then float16, as ggml stores it.
  xb = x.reshape(3, g, 32)
  amax = np.max(np.abs(xb), axis=-1)
  d = (amax / _F32(127)).astype(_F32)
  xa = gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                              gguf.GGMLQuantizationType.Q8_0).astype(np.float64).reshape(3, g, 32)
  d16 = d.astype(np.float16).astype(np.float64)
  qa = np.where(d16[..., None] > 0, xa / np.where(d16 > 0, d16, 1)[..., None], 0)
  s = (d * qa.sum(-1).astype(_F32)).astype(np.float16).astype(np.float64)          # (3, G)
  cw = codes.reshape(g, 32, n)
  want = (np.einsum("bgj,gjn->bn", xa, cw * scale[:, None, :]) - s @ zmin)
  got = np.asarray(jquant.ops.qdot(x, arith.GGMLWeight(wq, "Q8_1", impl="ref")), np.float64)
  wd = np.asarray(jquant.dequantize(wq), np.float64)
  bound = (k + 4) * _U * (np.abs(xa.reshape(3, k)) @ np.abs(wd) + np.abs(s) @ np.abs(zmin))
  assert np.all(np.abs(got - want) <= bound)
  plain = xa.reshape(3, k) @ wd                       # without llama.cpp's fp16 block sums
  assert np.max(np.abs(plain - want)) > np.max(bound)


def test_product_errors():
  with pytest.raises(ValueError, match="x has 256 values along its last axis, the weight 512"):
    jquant.ops.qdot(jnp.ones((2, 256)), arith.GGMLWeight(jnp.ones((512, 4)), "Q8_K"))
  with pytest.raises(ValueError, match="weight must be 2-D"):
    jquant.ops.qdot(jnp.ones((2, 8)), arith.GGMLWeight(jnp.ones((8, 2, 2)), "F16"))


# ---------------------------------------------------------------------------
# Models.

_CFG = models.LlamaConfig(vocab_size=64, dim=256, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=256)
_TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 8)), jnp.int32)


@pytest.fixture(scope="module")
def toy():
  return models.llama_init(_CFG, jax.random.key(0))


def _block_amax(x, block):
  xb = np.abs(np.asarray(x, np.float64)).reshape(x.shape[:-1] + (-1, block))
  return np.repeat(xb.max(-1), block, axis=-1)


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def test_toy_llama_exported_and_loaded(toy, tmp_path):
  """A toy Llama exported with Q4_0 (embedding/tied head, attention) and Q4_K (MLP) tensors, loaded back packed."""
  path = tmp_path / "toy.gguf"
  qparams = jax.tree_util.tree_map_with_path(
      lambda kp, w: w if w.ndim == 1 else _qarray("Q4_K" if "mlp" in jax.tree_util.keystr(kp) else "Q4_0",
                                                  np.asarray(w), -1 if w.shape[0] == 64 else 0), toy.params)
  jquant.gguf.export(path, qparams, like=toy)
  packed = jquant.gguf.load(path, tokenizer=False)
  types = jquant.gguf.tensor_types(path)
  assert types["embed/embedding"] == "Q4_0" and types["layers_0/mlp/down/kernel"] == "Q4_K"
  lp = jquant.gguf.llamacpp_params(packed.params, types=types)
  assert lp["embed"]["embedding"].vec_dot_type == "Q8_0"  # the tied head too
  assert lp["layers_0"]["mlp"]["up"]["kernel"].vec_dot_type == "Q8_K"
  assert isinstance(lp["final_norm"]["scale"], jax.Array)

  @jax.jit
  def run(params, lparams, tokens):
    # The logits with float activations and with llama.cpp's, and each matmul of the llama.cpp run (the tied
    # head included) on the inputs it saw, by llama.cpp's arithmetic.
    logits, xs = capture_inputs(packed.module.apply, {"params": lparams}, tokens)
    ys = {}
    for p, x in xs.items():
      mat = as_matrix(_get(lparams, p), (1,) if p == "embed/embedding" else (0,))[0]
      ys[p] = jquant.ops.qdot(x.reshape(-1, x.shape[-1]), mat)
    return packed.apply(params, tokens), logits, xs, ys

  base, pred, xs, ys = jax.tree_util.tree_map(np.asarray, run(packed.params, lp, _TOKENS))
  assert np.all(np.isfinite(pred)) and np.max(np.abs(pred - base)) > 0
  assert np.max(np.abs(pred - base)) < 0.1 * np.max(np.abs(base))
  # |y_llama - x W| is at most what the activation error allows, |x - x_a| <= amax_block (1/254 + 2^-10)
  # (Q8_0: half a step of d = amax/127 plus d's float16 rounding over |q| <= 127; Q8_K: half a step), plus
  # float32 rounding.
  assert "embed/embedding" in xs and len(xs) == 8
  for p, x in xs.items():
    mat = as_matrix(_get(lp, p), (1,) if p == "embed/embedding" else (0,))[0]
    block = arith.BLOCK[mat.vec_dot_type]
    wd = np.asarray(dequantize_leaf(mat), np.float64)
    x64 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    got, exact = np.asarray(ys[p], np.float64), x64 @ wd
    err = _block_amax(x64, block) * (1 / 254 + 2.0 ** -10)
    bound = err @ np.abs(wd) + (x64.shape[-1] + 2) * _U * 2 * (np.abs(x64) @ np.abs(wd))
    assert np.all(np.abs(got - exact) <= bound), p
    assert np.max(np.abs(got - exact)) > 0, p
    # Inside the compiled model the activations are still ggml's, bit for bit: the product is the NumPy
    # transcription's activations times the weight, to float32 rounding (one different code would be far off).
    xa = (_np_q8_0(x64.astype(_F32), "x86") if block == 32 else _np_q8_k(x64.astype(_F32))).astype(np.float64)
    assert np.all(np.abs(got - xa @ wd) <= (x64.shape[-1] + 2) * _U * (np.abs(xa) @ np.abs(wd))), p


def test_llamacpp_params_leaves_and_errors(toy):
  p = toy.params
  lp = jquant.gguf.llamacpp_params(p)                  # float32 weights: F32, left as they are
  assert jax.tree_util.tree_structure(lp) == jax.tree_util.tree_structure(p)
  assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(lp), jax.tree_util.tree_leaves(p)))
  half = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16) if a.ndim == 2 else a, p)
  lh = jquant.gguf.llamacpp_params(half)
  assert lh["layers_0"]["mlp"]["up"]["kernel"].vec_dot_type == "F16"
  lt = jquant.gguf.llamacpp_params(p, types={"layers_0/mlp/up/kernel": "F16"})   # a loaded F16 tensor
  assert lt["layers_0"]["mlp"]["up"]["kernel"].vec_dot_type == "F16"
  assert lt["layers_0"]["mlp"]["down"]["kernel"] is p["layers_0"]["mlp"]["down"]["kernel"]

  up = np.asarray(p["layers_0"]["mlp"]["up"]["kernel"])
  q4 = _qarray("Q4_0", up)

  def with_up(leaf):
    return {**p, "layers_0": {**p["layers_0"], "mlp": {**p["layers_0"]["mlp"], "up": {"kernel": leaf}}}}

  not_ggml = dataclasses.replace(q4, spec=q4.spec.replace(scale_dtype="float32"))   # a jquant grid, not GGML's
  with pytest.raises(ValueError, match=r"'layers_0/mlp/up/kernel' is a QArray whose spec is no GGML type's grid"):
    jquant.gguf.llamacpp_params(with_up(not_ggml))
  with pytest.raises(ValueError, match=r"'layers_0/mlp/up/kernel' is a W8A8Weight"):
    jquant.gguf.llamacpp_params(with_up(jquant.ops.W8A8Weight(q4)))
  with pytest.raises(ValueError, match=r"is a Q4_0 QArray but types says Q8_0"):
    jquant.gguf.llamacpp_params(with_up(q4), types={"layers_0/mlp/up/kernel": "Q8_0"})
  assert jquant.gguf.llamacpp_params(with_up(q4))["layers_0"]["mlp"]["up"]["kernel"].weight is q4
  with pytest.raises(ValueError, match=r"is a float array but types says Q4_K"):
    jquant.gguf.llamacpp_params(p, types={"layers_0/mlp/up/kernel": "Q4_K"})
  with pytest.raises(ValueError, match="GGML type 'Q9_9' is not supported"):
    jquant.gguf.llamacpp_params(p, types={"layers_0/mlp/up/kernel": "Q9_9"})
