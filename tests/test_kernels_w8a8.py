"""W8A8 Pallas kernels: bit-exact int32 in interpret mode, export, TPU compile, v4 refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_test_base import (KernelTestBase, MOSAIC_CALL, exported_text, on_device, pytest_generate_tests,  # noqa: F401
                              topology_device)
from pallas_kernels import KernelUnsupported, tpu_target, w8a8


class TestW8A8(KernelTestBase):
  # (M, K, N, scaled, out_dtype): odd shapes are padded; scaled=False returns the int32 sums.
  CASES = ((37, 896, 1000, False, "int32"), (16, 576, 192, True, "bfloat16"), (130, 256, 384, True, "float32"))
  COMPILE_CASES = ((37, 896, 1000, True, "bfloat16"), (256, 1024, 512, False, "int32"))

  def make(self, case, rng):
    m, k, n, scaled, _ = case
    xq = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
    wq = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    if not scaled:
      return xq, None, wq, None
    xs = jnp.asarray(rng.uniform(0.001, 0.1, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(0.001, 0.1, (1, n)), jnp.float32)
    return xq, xs, wq, ws

  def run(self, args, case, backend, **kw):
    out_dtype = jnp.bfloat16 if case[4] == "int32" else jnp.dtype(case[4])
    return w8a8.w8a8_matmul(*args, out_dtype=out_dtype, backend=backend, **kw)

  def check(self, out, args, case, backend):
    xq, xs, wq, ws = (None if a is None else np.asarray(a) for a in args)
    acc = xq.astype(np.int64) @ wq.astype(np.int64)
    if xs is None:
      assert out.dtype == np.int32
      np.testing.assert_array_equal(out, acc)  # bit-exact
      return
    ref = acc.astype(np.float64) * xs.astype(np.float64) * ws.astype(np.float64)
    out_eps = 2.0 ** -8 if case[4] == "bfloat16" else 2.0 ** -24
    # int32 -> f32 rounding and two f32 multiplies: 3 u32, then the output cast.
    bound = (3 * 2.0 ** -24 + out_eps) * np.abs(ref) + 1e-30
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(err <= bound), float((err / bound).max())


def test_scaled_kernel_equals_scaled_int32_sums():
  """The epilogue scales exactly the int32 sums: kernel(scaled) == f32(int32 sums) * xs * ws."""
  rng = np.random.default_rng(7)
  xq = jnp.asarray(rng.integers(-127, 128, (24, 384)), jnp.int8)
  wq = jnp.asarray(rng.integers(-127, 128, (384, 200)), jnp.int8)
  xs = jnp.asarray(rng.uniform(0.01, 0.1, (24, 1)), jnp.float32)
  ws = jnp.asarray(rng.uniform(0.01, 0.1, (1, 200)), jnp.float32)
  want = (np.asarray(w8a8.reference.int8_matmul(xq, wq)).astype(np.float32) * np.asarray(xs)) * np.asarray(ws)
  for backend in ("gpu", "tpu"):
    y = w8a8.w8a8_matmul(xq, xs, wq, ws, out_dtype=jnp.float32, backend=backend, interpret=True)
    np.testing.assert_array_equal(np.asarray(y), want)


def test_gpu_nk_weight_layout_is_bit_exact():
  """Weights stored (N, K) (the int8 wgmma operand layout) give the same int32 sums."""
  rng = np.random.default_rng(3)
  xq = jnp.asarray(rng.integers(-127, 128, (40, 320)), jnp.int8)
  wq = jnp.asarray(rng.integers(-127, 128, (320, 96)), jnp.int8)
  acc = w8a8.gpu.w8a8_matmul(xq, None, wq.T, None, w_layout="nk", interpret=True)
  np.testing.assert_array_equal(np.asarray(acc), np.asarray(xq, np.int64) @ np.asarray(wq, np.int64))


def test_tpu_v4_is_refused_with_a_clear_error_and_auto_falls_back():
  """TPU v4 has no int8 MXU path in Mosaic: the kernel says so; 'auto' compiles the XLA path."""
  xq = jax.ShapeDtypeStruct((64, 256), jnp.int8)
  wq = jax.ShapeDtypeStruct((256, 128), jnp.int8)
  with pytest.raises(KernelUnsupported, match="v4.*v5e or newer"):
    w8a8.tpu.w8a8_matmul(jnp.zeros((64, 256), jnp.int8), None, jnp.zeros((256, 128), jnp.int8), None,
                         generation="v4")
  dev = topology_device("v4")
  with tpu_target("v4"):
    fn = jax.jit(lambda a, b: w8a8.w8a8_matmul(a, None, b, None))
    lowered = fn.lower(*on_device((xq, wq), dev))
    assert MOSAIC_CALL not in lowered.as_text()
    assert lowered.compile() is not None
  # Same program for v5e carries the kernel.
  with tpu_target("v5e"):
    assert MOSAIC_CALL in exported_text(lambda a, b: w8a8.w8a8_matmul(a, None, b, None), (xq, wq), "tpu")


def test_bad_arguments_name_the_problem():
  with pytest.raises(ValueError, match="backend='cuda'"):
    w8a8.w8a8_matmul(jnp.zeros((2, 4), jnp.int8), None, jnp.zeros((4, 2), jnp.int8), None, backend="cuda")
  with pytest.raises(ValueError, match="must be int8"):
    w8a8.gpu.w8a8_matmul(jnp.zeros((2, 4), jnp.float32), None, jnp.zeros((4, 2), jnp.int8), None)
  with pytest.raises(ValueError, match="contraction sizes differ"):
    w8a8.tpu.w8a8_matmul(jnp.zeros((2, 4), jnp.int8), None, jnp.zeros((5, 2), jnp.int8), None)
