"""Determinism: the same inputs and seeds give bit-identical GPTQ, AWQ, SmoothQuant and QAT results.

Each method runs on one toy Llama twice in this process and once more in a
second process (one subprocess runs all four and prints the SHA-256 of every
result tree; it gets another ``PYTHONHASHSEED``, so an order that depends on
string hashing, such as iterating a set of paths, would show). Hashes cover
every array leaf's dtype, shape and bytes and the tree structure, so packed
codes, scales, smoothed weights, learned scales and optimizer-free results
must agree bit for bit.

Run ``python tests/test_determinism.py`` to print the hashes.
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jquant
from jquant import awq, gptq, models, observers, qat
from jquant import smoothquant as sq
from jquant.calibrate import W8A8Spec, calibrate

CFG = models.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=32)
KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel"
SPEC = jquant.QuantSpec(bits=4, granularity="group", group_size=16)


def tree_hash(tree) -> str:
  """SHA-256 of a pytree's structure and of every leaf's dtype, shape and bytes."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  h = hashlib.sha256(str(treedef).encode())
  for leaf in leaves:
    a = np.asarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def toy() -> models.Model:
  return models.llama_init(CFG, jax.random.key(0))


def results(m) -> dict:
  """``{method: hash}`` of GPTQ, AWQ, SmoothQuant and QAT on the toy model ``m``."""
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 16)).astype(np.int32)
  rules = [jquant.Rule(KERNELS, SPEC)]
  out = {}
  q, report = gptq.quantize_model(m, None, tokens, rules, batch_size=2, act_order=True, return_report=True,
                                  progress=False)
  out["gptq"] = tree_hash((q, [(l.path, l.loss, l.rtn_loss) for l in report.layers]))
  q, scaled = awq.quantize_model(m, None, tokens, rules, n_grid=4, clip_grid=4, batch_size=2, progress=False,
                                 return_scaled_float=True)
  out["awq"] = tree_hash((q, scaled.scales, [(r.group, r.alpha, r.error) for r in scaled.reports]))
  stats = calibrate(m, None, tokens, [jquant.Rule(KERNELS, W8A8Spec())],
                    observer=observers.MinMaxObserver("channel"), batch_size=2, progress=False)
  alphas = sq.search_alpha(m, None, tokens, stats.amax(), alphas=(0.3, 0.6), batch_size=2, progress=False)
  smoothed, factors = sq.smooth(m, None, tokens, stats.amax(), alphas)
  out["smoothquant"] = tree_hash((smoothed, factors, sorted(alphas.items())))
  state = qat.init(m.params, rules)
  opt = qat.optimizer(weights=optax.adam(1e-3), scales=optax.adam(1e-3))

  def loss(p, t):
    logits = m.apply(p, t[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

  step = qat.make_train_step(loss, opt)
  ts = qat.init_train_state(m.params, state, opt)
  for i in range(3):
    ts, _ = step(ts, jnp.asarray(tokens[i % 2 * 2:i % 2 * 2 + 2]))
  out["qat"] = tree_hash((qat.convert(ts.params, ts.qat), ts.params, ts.qat))
  return out


@pytest.fixture(scope="module")
def runs():
  # The second process starts first and runs while this one computes.
  env = dict(os.environ, PYTHONHASHSEED="12345")
  child = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=os.path.dirname(__file__))
  try:
    m = toy()  # one model object: the second run reuses the traced programs and compiled steps
    first, second = results(m), results(m)
    out, err = child.communicate(timeout=300)
  finally:
    if child.poll() is None:
      child.kill()
  assert child.returncode == 0, err[-2000:]
  return first, second, json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant", "qat"])
def test_same_inputs_give_bit_identical_results(runs, method):
  first, second, other_process = runs
  assert first[method] == second[method], f"{method}: two runs in one process differ"
  assert first[method] == other_process[method], f"{method}: a second process gives another result"


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import conftest  # noqa: F401  (the test session's XLA/JAX settings, before anything runs)
  print(json.dumps(results(toy())))
