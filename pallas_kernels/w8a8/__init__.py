"""W8A8: int8 activations x int8 weights, int32 accumulation, scaled epilogue.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from pallas_kernels import w8a8
    >>> x = jax.random.normal(jax.random.key(0), (4, 256))
    >>> wq = jax.random.randint(jax.random.key(1), (256, 128), -127, 128).astype(jnp.int8)
    >>> xq, xs = w8a8.quantize_per_token(x)
    >>> y = w8a8.w8a8_matmul(xq, xs, wq, jnp.full((1, 128), 0.01), backend="xla")
    >>> y.shape, y.dtype
    ((4, 128), dtype(bfloat16))
"""

from __future__ import annotations


import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.w8a8 import blocks, gpu, reference, tpu
from pallas_kernels.w8a8.reference import quantize_per_token


# From this many activation rows on, the GPU path transposes the weight to (N, K) first.
GPU_NK_MIN_M = 512


def w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.bfloat16, *, backend: str = "auto",
                interpret=False, blocks=None, fallback=None):
  """W8A8 product on ``backend`` ('auto': Pallas kernel on TPU/CUDA, XLA elsewhere).

  Args:
    x_q: int8 (..., K) activations (leading dims are flattened).
    x_scale: float (..., 1) per-token scales, or None.
    w_q: int8 (K, N) weights.
    w_scale: float (1, N) or (N,) per-channel scales (or a scalar), or None.
    out_dtype: Output dtype when scaled; with both scales None the int32
      accumulators are returned (bit-exact on every backend).
    backend: 'auto', 'xla', 'tpu' or 'gpu'.
    interpret: Run the chosen Pallas kernel in its interpreter.
    blocks: A `blocks.W8A8Blocks` overriding the table.
    fallback: ``f(x_q2d, x_scale2d, w_q, w_scale2d)`` used instead of
      `reference` where no kernel applies.

  Returns:
    (..., N) ``out_dtype`` (or int32).
  """
  _common.check_backend(backend)
  lead = x_q.shape[:-1]
  k = x_q.shape[-1]
  n = w_q.shape[1]
  x2 = x_q.reshape(-1, k)
  xs2 = None if x_scale is None else jnp.broadcast_to(
      jnp.asarray(x_scale, jnp.float32), lead + (1,)).reshape(-1, 1)
  ws2 = None if w_scale is None else jnp.broadcast_to(
      jnp.asarray(w_scale, jnp.float32).reshape(1, -1), (1, n))

  def xla_impl(a, sa, b, sb):
    if fallback is not None:
      return fallback(a, sa, b, sb)
    return reference.w8a8_matmul(a, sa, b, sb, out_dtype)

  def guarded(fn):
    return _common.or_fallback(fn, xla_impl, backend)

  def tpu_impl(a, sa, b, sb):
    return tpu.w8a8_matmul(a, sa, b, sb, out_dtype, interpret=interpret, blocks=blocks)

  def gpu_impl(a, sa, b, sb):
    if _common.is_static(a.shape[0]) and a.shape[0] >= GPU_NK_MIN_M:
      # int8 wgmma reads B K-contiguous; one XLA transpose beats a byte-wise
      # transpose through shared memory once the product is compute bound.
      return gpu.w8a8_matmul(a, sa, b.T, sb, out_dtype, interpret=interpret, blocks=blocks, w_layout="nk")
    return gpu.w8a8_matmul(a, sa, b, sb, out_dtype, interpret=interpret, blocks=blocks)

  out = _common.dispatch((x2, xs2, w_q, ws2), xla=xla_impl, tpu=guarded(tpu_impl), gpu=guarded(gpu_impl),
                         backend=backend,
                         reference=lambda a, sa, b, sb: reference.w8a8_matmul(a, sa, b, sb, out_dtype))
  return out.reshape(lead + (n,))


__all__ = ["GPU_NK_MIN_M", "w8a8_matmul", "quantize_per_token", "blocks", "gpu", "reference", "tpu"]
