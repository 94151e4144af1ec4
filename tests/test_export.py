"""jquant.export: quantized models exported for CPU, TPU and CUDA at once, serialized, run back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

import jquant
from jquant.calibrate import W8A8Spec
from kernel_test_base import MOSAIC_CALL, TRITON_CALL

KERNELS = r"(attn|mlp)/\w+/kernel$"


@pytest.fixture(scope="module")
def toy():
  from jquant.models import LlamaConfig, llama_init
  cfg = LlamaConfig(vocab_size=101, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256)
  return llama_init(cfg, jax.random.key(0))


def _w4(model):
  spec = jquant.QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128)
  return jquant.quantize_params(model.params, [jquant.Rule(KERNELS, spec)])


def _w8a8(model):
  return jquant.convert(model.params, None, [jquant.Rule(KERNELS, W8A8Spec(activations="dynamic"))])


def _roundtrip(model, params):
  b, t = jax_export.symbolic_shape("b, t")
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  exp = jquant.export.export(model.apply)(params, tokens)
  assert exp.platforms == ("cpu", "tpu", "cuda")
  text = exp.mlir_module()
  return jquant.export.deserialize(exp.serialize()), text


@pytest.mark.parametrize("make,n_kernels", [(_w4, 14), (_w8a8, 14)], ids=["w4_g128", "w8a8"])
def test_symbolic_multi_platform_export_runs_back_bit_for_bit(toy, make, n_kernels):
  """One artifact: CPU runs XLA, TPU carries Mosaic and CUDA Triton; the CPU lowering equals jit."""
  params = make(toy)
  restored, text = _roundtrip(toy, params)
  # Symbolic M: the TPU kernels take it (padded grid); Triton has no dynamic grid, so CUDA uses XLA.
  assert text.count(MOSAIC_CALL) >= n_kernels
  assert TRITON_CALL not in text
  for shape in [(1, 7), (3, 16)]:
    tokens = jax.random.randint(jax.random.key(shape[1]), shape, 0, toy.config.vocab_size)
    want = jax.jit(toy.apply)(params, tokens)
    got = restored.call(params, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_static_shapes_carry_the_triton_kernel_for_cuda(toy):
  params = _w4(toy)
  exp = jquant.export.export(toy.apply)(params, jax.ShapeDtypeStruct((2, 8), jnp.int32))
  text = exp.mlir_module()
  assert text.count(TRITON_CALL) == 14 and text.count(MOSAIC_CALL) == 14
  restored = jquant.export.deserialize(exp.serialize())
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  np.testing.assert_array_equal(np.asarray(restored.call(params, tokens)),
                                np.asarray(jax.jit(toy.apply)(params, tokens)))


def test_qat_trees_serialize(toy):
  """QAT's Quantizer and fake-quant leaves cross the export boundary (inputs and outputs)."""
  spec = jquant.QuantSpec(bits=4, granularity="group", group_size=64)
  state = jquant.qat.init(toy.params, [jquant.Rule(KERNELS, spec)], act_bits=8)
  fq = jax.jit(jquant.qat.fake_quantize)(toy.params, state)
  assert any(isinstance(x, jquant.qat.ActFakeQuant) for x in
             jax.tree.leaves(fq, is_leaf=lambda x: isinstance(x, jquant.qat.ActFakeQuant)))
  exp = jquant.export.export(jquant.qat.fake_quantize, platforms=["cpu"])(toy.params, state)
  restored = jquant.export.deserialize(exp.serialize())
  assert restored.out_tree == exp.out_tree
  got = restored.call(toy.params, state)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(fq)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_aux_data_round_trips_every_spec_field():
  spec = W8A8Spec(activations="static", scale_dtype="bfloat16", clip="mse", mse_grid=7)
  aux = (spec, 576, -2, np.dtype(jnp.bfloat16), (1, 2))
  assert jquant.export.deserialize_aux(jquant.export.serialize_aux(aux)) == aux


def test_bad_platform_is_named():
  with pytest.raises(ValueError, match=r"platforms=\('cpu', 'gpu'\).*allowed"):
    jquant.export.export(lambda x: x, platforms=["cpu", "gpu"])
