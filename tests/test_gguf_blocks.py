"""GGML block bytes: jquant's codes and scales written as llama.cpp's blocks, read back, bit for bit."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant.gguf import blocks, types

_RNG = np.random.default_rng(1)
# Byte offsets of the float16 fields in each block (made finite in random blocks).
_F16_AT = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
           "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _gguf_dequantize(raw, name):
  return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])


@pytest.mark.parametrize("name", types.QUANT_TYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7)])
def test_written_blocks_equal_jquant_dequantized(name, shape):
  """For every type on odd shapes (rows, blocks per row): the gguf package's dequantization of the blocks
  written from a QArray equals jquant's dequantized weights bit for bit (float16 scales included)."""
  block = types.BLOCK[name][0]
  k, n = shape[1] * block, shape[0]
  w = jnp.asarray((_RNG.standard_normal((k, n)) * _RNG.uniform(0.001, 2.0, (1, n))).astype(np.float32))
  q = jquant.quantize(w, types.spec_for(name))
  raw = blocks.encode(name, blocks.from_qarray(q))
  assert raw.shape == (n, shape[1] * types.BLOCK[name][1]) and raw.nbytes == q.nbytes
  mine = np.asarray(jax.jit(jquant.dequantize)(q)).T
  np.testing.assert_array_equal(_gguf_dequantize(raw, name), mine)
  np.testing.assert_array_equal(np.asarray(jquant.dequantize(q)).T, mine)


@pytest.mark.parametrize("name", types.QUANT_TYPES)
def test_any_block_bytes_round_trip(name):
  """Random blocks (every bit pattern a file may hold, finite float16 fields): decode -> packed QArray
  dequantizes to the gguf package's values exactly, and encode(decode(raw)) == raw."""
  values, nbytes = types.BLOCK[name]
  rows, per_row = 5, 3
  raw = _RNG.integers(0, 256, (rows * per_row, nbytes), dtype=np.uint8)
  for at in _F16_AT[name]:
    raw[:, at:at + 2] = (_RNG.standard_normal(rows * per_row) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
  raw = raw.reshape(rows, per_row * nbytes)
  ref = _gguf_dequantize(raw, name)
  b = blocks.decode(name, raw)
  np.testing.assert_array_equal(blocks.encode(name, b), raw)
  for axis in (0, -1):
    q = blocks.to_qarray(name, b, axis=axis)
    assert q.nbytes == raw.nbytes  # packed at the file's own size
    deq = np.asarray(jax.jit(jquant.dequantize)(q))
    np.testing.assert_array_equal(deq.T if axis == 0 else deq, ref)


def test_gguf_quantizer_output_reads_back():
  """Blocks made by the gguf package's own quantizers (llama.cpp's reference for these types)."""
  w = (_RNG.standard_normal((4, 64)) * 0.1).astype(np.float32)
  for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[name])
    q = blocks.to_qarray(name, blocks.decode(name, raw), axis=-1)
    np.testing.assert_array_equal(np.asarray(jquant.dequantize(q)), _gguf_dequantize(raw, name))


def test_block_errors():
  with pytest.raises(ValueError, match="float type"):
    blocks.encode("F16", None)
  with pytest.raises(ValueError, match="not a multiple of Q4_K's 256-value blocks"):
    blocks.encode("Q4_K", blocks.Blocks(np.zeros((1, 96), np.int32), np.zeros((1, 3), np.int32)))
  with pytest.raises(ValueError, match="no GGML type's grid"):
    blocks.from_qarray(jquant.quantize(jnp.ones((64, 2)), jquant.QuantSpec(bits=4)))
  with pytest.raises(ValueError, match="IQ2_XS.*supported"):
    blocks.decode("IQ2_XS", np.zeros((1, 66), np.uint8))
