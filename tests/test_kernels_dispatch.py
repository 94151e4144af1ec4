"""qdot dispatch: kernels where the lowering platform has them, XLA elsewhere; models; the benchmark."""

import os
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # before libtpu loads (see kernel_test_base)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jquant  # noqa: E402
from kernel_test_base import MOSAIC_CALL, TRITON_CALL, exported_text, on_device, topology_device  # noqa: E402
from pallas_kernels import tpu_target  # noqa: E402


@pytest.fixture(scope="module")
def toy():
  from jquant.models import LlamaConfig, llama_init
  cfg = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, dtype="bfloat16")
  return llama_init(cfg, jax.random.key(0))


def _quantized(model, spec):
  return jquant.quantize_params(model.params, [jquant.Rule(r"(attn|mlp)/\w+/kernel$", spec)])


def _count(text, call):
  return text.count(f'"{call}"') or text.count(call)


@pytest.mark.parametrize("bits", [4, 8])
def test_model_with_packed_weights_exports_kernels_per_platform(toy, bits):
  """Each of the 2 x 7 Dense layers becomes one kernel call for TPU and for CUDA; none under force_xla."""
  qp = _quantized(toy, jquant.QuantSpec(bits=bits, granularity="group", group_size=64))
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  structs = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), qp), tokens)
  tpu_text = exported_text(toy.apply, structs, "tpu")
  cuda_text = exported_text(toy.apply, structs, "cuda")
  assert tpu_text.count(MOSAIC_CALL) == 14 and TRITON_CALL not in tpu_text
  assert cuda_text.count(TRITON_CALL) == 14 and MOSAIC_CALL not in cuda_text
  if bits == 4:
    with jquant.ops.force_xla():
      assert MOSAIC_CALL not in exported_text(toy.apply, structs, "tpu")


def test_model_on_cpu_is_the_xla_path_bit_for_bit(toy):
  """On CPU qdot's default branch is exactly the XLA formulation (dequantize, then dot)."""
  qp = _quantized(toy, jquant.QuantSpec(bits=4, granularity="group", group_size=64))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, toy.config.vocab_size)
  fn = jax.jit(toy.apply)
  with jquant.ops.force_xla():
    want = fn(qp, tokens)
  got = fn(qp, tokens)  # same jitted function: the context is part of the cache key
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert bool(jnp.all(jnp.isfinite(got)))


def test_model_with_packed_weights_compiles_for_tpu_v5e(toy):
  """Full Mosaic compilation of the whole quantized model for a v5e chip, on this CPU host."""
  qp = _quantized(toy, jquant.QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64))
  dev = topology_device("v5e")
  structs = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), qp),
             jax.ShapeDtypeStruct((2, 16), jnp.int32))
  with tpu_target("v5e"):
    lowered = jax.jit(toy.apply).lower(*on_device(structs, dev))
    assert lowered.as_text().count(MOSAIC_CALL) == 14
    assert lowered.compile() is not None


def test_w8a8_weight_routes_to_the_kernel_and_matches_xla_on_cpu():
  w = jax.random.normal(jax.random.key(2), (192, 96))
  q = jquant.quantize(w, jquant.QuantSpec(bits=8, granularity="channel"))
  ww = jquant.ops.W8A8Weight(q)
  x = jax.random.normal(jax.random.key(3), (3, 5, 192), jnp.bfloat16)
  s = jax.ShapeDtypeStruct(x.shape, x.dtype)
  assert MOSAIC_CALL in exported_text(lambda a: jquant.ops.qdot(a, ww), (s,), "tpu")
  assert TRITON_CALL in exported_text(lambda a: jquant.ops.qdot(a, ww), (s,), "cuda")
  with jquant.ops.force_xla():
    want = jquant.ops.qdot(x, ww)
  np.testing.assert_array_equal(np.asarray(jquant.ops.qdot(x, ww)), np.asarray(want))


def test_layouts_without_kernels_stay_on_xla():
  """3-bit payloads (no kernel) lower to plain XLA even for TPU."""
  q = jquant.quantize(jnp.ones((128, 64)), jquant.QuantSpec(bits=3, granularity="group", group_size=64))
  s = jax.ShapeDtypeStruct((4, 128), jnp.bfloat16)
  assert MOSAIC_CALL not in exported_text(lambda a: jquant.ops.qdot(a, q), (s,), "tpu")


def test_bench_smoke_runs_in_interpret_mode(tmp_path, monkeypatch):
  """experiments/bench_kernels.py --interpret --small: every variant runs, is checked and lands in $OUT."""
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "bench_kernels.py")
  spec = importlib.util.spec_from_file_location("bench_kernels", path)
  mod = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, "bench_kernels", mod)  # dataclasses resolve annotations there
  spec.loader.exec_module(mod)
  monkeypatch.setenv("OUT", str(tmp_path))
  b = mod.main(["--interpret", "--small"])
  kernels = [r for r in b.rows if r.impl.startswith("pallas")]
  assert {r.case.split()[0] for r in kernels} == {"W8A8", "W4A16"}
  assert all(not r.note and r.rel_err < 1e-2 for r in kernels), [(r.case, r.impl, r.note) for r in b.rows]
  text = (tmp_path / "bench_kernels.md").read_text()
  assert "| W4A16 M=4" in text and "pallas (table)" in text and "pallas W (N,K)" in text


def test_gradients_flow_through_kernels_via_the_xla_reference():
  """Kernels have no transpose rule: qdot's backward is the XLA reference's, on every platform."""
  w = jax.random.normal(jax.random.key(4), (256, 128))
  q = jquant.quantize(w, jquant.QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64))
  x = jax.random.normal(jax.random.key(5), (4, 256), jnp.bfloat16)
  loss = lambda a: jquant.ops.qdot(a, q).astype(jnp.float32).sum()  # noqa: E731
  s = jax.ShapeDtypeStruct(x.shape, x.dtype)
  assert MOSAIC_CALL in exported_text(jax.value_and_grad(loss), (s,), "tpu")
  assert TRITON_CALL in exported_text(jax.value_and_grad(loss), (s,), "cuda")
  with jquant.ops.force_xla():
    want = jax.grad(loss)(x)
  np.testing.assert_array_equal(np.asarray(jax.grad(loss)(x)), np.asarray(want))
