"""Pallas matmul kernels that read jquant's packed layouts, for GPU (Triton) and TPU (Mosaic).

* `w8a8`: int8 activations x int8 weights, int32 accumulation, per-token and
  per-channel scales in the epilogue.
* `w4a16`: float activations x packed INT4 (or 5..8-bit) weights, per-group
  scales and optional zero points, unpacked inside the kernel.

Each kernel has ``reference.py`` (plain XLA, also the fallback), ``tpu.py``,
``gpu.py`` and ``blocks.py`` (block sizes per backend and generation). With
``backend="auto"`` the kernel of the platform being *lowered for* is chosen
(``jax.lax.platform_dependent``), so exporting on a CPU host for TPU or CUDA
emits the kernel; XLA is used everywhere else.

Example:
    >>> import jax, jax.numpy as jnp, pallas_kernels
    >>> xq = jnp.ones((4, 128), jnp.int8); wq = jnp.ones((128, 256), jnp.int8)
    >>> acc = pallas_kernels.w8a8_matmul(xq, None, wq, None, backend="gpu", interpret=True)
    >>> int(acc[0, 0])
    128
"""

from pallas_kernels._common import (BACKENDS, KernelUnsupported, gpu_arch, gpu_target, tpu_generation,
                                    tpu_target)
from pallas_kernels import w4a16, w8a8
from pallas_kernels.w4a16 import qarray_matmul, weight_only_matmul
from pallas_kernels.w8a8 import quantize_per_token, w8a8_matmul

__all__ = ["BACKENDS", "KernelUnsupported", "gpu_arch", "gpu_target", "tpu_generation", "tpu_target",
           "w4a16", "w8a8", "qarray_matmul", "weight_only_matmul", "quantize_per_token", "w8a8_matmul"]
