"""Weight-only matmul: float activations x packed INT4 (or 5..8-bit) weights.

``W4A16`` names the main case; the same kernels take one-code-per-byte
payloads (5..8 bits, W8A16), symmetric (offset-binary or int8) or asymmetric
(uint8 zero points), per group or per channel.

Example:
    >>> import jax, jax.numpy as jnp, jquant
    >>> from pallas_kernels import w4a16
    >>> w = jax.random.normal(jax.random.key(0), (256, 128))
    >>> q = jquant.quantize(w, jquant.QuantSpec(bits=4, granularity="group", group_size=64))
    >>> x = jnp.ones((3, 256), jnp.bfloat16)
    >>> w4a16.qarray_matmul(x, q, backend="xla").shape
    (3, 128)
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.w4a16 import blocks, gpu, reference, tpu
from pallas_kernels.w4a16.reference import PACKED_BITS, WeightLayout

# Above this many activation rows the GPU kernel hands over to XLA (dequantize
# once, then a tensor-core GEMM), which wins once the product is compute bound.
GPU_MAX_M = 256


def weight_only_matmul(x, packed, scale, zero_point=None, *, bits: int, k: int | None = None,
                       group_size: int | None = None, out_dtype=None, backend: str = "auto",
                       interpret=False, blocks=None, fallback=None):
  """``x (..., K) @ W`` for a packed weight ``W`` (K, N), on ``backend``.

  Args:
    x: Float activations (..., K); leading dims are flattened.
    packed: (ceil(K/2), N) uint8 for ``bits=4``; (K, N) int8 (symmetric 8-bit)
      or uint8 for 5..8 bits.
    scale: (G, N) float scales, (1, N) per channel, or (1, 1) per tensor.
    zero_point: uint8 zero points shaped like ``scale``, or None (symmetric).
    bits: 4, 5, 6, 7 or 8.
    k: Logical K (default ``x.shape[-1]``).
    group_size: Rows per scale when ``G > 1`` (default ``ceil(K / G)``).
    out_dtype: Output dtype (default ``x.dtype``).
    backend: 'auto' (Pallas on TPU/CUDA, XLA elsewhere), 'xla', 'tpu' or 'gpu'.
    interpret: Run the Pallas kernel in its interpreter.
    blocks: A `blocks.WOBlocks` overriding the table.
    fallback: ``f(x2d) -> (M, N)`` used instead of `reference` where no
      kernel applies (lets a caller keep its own XLA formulation).
  """
  _common.check_backend(backend)
  k = int(k or x.shape[-1])
  if x.shape[-1] != k:
    raise ValueError(f"weight_only_matmul: x has K={x.shape[-1]} but k={k}.")
  g = scale.shape[0]
  if group_size is None:
    group_size = -(-k // g) if g > 1 else k
  if zero_point is None:
    offset = 0 if (bits == 8 or jnp.dtype(packed.dtype) == jnp.int8) else 2 ** (bits - 1)
  else:
    offset = 0
  layout = WeightLayout(bits=bits, k=k, group_size=group_size if g > 1 else k, offset=offset)
  if packed.shape[0] != layout.packed_rows:
    raise ValueError(f"weight_only_matmul: packed has {packed.shape[0]} rows; bits={bits}, K={k} "
                     f"needs {layout.packed_rows}.")
  lead = x.shape[:-1]
  n = packed.shape[1]
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  x2 = x.reshape(-1, k)
  m = x2.shape[0]

  def xla_impl(a, p, s, z):
    if fallback is not None:
      return fallback(a).astype(out_dtype)
    return reference.weight_only_matmul(a, p, s, z, layout, out_dtype)

  def guarded(fn):
    return _common.or_fallback(fn, xla_impl, backend)

  def tpu_impl(a, p, s, z):
    if a.dtype not in (jnp.bfloat16, jnp.float32):
      raise _common.KernelUnsupported(f"TPU kernel takes bfloat16/float32 activations, got {a.dtype}")
    return tpu.weight_only_matmul(a, p, s, z, layout, out_dtype, interpret=interpret, blocks=blocks)

  def gpu_impl(a, p, s, z):
    if backend == "auto" and _common.is_static(m) and m > GPU_MAX_M:
      raise _common.KernelUnsupported(f"M={m} > GPU_MAX_M={GPU_MAX_M}")
    return gpu.weight_only_matmul(a, p, s, z, layout, out_dtype, interpret=interpret, blocks=blocks)

  def reference_impl(a, p, s, z):
    return reference.weight_only_matmul(a, p, s, z, layout, out_dtype)

  out = _common.dispatch((x2, packed, scale, zero_point), xla=xla_impl, tpu=guarded(tpu_impl),
                         gpu=guarded(gpu_impl), backend=backend, reference=reference_impl)
  return out.reshape(lead + (n,))


def supports(q) -> bool:
  """Whether a `jquant.QArray` has a layout these kernels read (2-D, contraction axis 0, 4..8 bits)."""
  return (getattr(q, "ndim", 0) == 2 and q.axis == -2 and q.bits in PACKED_BITS
          and getattr(q.spec, "standard_layout", True))  # not GGUF grids (float mins, two-level, f16 scales)


def qarray_matmul(x, q, *, backend: str = "auto", interpret=False, blocks=None, out_dtype=None, fallback=None):
  """``x @ q`` for a 2-D `jquant.QArray` ``q`` (K, N) quantized along axis 0.

  Raises:
    ValueError: ``q`` has a layout the kernels do not read (see `supports`).
  """
  if not supports(q):
    raise ValueError(f"qarray_matmul: need a 2-D QArray with contraction axis 0 and bits in {PACKED_BITS}; "
                     f"got shape {q.shape}, axis {q.axis}, bits {q.bits}.")
  group = q.spec.group_size if q.spec.granularity == "group" else None
  return weight_only_matmul(x, q.qvalue, q.scale, q.zero_point, bits=q.bits, k=q.size, group_size=group,
                            out_dtype=out_dtype, backend=backend, interpret=interpret, blocks=blocks,
                            fallback=fallback)


__all__ = ["weight_only_matmul", "qarray_matmul", "supports", "WeightLayout", "blocks", "gpu", "reference",
           "tpu", "GPU_MAX_M"]
