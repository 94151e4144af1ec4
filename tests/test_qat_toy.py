"""QAT on a toy Llama at 2 bits: lower loss than round-to-nearest PTQ; converted model agrees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jquant
import jquant.models
import jquant.qat as qat

V, T = 64, 33


def _markov_sampler():
  # Each token has 3 equally likely successors: the best achievable loss is log(3).
  succ = np.random.default_rng(0).integers(0, V, (V, 3))

  def sample(n, seed):
    r = np.random.default_rng(seed)
    x = np.zeros((n, T), np.int32)
    x[:, 0] = r.integers(0, V, n)
    for t in range(1, T):
      x[:, t] = succ[x[:, t - 1], r.integers(0, 3, n)]
    return jnp.asarray(x)

  return sample


def test_qat_2bit_beats_rtn_and_converts():
  cfg = jquant.models.LlamaConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
  m = jquant.models.llama_init(cfg, jax.random.key(0))
  sample = _markov_sampler()
  heldout = sample(64, 10_000)

  def loss_fn(p, tokens):
    logits = m.apply(p, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  evaluate = jax.jit(jquant.quantized(loss_fn))  # float, fake-quantized or packed trees alike

  # A float model trained on the task: the starting point of both PTQ and QAT.
  opt = optax.adam(3e-3)

  @jax.jit
  def float_step(p, o, b):
    l, g = jax.value_and_grad(loss_fn)(p, b)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o, l

  params, ostate = m.params, opt.init(m.params)
  for i in range(100):
    params, ostate, _ = float_step(params, ostate, sample(16, i))
  float_loss = float(evaluate(params, heldout))

  # Positive amax/1 scales: 2-bit RTN clearly hurts this model, so recovering from it is a real test of QAT
  # (the default signed scales lose less at 2 bits here).
  spec = jquant.QuantSpec(bits=2, granularity="group", group_size=32, symmetric_scale="max")
  rules = [jquant.Rule(r"(attn|mlp)/\w+/kernel$", spec)]
  rtn = jax.jit(lambda p: jquant.dequantize_params(jquant.quantize_params(p, rules)))(params)
  rtn_loss = float(evaluate(rtn, heldout))

  state = qat.init(params, rules)                       # scales start at RTN's
  qopt = qat.optimizer(weights=optax.adam(3e-3), scales=optax.adam(3e-3))
  step = qat.make_train_step(loss_fn, qopt)
  ts = qat.init_train_state(params, state, qopt)
  for i in range(40):
    ts, _ = step(ts, sample(16, 1000 + i))
  fq_loss = float(evaluate(jax.jit(qat.fake_quantize)(ts.params, ts.qat), heldout))
  packed = qat.convert(ts.params, ts.qat)
  qat_loss = float(evaluate(packed, heldout))

  print(f"float {float_loss:.4f} rtn {rtn_loss:.4f} qat {qat_loss:.4f} (fake-quant {fq_loss:.4f})")
  assert rtn_loss > float_loss + 0.3                     # 2-bit RTN hurts this model
  assert qat_loss < rtn_loss - 0.3                       # QAT recovers most of it
  assert abs(qat_loss - fq_loss) <= 1e-4 * fq_loss       # same weights; only summation order may differ
  assert jquant.footprint(packed).quantized_bits_per_weight <= 3.0   # 2-bit codes + one f32 scale per 32
