"""Pack/unpack round trips, exact, for every bit width (property tests)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jquant import packing


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), size=st.integers(1, 40), cols=st.integers(1, 3), axis=st.integers(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, size, cols, axis, seed):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2**bits, size=(size, cols) if axis == 0 else (cols, size)).astype(np.uint8)
  packed = packing.pack(codes, bits, axis)
  assert packed.dtype == jnp.uint8
  assert packed.shape[axis] == packing.packed_size(size, bits)
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, size, axis)), codes)


@pytest.mark.parametrize("bits,values,nbytes", [(2, 4, 1), (3, 8, 3), (4, 2, 1), (5, 1, 1), (8, 1, 1)])
def test_layout_density(bits, values, nbytes):
  assert packing.pack_unit(bits) == (values, nbytes)
  assert packing.packed_size(4096, bits) == 4096 * nbytes // values


def test_int4_nibble_order_is_documented_layout():
  codes = jnp.array([[1], [2], [3], [15]], jnp.uint8)
  np.testing.assert_array_equal(np.asarray(packing.pack(codes, 4, 0))[:, 0], [0x21, 0xF3])


def test_int3_bit_positions():
  codes = np.arange(8, dtype=np.uint8)[:, None]  # 0..7, 3 bits each
  word = sum(int(c) << (3 * i) for i, c in enumerate(codes[:, 0]))
  expected = [(word >> (8 * b)) & 0xFF for b in range(3)]
  np.testing.assert_array_equal(np.asarray(packing.pack(codes, 3, 0))[:, 0], expected)


def test_int2_bit_positions():
  codes = jnp.array([[3], [0], [1], [2]], jnp.uint8)
  assert int(packing.pack(codes, 2, 0)[0, 0]) == 3 | (0 << 2) | (1 << 4) | (2 << 6)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_every_symmetric_code_round_trips(bits, dense):
  """Symmetric codes -2^(b-1) .. 2^(b-1)-1 (all of them: the "half" and "signed" scale rules reach the lowest)
  survive the offset-binary payload bit for bit."""
  import jquant
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  codes = np.stack([np.arange(lo, hi + 1), np.arange(hi, lo - 1, -1)], axis=1)  # (2^b, 2), qmin in both
  spec = jquant.QuantSpec(bits=bits, dense_pack=dense, symmetric_scale="signed")
  q = jquant.QArray.from_codes(jnp.asarray(codes), -jnp.ones((1, 2)), None, spec)
  np.testing.assert_array_equal(np.asarray(q.codes()), codes)
  np.testing.assert_array_equal(np.asarray(jquant.dequantize(q)), -codes.astype(np.float32))
  if bits < 8:  # stored offset by 2^(b-1): the lowest code is 0
    stored = packing.unpack(q.qvalue, bits, 2**bits, 0, dtype=jnp.int32, dense=dense)
    np.testing.assert_array_equal(np.asarray(stored), codes - lo)
