"""Helpers shared by the kernels: padding, targets, backend choice.

A kernel call names a *backend*: ``"xla"`` (the plain reference, runs
anywhere), ``"tpu"`` (Pallas Mosaic), ``"gpu"`` (Pallas Triton) or ``"auto"``:
the kernel of the platform being lowered for, chosen with
``jax.lax.platform_dependent`` so that a CPU machine exporting for TPU or CUDA
emits the kernel, and XLA everywhere else.

Example:
    >>> from pallas_kernels import _common
    >>> _common.round_up(37, 16)
    48
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "tpu", "gpu")
TPU_GENERATIONS = ("v2", "v3", "v4", "v5e", "v5p", "v6e", "v7")

# Which TPU generation (and GPU compute capability) block tables and
# capability checks assume when the tracing machine has no such device (a
# CPU host exporting or compiling ahead of time). Part of the jit cache key.
_TPU_TARGET = jax.make_user_context(default_value=None)
_GPU_TARGET = jax.make_user_context(default_value=None)
_DEFAULT_TPU = "v5e"
_DEFAULT_GPU = "sm90"


class KernelUnsupported(ValueError):
  """A kernel cannot run this problem on this target (the caller may fall back to XLA)."""


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pad_axis(x, axis: int, size: int, value=0):
  """Zero-pads ``x`` along ``axis`` up to ``size`` (no-op when already there)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  if extra < 0:
    raise ValueError(f"pad_axis: cannot pad axis {axis} of shape {x.shape} down to {size}.")
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def pad2(x, rows: int, cols: int):
  return pad_axis(pad_axis(x, 0, rows), 1, cols)


def is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def check_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; allowed: {BACKENDS}.")
  return backend


def _kind_to_generation(kind: str) -> str:
  """'TPU v5 lite' -> 'v5e', 'TPU v6 lite' -> 'v6e', 'TPU v4' -> 'v4', 'TPU7x' -> 'v7'."""
  k = kind.lower()
  m = re.search(r"v?(\d+)", k.replace("tpu", ""))
  if not m:
    return _DEFAULT_TPU
  n = int(m.group(1))
  if n == 5:
    return "v5e" if ("lite" in k or "5e" in k) else "v5p"
  if n == 6:
    return "v6e"
  return f"v{n}" if n < 7 else "v7"


def normalize_tpu_generation(gen: str) -> str:
  g = str(gen).lower().replace("tpu", "").strip()
  g = {"v5lite": "v5e", "v5 lite": "v5e", "v6lite": "v6e", "v6 lite": "v6e", "v5": "v5p",
       "v6": "v6e", "7": "v7", "7x": "v7", "v7x": "v7"}.get(g, g)
  if g not in TPU_GENERATIONS:
    raise ValueError(f"tpu generation={gen!r}; allowed: {TPU_GENERATIONS}.")
  return g


def tpu_generation() -> str:
  """The TPU generation kernels are built for: `tpu_target` if set, else the local TPU, else v5e."""
  if _TPU_TARGET.value is not None:
    return _TPU_TARGET.value
  try:
    devs = jax.devices("tpu")
  except RuntimeError:
    devs = []
  if devs:
    return _kind_to_generation(devs[0].device_kind)
  return _DEFAULT_TPU


def gpu_arch() -> str:
  """'sm90' style name of the GPU kernels are built for (`gpu_target`, local GPU, or sm90)."""
  if _GPU_TARGET.value is not None:
    return _GPU_TARGET.value
  try:
    devs = jax.devices("gpu")
  except RuntimeError:
    devs = []
  if devs and getattr(devs[0], "compute_capability", None):
    return "sm" + str(devs[0].compute_capability).replace(".", "")
  return _DEFAULT_GPU


@contextlib.contextmanager
def tpu_target(generation: str):
  """Builds TPU kernels for ``generation`` (e.g. ahead-of-time compilation on a CPU host).

  Example:
      >>> with tpu_target("v6e"):
      ...   tpu_generation()
      'v6e'
  """
  with _TPU_TARGET(normalize_tpu_generation(generation)):
    yield


@contextlib.contextmanager
def gpu_target(arch: str):
  """Builds GPU kernels for ``arch`` ('sm80', 'sm90', ...)."""
  if not re.fullmatch(r"sm\d+", arch):
    raise ValueError(f"gpu arch={arch!r}; allowed: 'sm<major><minor>' such as 'sm80', 'sm90'.")
  with _GPU_TARGET(arch):
    yield


def with_reference_vjp(kernel: Callable, reference: Callable) -> Callable:
  """``kernel`` forward, the gradient of ``reference`` (plain XLA) backward.

  Pallas kernels have no transpose rule; this keeps ``jax.grad`` through a
  quantized matmul working on every platform (integer inputs get float0
  cotangents, float ones the reference's exact gradient).
  """

  @jax.custom_vjp
  def f(*args):
    return kernel(*args)

  def fwd(*args):
    return kernel(*args), args

  def bwd(args, g):
    return jax.vjp(reference, *args)[1](g)

  f.defvjp(fwd, bwd)
  return f


def dispatch(args, *, xla: Callable, tpu: Optional[Callable], gpu: Optional[Callable], backend: str,
             reference: Optional[Callable] = None):
  """Calls the implementation for ``backend`` ('auto' picks by lowering platform).

  Kernel branches differentiate through ``reference`` (default ``xla``), which
  must take the operands as explicit arguments.
  """
  check_backend(backend)
  reference = reference or xla
  tpu = None if tpu is None else with_reference_vjp(tpu, reference)
  gpu = None if gpu is None else with_reference_vjp(gpu, reference)
  if backend == "xla":
    return xla(*args)
  if backend == "tpu":
    if tpu is None:
      raise KernelUnsupported("no TPU kernel for this problem")
    return tpu(*args)
  if backend == "gpu":
    if gpu is None:
      raise KernelUnsupported("no GPU kernel for this problem")
    return gpu(*args)
  branches = {}
  if tpu is not None:
    branches["tpu"] = tpu
  if gpu is not None:
    branches["cuda"] = gpu
  if not branches:
    return xla(*args)
  return jax.lax.platform_dependent(*args, default=xla, **branches)


@dataclasses.dataclass(frozen=True)
class NoBlocks:
  """Marker in a block table: this target cannot run the kernel."""
  reason: str
