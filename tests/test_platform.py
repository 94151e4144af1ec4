"""The platform: libtpu matched to jax and kept out of the venv; a quiet start-up."""

import importlib.metadata
import os
import subprocess
import sys

from packaging.requirements import Requirement

import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_libtpu_for_ahead_of_time_compilation_matches_jax():
  """`make tpu-aot` installs the libtpu that jax[tpu] of the pinned jax asks for."""
  wanted = [Requirement(r) for r in importlib.metadata.requires("jax") or []]
  wanted = [r for r in wanted if r.name == "libtpu" and r.marker and r.marker.evaluate({"extra": "tpu"})]
  assert wanted, "jax declares no libtpu requirement for its 'tpu' extra"
  found = list(importlib.metadata.distributions(path=[conftest.LIBTPU_AOT]))
  assert found, f"no libtpu in {conftest.LIBTPU_AOT}: run `make tpu-aot`"
  version = found[0].version
  assert wanted[0].specifier.contains(version), f"libtpu {version} does not satisfy jax's {wanted[0]}"


def test_libtpu_is_not_importable_from_the_venv():
  """Nothing a CPU or GPU user runs may load libtpu (it prints TPU errors on stderr)."""
  out = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('libtpu'))"],
                       capture_output=True, text=True, env=_user_env(), check=True)
  assert out.stdout.strip() == "None"


def _user_env():
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "TPU_LIBRARY_PATH", "XLA_FLAGS", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
  env["PYTHONPATH"] = REPO
  return env


def test_a_quantized_matmul_prints_nothing_on_stderr():
  """What a new user runs first: import, quantize, a jitted qdot and a multi-platform export."""
  code = (
      "import jax, jax.numpy as jnp, jquant\n"
      "w = jax.random.normal(jax.random.key(0), (256, 128))\n"
      "q = jquant.quantize(w, jquant.QuantSpec(bits=4, granularity='group', group_size=128))\n"
      "y = jax.jit(jquant.ops.qdot)(jnp.ones((2, 256)), q)\n"
      "e = jquant.export.export(jquant.ops.qdot)(jax.ShapeDtypeStruct((2, 256), jnp.float32), q)\n"
      "print(y.shape, e.platforms)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_user_env(),
                       cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "(2, 128) ('cpu', 'tpu', 'cuda')"
  assert out.stderr == ""
