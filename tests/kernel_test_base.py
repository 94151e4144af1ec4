"""Shared checks for the Pallas kernels (one subclass per kernel).

A kernel test class names its problems (``CASES``) and says how to build
inputs, run the kernel on a backend, compute a float64 (or int64) reference
and bound the error. The base class turns that into the common checks:

* the kernel in interpret mode on every backend against the reference;
* ``jax.export`` for ``["tpu"]`` and ``["cuda"]`` emits the kernel's custom call;
* full Mosaic compilation for TPU v5e and v6e on this CPU host (libtpu's
  compile-only topologies).

``pytest_generate_tests`` below parametrizes ``case``, ``backend``,
``platform`` and ``generation`` from the class attributes.
"""

from __future__ import annotations

import os

# libtpu takes a lock file per process; several test processes (xdist) and
# other jobs on the host must be able to load it side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import functools  # noqa: E402
import zlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import export  # noqa: E402
from jax.experimental import topologies  # noqa: E402

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "tpu_custom_call"
# (topology name for get_topology_desc, generation name of the block tables)
TOPOLOGIES = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v4": "v4:2x2x1", "v5p": "v5p:2x2x1", "v7": "tpu7x:2x2x1"}


def pytest_generate_tests(metafunc):
  cls = metafunc.cls
  if cls is None:
    return
  for name, attr in (("case", "CASES"), ("backend", "BACKENDS"), ("platform", "EXPORT_PLATFORMS"),
                     ("generation", "COMPILE_GENERATIONS"), ("compile_case", "COMPILE_CASES")):
    if name in metafunc.fixturenames:
      values = list(getattr(cls, attr))
      metafunc.parametrize(name, values, ids=[str(v) for v in values])


def libtpu_available() -> bool:
  """Whether JAX can load libtpu (`make tpu-aot` puts it in .venv/libtpu-aot; conftest points at it)."""
  from jax._src import cloud_tpu_init
  return cloud_tpu_init.get_tpu_library_path() is not None


@functools.lru_cache(maxsize=None)
def topology_device(generation: str):
  """One compile-only device of a TPU ``generation`` (needs libtpu, no TPU)."""
  import pytest
  if not libtpu_available():
    pytest.skip("libtpu is not installed: `make tpu-aot` installs it into .venv/libtpu-aot")
  topo = topologies.get_topology_desc(topology_name=TOPOLOGIES[generation], platform="tpu")
  return topo.devices[0]


def on_device(structs, device):
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), structs)


def exported_text(fn, structs, platform: str) -> str:
  exp = export.export(jax.jit(fn), platforms=[platform],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*structs)
  return exp.mlir_module()


def float_bound(abs_product, ref, k: int, out_eps: float, weight_eps: float = 0.0):
  """Worst-case error of a float32-accumulated product, from the arithmetic.

  ``abs_product`` is ``|x| @ |w|`` in float64. Accumulating K products in
  float32 errs by at most ``(K + 2) u32 * |x||w|`` (u32 = 2^-24, plus the scale
  multiply); weights rounded to a format with unit roundoff ``weight_eps`` add
  ``weight_eps * |x||w|``; the final cast adds ``out_eps * |ref|``.
  """
  u32 = 2.0 ** -24
  return out_eps * np.abs(ref) + ((k + 2) * u32 + weight_eps) * abs_product * (1 + 1e-6) + 1e-30


class KernelTestBase:
  """Common checks; subclasses fill in the hooks and the class attributes."""

  BACKENDS = ("gpu", "tpu")
  EXPORT_PLATFORMS = ("tpu", "cuda")
  COMPILE_GENERATIONS = ("v5e", "v6e")
  CASES = ()
  COMPILE_CASES = ()

  # --- hooks -------------------------------------------------------------
  def make(self, case, rng):
    """Concrete inputs (a tuple of arrays) for ``case``."""
    raise NotImplementedError

  def run(self, args, case, backend: str, **kw):
    """The kernel on ``backend`` ('gpu' | 'tpu' | 'auto' | 'xla') with ``kw`` (e.g. interpret=True)."""
    raise NotImplementedError

  def check(self, out, args, case, backend: str):
    """Assert ``out`` against the high-precision reference."""
    raise NotImplementedError

  def structs(self, case):
    """Abstract inputs (ShapeDtypeStructs) for export/compile."""
    args = self.make(case, np.random.default_rng(0))
    return tuple(None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)

  # --- common checks -------------------------------------------------------
  def test_interpret_matches_reference(self, case, backend):
    rng = np.random.default_rng(zlib.crc32(f"{case}{backend}".encode()))
    args = self.make(case, rng)
    out = jax.jit(lambda *a: self.run(a, case, backend, interpret=True))(*args)
    self.check(np.asarray(out), args, case, backend)

  def test_export_carries_kernel(self, platform):
    case = self.CASES[0]
    text = exported_text(lambda *a: self.run(a, case, "auto"), self.structs(case), platform)
    assert (MOSAIC_CALL if platform == "tpu" else TRITON_CALL) in text
    other = TRITON_CALL if platform == "tpu" else MOSAIC_CALL
    assert other not in text

  def test_tpu_compile(self, compile_case, generation):
    from pallas_kernels import tpu_target
    dev = topology_device(generation)
    with tpu_target(generation):
      fn = jax.jit(lambda *a: self.run(a, compile_case, "tpu"))
      compiled = fn.lower(*on_device(self.structs(compile_case), dev)).compile()
    assert compiled is not None
