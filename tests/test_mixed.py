"""jquant.mixed: exact knapsack vs brute force, budgets, footprint agreement, Hessian layer loss vs NumPy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jquant
from jquant import mixed

SPEC = jquant.QuantSpec(bits=4)
_jit_quantize = jax.jit(jquant.quantize, static_argnums=1)


def _sens(cost, dmg):
  cost, dmg = np.asarray(cost, np.int64), np.asarray(dmg, np.float64)
  T, C = cost.shape
  dmg = np.where(cost >= 0, dmg, np.inf)
  return mixed.Sensitivity(tuple(f"w{t}" for t in range(T)), tuple(f"c{j}" for j in range(C)), dmg, cost,
                           np.full(T, 8, np.int64), tuple((SPEC,) * C for _ in range(T)))


def _brute(sens, budget):
  best = np.inf
  for pick in itertools.product(range(len(sens.names)), repeat=len(sens.paths)):
    c = sum(int(sens.nbytes[t, j]) for t, j in enumerate(pick))
    if min(sens.nbytes[t, j] for t, j in enumerate(pick)) < 0 or c > budget:
      continue
    best = min(best, sum(sens.damage[t, j] for t, j in enumerate(pick)))
  return best


instances = st.integers(2, 4).flatmap(lambda T: st.tuples(
    st.lists(st.lists(st.integers(1, 12), min_size=3, max_size=3), min_size=T, max_size=T),
    st.lists(st.lists(st.floats(0.0, 10.0), min_size=3, max_size=3), min_size=T, max_size=T),
    st.integers(0, 40)))


@settings(max_examples=25, deadline=None)
@given(instances)
def test_dp_is_exact_against_brute_force(inst):
  cost, dmg, extra = inst
  cost = np.asarray(cost) * 2  # a gcd of 2 to divide out
  sens = _sens(cost, dmg)
  budget = int(cost.min(axis=1).sum()) + extra
  opt = _brute(sens, budget)
  a = mixed.allocate(sens, bytes=budget, method="dp")
  assert a.nbytes <= budget and a.method == "dp" and a.exact
  assert a.damage == pytest.approx(opt, rel=1e-12, abs=1e-12)
  lg = mixed.allocate(sens, bytes=budget, method="lagrange")
  assert lg.nbytes <= budget
  assert lg.bound <= opt + 1e-9 <= lg.damage + 2e-9  # LP bound below the optimum, solution above it
  if lg.exact:
    assert lg.damage == pytest.approx(opt, rel=1e-12, abs=1e-12)


def test_inapplicable_candidates_and_monotone_budget():
  rng = np.random.default_rng(0)
  cost = rng.integers(1, 20, size=(6, 4)) * 3
  cost[0, 1] = cost[2, 3] = -1  # not applicable there
  dmg = rng.uniform(0, 5, size=(6, 4))
  sens = _sens(cost, dmg)
  lo = int(np.where(cost >= 0, cost, 10**9).min(axis=1).sum())
  prev = np.inf
  for budget in range(lo, lo + 90, 7):
    a = mixed.allocate(sens, bytes=budget)
    assert a.nbytes <= budget and a.damage <= prev + 1e-12  # more budget never more damage
    assert ("w0", "c1") not in a.choices and ("w2", "c3") not in a.choices
    assert a.damage == pytest.approx(_brute(sens, budget), rel=1e-12)
    prev = a.damage


def test_lagrange_exact_on_the_hull():
  # convex per-weight curves: every budget on a hull point is solved exactly
  cost = np.array([[2, 4, 8], [2, 4, 8], [2, 4, 8]])
  dmg = np.array([[8.0, 2.0, 1.0], [4.0, 1.0, 0.5], [16.0, 4.0, 1.0]])
  sens = _sens(cost, dmg)
  for budget in (6, 8, 10, 12, 16, 20, 24):
    lg = mixed.allocate(sens, bytes=budget, method="lagrange")
    assert lg.exact and lg.damage == pytest.approx(_brute(sens, budget))


def test_budget_errors():
  sens = _sens([[4, 8], [4, 8]], [[2.0, 1.0], [2.0, 1.0]])
  with pytest.raises(ValueError, match=r"below the smallest reachable size, 8 bytes \(4\.0000 bits/weight"):
    mixed.allocate(sens, bytes=7)
  with pytest.raises(ValueError, match="below the smallest reachable"):
    mixed.allocate(sens, bits_per_weight=3.9)
  with pytest.raises(ValueError, match="exactly one budget"):
    mixed.allocate(sens)
  with pytest.raises(ValueError, match="exactly one budget"):
    mixed.allocate(sens, bytes=8, bits_per_weight=4.0)
  with pytest.raises(ValueError, match=r"bits_per_weight=nan"):
    mixed.allocate(sens, bits_per_weight=float("nan"))
  with pytest.raises(ValueError, match="method='simplex'"):
    mixed.allocate(sens, bytes=8, method="simplex")
  with pytest.raises(ValueError, match="max_dp_cells"):
    mixed.allocate(sens, bytes=10**6, method="dp", max_dp_cells=100)
  assert mixed.budget_bytes(sens, bits_per_weight=5.0) == 10  # floor(5 * 16 / 8)


@pytest.fixture(scope="module")
def toy():
  cfg = jquant.models.LlamaConfig(vocab_size=96, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=128)
  m = jquant.models.llama_init(cfg, jax.random.key(0))
  calib = np.asarray(jax.random.randint(jax.random.key(1), (4, 16), 0, 96), np.int32)
  cands = {"int2 g32": jquant.QuantSpec(bits=2, symmetric=False, granularity="group", group_size=32),
           "int4 g32": jquant.QuantSpec(bits=4, granularity="group", group_size=32),
           "int3 g128": jquant.QuantSpec(bits=3, symmetric=False, granularity="group", group_size=128),
           "int8": jquant.QuantSpec(bits=8)}
  hs = mixed.hessians(m, calib, batch_size=2, progress=False)
  sens = mixed.measure(m.params, hs, cands, progress=False)
  return m, calib, hs, sens


def test_damage_is_the_layer_loss_under_h(toy):
  m, calib, hs, sens = toy
  _, xs = jquant.capture.capture_inputs(m.apply, m.params, jnp.asarray(calib))
  assert set(sens.paths) == set(xs) and "embed/embedding" in sens.paths  # tied head: the table is a matmul weight
  assert sens.nbytes[sens.paths.index("layers_0/attn/q/kernel"), sens.names.index("int3 g128")] == -1  # 64 inputs
  for path in ("layers_0/mlp/down/kernel", "embed/embedding"):
    t = sens.paths.index(path)
    x = np.asarray(xs[path], np.float64).reshape(-1, xs[path].shape[-1])
    w = np.asarray(m.params["layers_0"]["mlp"]["down"]["kernel"] if path.startswith("layers")
                   else m.params["embed"]["embedding"].T, np.float64)
    for j, name in enumerate(sens.names):
      if sens.nbytes[t, j] < 0:
        continue
      q = _jit_quantize(jnp.asarray(w if path.startswith("layers") else w.T, jnp.float32), sens.specs[t][j])
      qd = np.asarray(jquant.dequantize(q), np.float64)
      e = w - (qd if path.startswith("layers") else qd.T)
      ref = np.mean(np.sum((x @ e) ** 2, axis=1))  # mean_t ||x_t (W - Q)||^2
      assert sens.damage[t, j] == pytest.approx(ref, rel=2e-4), (path, name)
      assert sens.nbytes[t, j] == q.nbytes


def test_rules_meet_the_budget_as_footprint_measures_it(toy):
  m, calib, hs, sens = toy
  for bpw in (3.4, 4.6, 8.5):
    a = mixed.allocate(sens, bits_per_weight=bpw)
    qp = jquant.quantize_params(m.params, list(a.rules))
    fp = jquant.footprint(qp)
    q_bytes = sum(l.nbytes for l in fp.leaves if l.kind.startswith("int"))
    assert q_bytes == a.nbytes <= a.budget == int(bpw * sens.numel.sum() / 8)
    assert all(l.kind.startswith("int") for l in fp.leaves if l.path in sens.paths)
    assert abs(fp.quantized_bits_per_weight - a.bits_per_weight) < 1e-12
  assert "int8" in a.table() and "optimal" in str(a)


def test_deterministic_and_json_round_trip(toy):
  _, _, _, sens = toy
  again = mixed.Sensitivity.from_json(sens.to_json())
  assert again.paths == sens.paths and again.specs == sens.specs
  np.testing.assert_array_equal(again.damage, sens.damage)
  np.testing.assert_array_equal(again.nbytes, sens.nbytes)
  a, b = mixed.allocate(sens, bits_per_weight=4.2), mixed.allocate(again, bits_per_weight=4.2)
  assert a == b
  lg = mixed.allocate(sens, bits_per_weight=4.2, method="lagrange")
  assert lg == mixed.allocate(sens, bits_per_weight=4.2, method="lagrange") and lg.damage >= a.damage - 1e-9


def test_gguf_candidates_and_bad_inputs(toy):
  m, _, hs, _ = toy
  cands = mixed.gguf_candidates(("Q4_0", "Q4_K", "Q8_0"))
  sens = mixed.measure(m.params, {"layers_0/mlp/down/kernel": hs["layers_0/mlp/down/kernel"]}, cands, progress=False)
  assert sens.nbytes[0, 1] == -1  # 128 inputs: no 256-value blocks
  assert sens.nbytes[0, 0] == 128 * 64 // 32 * 18 and sens.nbytes[0, 2] == 128 * 64 // 32 * 34
  with pytest.raises(ValueError, match="F16 is a float type"):
    mixed.gguf_candidates(("F16",))
  with pytest.raises(ValueError, match="candidates is empty"):
    mixed.measure(m.params, hs, {}, progress=False)
  with pytest.raises(ValueError, match="no candidate"):
    mixed.measure(m.params, hs, {"k": mixed.gguf_candidates(("Q4_K",))["Q4_K"]}, progress=False)
  with pytest.raises(ValueError, match="params does not have"):
    mixed.measure(m.params, {"nope/kernel": hs["layers_0/mlp/down/kernel"]}, cands, progress=False)


def test_fisher_damage_against_numpy(toy):
  m, calib, hs, _ = toy

  def loss(p, x):
    logp = jax.nn.log_softmax(m.apply(p, x)[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))

  fs = mixed.fisher(loss, m.params, calib[:2], batch_size=1, include="down", progress=False)
  assert set(fs) == {"layers_0/mlp/down/kernel"}
  g = [np.asarray(jax.grad(loss)(m.params, jnp.asarray(calib[i:i + 1]))["layers_0"]["mlp"]["down"]["kernel"],
                  np.float64) for i in range(2)]
  np.testing.assert_allclose(fs["layers_0/mlp/down/kernel"], (g[0] ** 2 + g[1] ** 2) / 2, rtol=1e-4, atol=1e-12)  # float32 grads, jit vs eager
  spec = jquant.QuantSpec(bits=3, granularity="group", group_size=32)
  sens = mixed.measure(m.params, None, {"int3": spec}, fisher=fs, axes={"layers_0/mlp/down/kernel": (0,)},
                       progress=False)
  w = np.asarray(m.params["layers_0"]["mlp"]["down"]["kernel"], np.float64)
  qd = np.asarray(jquant.dequantize(_jit_quantize(jnp.asarray(w, jnp.float32), spec)), np.float64)
  ref = 0.5 * np.sum(np.asarray(fs["layers_0/mlp/down/kernel"], np.float64) * (w - qd) ** 2)
  assert sens.damage[0, 0] == pytest.approx(ref, rel=1e-4)
  with pytest.raises(ValueError, match="needs its contraction axes"):
    mixed.measure(m.params, None, {"int3": spec}, fisher=fs, progress=False)


def test_measure_rejects_a_list_of_specs_and_a_bad_fisher(toy):
  m = toy[0]
  path = "layers_0/attn/q/kernel"
  w = m.params["layers_0"]["attn"]["q"]["kernel"]
  with pytest.raises(TypeError, match=r"candidates is a list; allowed: a mapping"):
    mixed.measure(m.params, None, [jquant.QuantSpec(bits=4)], fisher={path: jnp.ones(w.shape)})
  with pytest.raises(ValueError, match=r"fisher holds negative values at \['layers_0/attn/q/kernel'\]"):
    mixed.measure(m.params, None, {"int4": jquant.QuantSpec(bits=4)}, fisher={path: -jnp.ones(w.shape)})
  with pytest.raises(ValueError, match=r"layers_0/attn/q/kernel"):
    mixed.measure(m.params, None, {"int4": jquant.QuantSpec(bits=4)}, fisher={path: jnp.full(w.shape, jnp.nan)})
