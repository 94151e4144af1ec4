"""Observers: merge associativity, psum-ability over a mesh, and the ranges they produce."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import observers as O

try:
  from jax import shard_map as _shard_map  # jax >= 0.7
except ImportError:  # pragma: no cover
  from jax.experimental.shard_map import shard_map as _shard_map

_P = jax.sharding.PartitionSpec

ALL = [
    O.MinMaxObserver("tensor"), O.MinMaxObserver("channel"),
    O.MovingAverageMinMaxObserver("tensor", averaging_constant=0.2),
    O.MovingAverageMinMaxObserver("channel", averaging_constant=0.2),
    O.PercentileObserver("tensor", percentile=99.0), O.PercentileObserver("channel", percentile=99.0),
    O.MSEObserver("tensor"), O.MSEObserver("channel"),
]
IDS = [f"{type(o).__name__}-{o.granularity}" for o in ALL]


def _data(n=8):
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (n, 16, 24)) * jnp.linspace(0.1, 3.0, 24)
  return x.at[0, 0, 5].set(300.0)  # an attention-sink-like outlier


def _assert_states_equal(a, b, exact):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if exact:
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    else:  # EMA: float rounding of d^n products only
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=0)


def _exact(obs):
  return not isinstance(obs, O.MovingAverageMinMaxObserver)


@pytest.mark.parametrize("obs", ALL, ids=IDS)
def test_two_halves_equal_the_whole(obs):
  x = _data()
  batches = [obs.observe(x[i]) for i in range(x.shape[0])]
  seq = obs.init(x.shape)
  for b in batches:  # sequential updates, one batch at a time
    seq = obs.merge(seq, b)
  first = functools.reduce(obs.merge, batches[:4])
  second = functools.reduce(obs.merge, batches[4:])
  _assert_states_equal(obs.merge(first, second), seq, _exact(obs))
  # Three-way regrouping: (a.b).c == a.(b.c)
  a, b, c = (functools.reduce(obs.merge, batches[i:j]) for i, j in ((0, 3), (3, 5), (5, 8)))
  _assert_states_equal(obs.merge(obs.merge(a, b), c), obs.merge(a, obs.merge(b, c)), _exact(obs))
  if _exact(obs):  # order-free observers: one observation of everything == merged halves
    _assert_states_equal(obs.observe(x), obs.merge(obs.observe(x[:4]), obs.observe(x[4:])), True)


@pytest.mark.parametrize("obs", ALL, ids=IDS)
def test_sharded_update_equals_whole_batch(obs, cpu_mesh):
  """A batch split over 8 devices, merged with collectives, gives the state of the whole batch."""
  x = _data()
  state0 = obs.observe(x[:1])  # a non-empty running state, replicated

  @functools.partial(_shard_map, mesh=cpu_mesh, in_specs=(_P(), _P("data")), out_specs=_P())
  def sharded(state, xs):
    return obs.update(state, xs, axis_name="data")

  got = jax.jit(sharded)(state0, x)
  _assert_states_equal(got, obs.update(state0, x), exact=_exact(obs))


def test_minmax_and_percentile_values():
  x = _data()
  mm = O.MinMaxObserver()
  assert float(mm.amax(mm.observe(x))) == 300.0
  ch = O.MinMaxObserver("channel")
  np.testing.assert_array_equal(np.asarray(ch.amax(ch.observe(x))), np.abs(np.asarray(x)).max(axis=(0, 1)))
  # Percentile 100 is min-max; a lower percentile lies within one log bin above the exact order statistic.
  p100 = O.PercentileObserver(percentile=100.0)
  assert float(p100.amax(p100.observe(x))) == 300.0
  p = O.PercentileObserver(percentile=99.0)
  got = float(p.amax(p.observe(x)))
  exact = float(np.quantile(np.abs(np.asarray(x)).ravel(), 0.99, method="inverted_cdf"))
  assert exact <= got <= exact * 2 ** (1 / p.bins_per_octave) * (1 + 1e-6)


def _int8_error(x, c):
  s = c / 127.0
  return float(np.sum((x - np.clip(np.round(x / s), -127, 127) * s) ** 2))


@pytest.mark.parametrize("tail", [0, 20, 400])
def test_mse_range_is_near_the_true_optimum(tail):
  """The histogram estimate picks a clip whose true int8 error is within 5% of a brute-force optimum."""
  key1, key2 = jax.random.split(jax.random.key(1))
  x = np.asarray(jax.random.normal(key1, (20000,)), np.float64)
  x[:tail] = np.asarray(jax.random.uniform(key2, (tail,), minval=20.0, maxval=40.0))
  mse = O.MSEObserver()
  c = float(mse.amax(mse.observe(jnp.asarray(x, jnp.float32))))
  grid = np.geomspace(0.5, np.abs(x).max(), 2000)
  best = min(_int8_error(x, g) for g in grid)
  assert _int8_error(x, c) <= 1.05 * best


def test_moving_average_is_the_bias_corrected_ema():
  obs = O.MovingAverageMinMaxObserver(averaging_constant=0.3)
  vals = [1.0, 5.0, 2.0, 7.0]
  s = obs.init((1,))
  for v in vals:
    s = obs.update(s, jnp.array([v, -0.5 * v]))
  d = 0.7
  ref = sum(d ** (3 - i) * v for i, v in enumerate(vals)) / sum(d ** (3 - i) for i in range(4))
  np.testing.assert_allclose(float(obs.amax(s)), ref, rtol=1e-6)


def test_histogram_bins_are_exact_powers_of_two():
  obs = O.PercentileObserver(min_exp=-4, max_exp=4, bins_per_octave=4)
  idx = np.asarray(obs.bin_index(jnp.array([0.0, 2.0 ** -10, 1.0, 1.0 - 1e-7, 2.0 ** 4, 1e9])))
  # 0 and underflow -> bin 0; 1.0 starts octave 4 (4 bins per octave); overflow -> last bin.
  assert idx.tolist() == [0, 0, 16, 15, 31, 31]


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="granularity='row'"):
    O.MinMaxObserver("row")
  with pytest.raises(ValueError, match="percentile=0"):
    O.PercentileObserver(percentile=0)
  with pytest.raises(ValueError, match="averaging_constant=2"):
    O.MovingAverageMinMaxObserver(averaging_constant=2)
  with pytest.raises(ValueError, match="name='kl'"):
    O.observer_by_name("kl")
