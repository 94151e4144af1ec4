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
import functools
import re
import warnings
from typing import Callable, Optional

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax.interpreters import batching, mlir
from jax.interpreters import partial_eval as pe

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
  """Smallest multiple of ``m`` at least ``x`` (``x`` may be a symbolic dimension)."""
  return -(-x // m) * m


def is_static(d) -> bool:
  """Whether a dimension is a known integer (not a `jax.export` symbolic dimension)."""
  return isinstance(d, (int, np.integer))


def pad_axis(x, axis: int, size, value=0):
  """Zero-pads ``x`` along ``axis`` up to ``size`` (no-op when already there).

  ``size`` and ``x.shape[axis]`` may be symbolic (``jax.export`` shape
  polymorphism, e.g. ``round_up(b, 16)`` for a symbolic batch ``b``).
  """
  extra = size - x.shape[axis]
  if is_static(extra):
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


def or_fallback(kernel: Callable, fallback: Callable, backend: str) -> Callable:
  """``kernel``, or ``fallback`` where it raises `KernelUnsupported` and ``backend`` is 'auto'.

  A kernel asked for by name ('tpu', 'gpu') re-raises, so an explicit request never silently runs XLA.
  """

  def run(*args):
    try:
      return kernel(*args)
    except KernelUnsupported:
      if backend != "auto":
        raise
      return fallback(*args)

  return run


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


# ---------------------------------------------------------------------------
# Choosing the implementation per lowering platform.
#
# `jax.lax.platform_dependent` lowers every branch for every platform of a
# multi-platform export, so a Pallas TPU kernel in the "tpu" branch is also
# lowered for "cpu" and fails ("Only interpret mode is supported on CPU
# backend"). `platform_switch` is a primitive with one lowering rule per
# platform (`mlir.register_lowering(..., platform=...)`): each platform lowers
# only its own branch, so one `jax.export` can carry CPU, TPU and CUDA.

_GPU_KINDS = {"sm75": "Tesla T4", "sm80": "NVIDIA A100", "sm86": "NVIDIA A10", "sm89": "NVIDIA L4",
              "sm90": "NVIDIA H100", "sm100": "NVIDIA B200", "sm103": "NVIDIA B300",
              "sm120": "NVIDIA RTX PRO 6000"}
SWITCH_PLATFORMS = ("tpu", "cuda")

_switch_p = jex.core.Primitive("jquant_platform_switch")
_switch_p.multiple_results = True


def _branch(branches, platform):
  """(jaxpr, (start, stop)) of ``platform``'s branch; its constants are operands[start:stop]."""
  table = {name: (jaxpr, span) for name, jaxpr, span in branches}
  return table.get(platform, table["default"])


def _branch_fn(branches, platform, n_args):
  jaxpr, (start, stop) = _branch(branches, platform)
  fn = jex.core.jaxpr_as_fun(jaxpr)
  return lambda *ops: fn(*ops[start:stop], *ops[:n_args])


def _switch_abstract_eval(*avals, branches, n_args, out_avals):
  del avals, branches, n_args
  return out_avals


def _switch_impl(*ops, branches, n_args, out_avals):
  del out_avals
  platform = jax.devices()[0].platform
  return jax.jit(_branch_fn(branches, "cuda" if platform == "gpu" else platform, n_args))(*ops)


def _gpu_trace_mesh():
  """A context naming the `gpu_target` GPU to Pallas Triton where no GPU is local.

  Triton lowering reads the GPU's compute capability from the abstract mesh
  recorded when the kernel was traced; a CPU host exporting for CUDA names
  the `gpu_target` architecture (sm90 by default) through an abstract device.
  """
  try:
    if jax.devices("gpu"):
      return contextlib.nullcontext()
  except RuntimeError:
    pass
  arch = gpu_arch()
  kind = _GPU_KINDS.get(arch)
  if kind is None:
    raise ValueError(f"gpu_target({arch!r}): no known GPU of that architecture to lower for; allowed: "
                     f"{tuple(_GPU_KINDS)}.")
  cur = jax.sharding.get_abstract_mesh()
  device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=None, platform="gpu")
  if cur.empty:
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      cur.axis_sizes, cur.axis_names, axis_types=cur.axis_types, abstract_device=device))


def _switch_lowering(platform):
  def rule(ctx, *ops, branches, n_args, out_avals):
    del out_avals
    lower = mlir.lower_fun(_branch_fn(branches, platform, n_args), multiple_results=True)
    with warnings.catch_warnings():
      # Pallas' Triton backend announces its future removal at every lowering.
      warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
      return lower(ctx, *ops)
  return rule


def _switch_batch(ops, dims, *, branches, n_args, out_avals):
  del out_avals
  size = next(a.shape[d] for a, d in zip(ops, dims) if d is not batching.not_mapped)
  ops = [jnp.broadcast_to(a, (size,) + a.shape) if d is batching.not_mapped else jnp.moveaxis(a, d, 0)
         for a, d in zip(ops, dims)]
  fns = {name: jax.vmap(_branch_fn(branches, name, n_args)) for name, _, _ in branches}
  default = fns.pop("default")
  outs = platform_switch(*ops, default=default, **fns)
  return outs, [0] * len(outs)


_switch_p.def_impl(_switch_impl)
_switch_p.def_abstract_eval(_switch_abstract_eval)
mlir.register_lowering(_switch_p, _switch_lowering("default"))
for _platform in SWITCH_PLATFORMS:
  mlir.register_lowering(_switch_p, _switch_lowering(_platform), platform=_platform)
batching.primitive_batchers[_switch_p] = _switch_batch


def platform_switch(*args, default: Callable, **per_platform: Callable):
  """``per_platform[p](*args)`` when lowering for platform ``p``, ``default(*args)`` elsewhere.

  Like `jax.lax.platform_dependent`, but each platform of a multi-platform
  `jax.export` lowers only its own branch. Branches are traced here (so
  `KernelUnsupported` surfaces at trace time), return a list of arrays, and
  must agree on output shapes and dtypes. Platforms: 'tpu' and 'cuda'. Not
  differentiable by itself: `dispatch` wraps it in a custom VJP.

  Returns:
    The list of outputs.
  """
  unknown = set(per_platform) - set(SWITCH_PLATFORMS)
  if unknown:
    raise ValueError(f"platform_switch: platforms {sorted(unknown)}; allowed: {SWITCH_PLATFORMS}.")
  structs = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in args]
  operands, branches = list(args), []
  for name, fn in (("default", default), *per_platform.items()):
    with _gpu_trace_mesh() if name == "cuda" else contextlib.nullcontext():
      closed = jax.make_jaxpr(lambda *a, fn=fn: list(fn(*a)))(*structs)
    # Values the branch closes over (weights, tracers of the caller) become operands.
    jaxpr = jex.core.ClosedJaxpr(pe.convert_constvars_jaxpr(closed.jaxpr), ())
    branches.append((name, jaxpr, (len(operands), len(operands) + len(closed.consts))))
    operands += list(closed.consts)
  out_avals = tuple(branches[0][1].out_avals)
  for name, jaxpr, _ in branches[1:]:
    if [(a.shape, a.dtype) for a in jaxpr.out_avals] != [(a.shape, a.dtype) for a in out_avals]:
      raise ValueError(f"platform_switch: the {name!r} branch returns {jaxpr.out_avals}, the default "
                       f"{out_avals}.")
  return _switch_p.bind(*operands, branches=tuple(branches), n_args=len(args), out_avals=out_avals)


def dispatch(args, *, xla: Callable, tpu: Optional[Callable], gpu: Optional[Callable], backend: str,
             reference: Optional[Callable] = None):
  """Calls the implementation for ``backend`` ('auto' picks by lowering platform).

  ``args`` may hold ``None`` (absent optional operands). Kernel branches
  differentiate through ``reference`` (default ``xla``), which must take the
  operands as explicit arguments.
  """
  check_backend(backend)
  reference = reference or xla
  if backend == "xla":
    return xla(*args)
  if backend in ("tpu", "gpu"):
    kernel = tpu if backend == "tpu" else gpu
    if kernel is None:
      raise KernelUnsupported(f"no {backend.upper()} kernel for this problem")
    return with_reference_vjp(kernel, reference)(*args)
  branches = {name: fn for name, fn in (("tpu", tpu), ("cuda", gpu)) if fn is not None}
  if not branches:
    return xla(*args)
  present = [i for i, a in enumerate(args) if a is not None]

  def on_arrays(fn):
    def call(*arrays):
      full = list(args)
      for i, a in zip(present, arrays):
        full[i] = a
      return (fn(*full),)
    return call

  def switched(*full):
    arrays = [full[i] for i in present]
    per_platform = {name: on_arrays(fn) for name, fn in branches.items()}
    return platform_switch(*arrays, default=on_arrays(xla), **per_platform)[0]

  # Forward: the platform's kernel (XLA on CPU); backward: the XLA formulation's exact gradient.
  return with_reference_vjp(switched, xla)(*args)


@dataclasses.dataclass(frozen=True)
class NoBlocks:
  """Marker in a block table: this target cannot run the kernel."""
  reason: str
