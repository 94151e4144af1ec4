"""Weight-only Pallas kernels (INT4 packed, 5..8-bit bytes): interpret vs float64, export, TPU compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from kernel_test_base import KernelTestBase, float_bound, pytest_generate_tests  # noqa: F401
from pallas_kernels import KernelUnsupported, w4a16


def _spec(bits, symmetric, granularity, group_size, pad_groups=False):
  """``symmetric``: True (the default "half" scale rule), False, or a `QuantSpec.symmetric_scale` rule."""
  rule = dict(symmetric_scale=symmetric) if isinstance(symmetric, str) else dict(symmetric=symmetric)
  return jquant.QuantSpec(bits=bits, granularity=granularity, group_size=group_size if granularity == "group"
                          else None, pad_groups=pad_groups, **rule)


class TestWeightOnly(KernelTestBase):
  # (M, K, N, bits, symmetric, granularity, group_size, x dtype). Every layout the kernels read:
  # INT4 two per byte (offset-binary or zero points), 5..7 bits one per byte, int8 / uint8 8-bit,
  # per group / channel / tensor; odd M, K, N are padded (K=101 packs a zero nibble, its last group is short).
  CASES = (
      (37, 896, 1000, 4, True, "group", 128, "bfloat16"),
      (5, 576, 64, 4, False, "group", 64, "bfloat16"),
      (3, 256, 128, 4, True, "channel", None, "float32"),
      (4, 256, 136, 4, False, "tensor", None, "bfloat16"),
      (5, 101, 64, 4, False, "group", 32, "bfloat16"),
      (6, 192, 96, 5, True, "group", 64, "bfloat16"),
      (2, 256, 64, 5, False, "channel", None, "bfloat16"),
      (7, 128, 128, 6, True, "tensor", None, "bfloat16"),
      (1, 256, 128, 6, False, "group", 128, "float32"),
      (9, 256, 128, 7, True, "channel", None, "bfloat16"),
      (8, 256, 64, 7, False, "group", 128, "bfloat16"),
      (16, 256, 128, 8, True, "group", 64, "bfloat16"),
      (3, 192, 128, 8, False, "channel", None, "float32"),
      # Signed scales (symmetric_scale="signed", llama.cpp's full range: codes down to -2^(b-1)).
      (3, 128, 64, 4, "signed", "group", 64, "bfloat16"),
      (3, 128, 64, 8, "signed", "channel", None, "float32"),
  )
  COMPILE_CASES = (
      (37, 896, 1000, 4, True, "group", 128, "bfloat16"),
      (16, 576, 192, 4, False, "group", 64, "bfloat16"),
      (8, 512, 256, 8, True, "channel", None, "bfloat16"),
      (64, 1024, 512, 6, False, "group", 128, "float32"),
  )

  def make(self, case, rng):
    m, k, n, bits, sym, gran, gs, xdt = case
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    q = jquant.quantize(w, _spec(bits, sym, gran, gs, pad_groups=bool(gs and k % gs)))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.dtype(xdt))
    return x, q

  def structs(self, case):
    x, q = self.make(case, np.random.default_rng(0))
    return jax.ShapeDtypeStruct(x.shape, x.dtype), jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), q)

  def run(self, args, case, backend, **kw):
    x, q = args
    return w4a16.qarray_matmul(x, q, backend=backend, out_dtype=jnp.float32, **kw)

  def check(self, out, args, case, backend):
    x, q = args
    x64 = np.asarray(x, np.float64)
    w64 = np.asarray(jquant.dequantize(q, jnp.float32), np.float64)  # exact: codes times f32 scales
    ref = x64 @ w64
    grouped = q.spec.granularity == "group" and q.scale.shape[0] > 1
    # The TPU kernel dequantizes per group into the activation dtype before the MXU;
    # the GPU kernel feeds exact codes and scales the partial products.
    weight_eps = 0.0
    if backend == "tpu" and grouped:
      weight_eps = 2.0 ** -8 if x.dtype == jnp.bfloat16 else 2.0 ** -24
    bound = float_bound(np.abs(x64) @ np.abs(w64), ref, x.shape[1], 2.0 ** -24, weight_eps)
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(np.isfinite(out))
    assert np.all(err <= bound), float((err / bound).max())


def test_xla_reference_is_within_its_bf16_bound():
  """The fallback (dequantize to bf16, f32 accumulation) stays within its own derived bound."""
  rng = np.random.default_rng(11)
  w = jnp.asarray(rng.standard_normal((384, 200)), jnp.float32)
  q = jquant.quantize(w, _spec(4, True, "group", 128))
  x = jnp.asarray(rng.standard_normal((9, 384)), jnp.bfloat16)
  out = np.asarray(w4a16.qarray_matmul(x, q, backend="xla", out_dtype=jnp.float32), np.float64)
  x64, w64 = np.asarray(x, np.float64), np.asarray(jquant.dequantize(q), np.float64)
  ref = x64 @ w64
  bound = float_bound(np.abs(x64) @ np.abs(w64), ref, 384, 2.0 ** -24, 2.0 ** -8)
  assert np.all(np.abs(out - ref) <= bound)


@pytest.mark.parametrize("x_mode", ["strided", "pre", "join"])
def test_gpu_activation_read_variants_agree(x_mode):
  """The benchmark's other ways of pairing nibbles with activations compute the same product."""
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
  q = jquant.quantize(w, _spec(4, False, "group", 64))
  x = jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)
  base = w4a16.blocks.table_entry("gpu", "sm90", 4)
  b = w4a16.blocks.WOBlocks(**{**base.__dict__, "x_mode": x_mode, "split_k": 2})
  y = np.asarray(w4a16.qarray_matmul(x, q, backend="gpu", interpret=True, blocks=b, out_dtype=jnp.float32))
  x64, w64 = np.asarray(x, np.float64), np.asarray(jquant.dequantize(q), np.float64)
  ref = x64 @ w64
  assert np.all(np.abs(y - ref) <= float_bound(np.abs(x64) @ np.abs(w64), ref, 256, 2.0 ** -24))


def test_layouts_the_kernels_cannot_read_are_refused_or_fall_back():
  w = jnp.ones((256, 128), jnp.float32)
  q3 = jquant.quantize(w, _spec(3, True, "group", 64))
  assert not w4a16.supports(q3)
  with pytest.raises(ValueError, match="bits"):
    w4a16.qarray_matmul(jnp.ones((2, 256)), q3)
  q = jquant.quantize(w, _spec(4, True, "group", 48, pad_groups=True))  # 48 is no power of two
  with pytest.raises(KernelUnsupported, match="group_size=48"):
    w4a16.qarray_matmul(jnp.ones((2, 256), jnp.bfloat16), q, backend="gpu", interpret=True)
  assert w4a16.supports(jquant.quantize(w, _spec(4, "signed", "group", 64)))  # signed scales: read as is
  assert not w4a16.supports(jquant.quantize(w, jquant.gguf.spec_for("Q4_0")))  # float16 scales
  # 'auto' on CPU is the XLA path whatever the layout.
  y = w4a16.qarray_matmul(jnp.ones((2, 256), jnp.bfloat16), q)
  assert y.shape == (2, 128) and bool(jnp.all(jnp.isfinite(y)))
