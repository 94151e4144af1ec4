"""Generation with a KV cache (`jquant.generate`): exact greedy tokens, one compilation, sampling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import generate, models
from jquant.kvcache import KVCacheSpec

CFG = models.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)  # head_dim 16
PROMPTS = [[3, 9, 27, 17, 51, 25], [7, 8], [60, 1, 2, 5]]  # different lengths: left padding, per-row positions
N_NEW = 6


@pytest.fixture(scope="module")
def toy():
  return models.llama_init(CFG, jax.random.key(3))


@pytest.fixture(scope="module")
def w4(toy):
  rules = [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel",
                       jquant.QuantSpec(bits=4, granularity="group", group_size=16))]
  return jquant.quantize_params(toy.params, rules)


@pytest.mark.parametrize("which", ["float", "w4"])
def test_cache_greedy_equals_full_forward_greedy(toy, w4, which):
  params = toy.params if which == "float" else w4
  if which == "w4":
    assert isinstance(params["layers_0"]["attn"]["q"]["kernel"], jquant.QArray)
  before = dict(generate.TRACES)
  out = generate.generate(toy, params, PROMPTS, N_NEW)
  # One compilation of the prefill and one of the decode step served all N_NEW - 1 steps.
  assert generate.TRACES["prefill"] - before.get("prefill", 0) <= 1
  assert generate.TRACES["generate_step"] - before.get("generate_step", 0) <= 1
  np.testing.assert_array_equal(out.prompt_lengths, [6, 2, 4])
  want = [toy.generate_ids(params, p, N_NEW, buffer_len=6 + N_NEW) for p in PROMPTS]
  np.testing.assert_array_equal(out.tokens, np.asarray(want))
  # Same shapes again: no new trace.
  n = dict(generate.TRACES)
  generate.generate(toy, params, [p[::-1] for p in PROMPTS], N_NEW)
  assert dict(generate.TRACES) == n


@pytest.mark.parametrize("spec", [KVCacheSpec(bits=8, group_size=8),
                                  KVCacheSpec(bits=4, key_axis="channel", key_block=4)])
def test_decode_step_logits_equal_fake_quantized_full_forward(toy, spec):
  """Teacher-forced: each decode step's logits equal the full forward's with the cache's quantization."""
  seq = np.asarray([[5, 9, 33, 2, 40, 12, 7, 1, 60, 3]], np.int32)
  ref = np.asarray(jax.jit(generate.with_kv_fake_quant(toy, spec).apply)(toy.params, seq))[0]
  assert np.max(np.abs(ref - np.asarray(jax.jit(toy.apply)(toy.params, seq))[0])) > 1e-4  # the cache quantizes
  cache = generate.init_cache(toy, 1, seq.shape[1], spec)
  logits, cache = generate.prefill(toy, toy.params, seq[:, :1], np.zeros(1, np.int32), cache)
  got = [np.asarray(logits[0])]
  n0 = generate.TRACES["decode_step"]
  for i in range(1, seq.shape[1]):
    logits, cache = generate.decode_step(toy, toy.params, cache, seq[:, i])
    got.append(np.asarray(logits[0]))
  assert generate.TRACES["decode_step"] - n0 <= 1
  assert int(cache.length) == seq.shape[1]
  np.testing.assert_allclose(np.stack(got), ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  while int(cache.length) < cache.max_len:  # KIVI rounds the slots up to a multiple of key_block
    logits, cache = generate.decode_step(toy, toy.params, cache, seq[:, 0])
  with pytest.raises(ValueError, match="the cache is full"):
    generate.decode_step(toy, toy.params, cache, seq[:, 0])


def test_sampling_is_reproducible_and_top_k_1_is_greedy(toy):
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)) * 3, jnp.float32)
  key = jax.random.key(7)
  s = generate.Sampler(temperature=0.9, top_k=8, top_p=0.8)
  a, b = generate.sample(logits, key, s), generate.sample(logits, key, s)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  greedy = np.asarray(jnp.argmax(logits, -1))
  np.testing.assert_array_equal(np.asarray(generate.sample(logits, key, generate.Sampler(1.0, top_k=1))), greedy)
  np.testing.assert_array_equal(np.asarray(generate.sample(logits, key, generate.Sampler(1.0, top_p=1e-6))), greedy)
  # Draws over many keys stay inside the top-k and nucleus sets computed in float64.
  keys = jax.random.split(jax.random.key(1), 256)
  draws = np.asarray(jax.vmap(lambda k: generate.sample(logits, k, s))(keys))
  lg = np.asarray(logits, np.float64) / 0.9
  for r in range(4):
    order = np.argsort(-lg[r])[:8]
    p = np.exp(lg[r, order] - lg[r, order].max())
    p /= p.sum()
    nucleus = order[:int(np.searchsorted(np.cumsum(p), 0.8) + 1)]
    assert set(draws[:, r]) <= set(nucleus.tolist()) and len(set(draws[:, r])) > 1
  # Through generate: the same key gives the same tokens (the prefill compiled for the greedy test serves).
  kw = dict(temperature=1.5, key=jax.random.key(4))
  a = generate.generate(toy, toy.params, PROMPTS, N_NEW, **kw)
  np.testing.assert_array_equal(a.tokens, generate.generate(toy, toy.params, PROMPTS, N_NEW, **kw).tokens)
  assert a.tokens.min() >= 0 and a.tokens.max() < CFG.vocab_size


def test_stop_token_repeats_after_it_is_emitted(toy):
  g = generate.generate(toy, toy.params, PROMPTS, N_NEW).tokens
  out = generate.generate(toy, toy.params, PROMPTS, N_NEW, stop_token=int(g[0, 1])).tokens
  np.testing.assert_array_equal(out[0, :2], g[0, :2])
  assert (out[0, 1:] == g[0, 1]).all()
  rows = [r for r in range(3) if g[r, 1] != g[0, 1] and g[r, 0] != g[0, 1] and int(g[0, 1]) not in g[r]]
  for r in rows:  # rows that never emit the stop token are unchanged
    np.testing.assert_array_equal(out[r], g[r])


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[1, 2, 64]]), r"id outside the vocabulary \[0, 64\): 64"),
    (dict(prompts=[[1, -1]]), "outside the vocabulary"),
    (dict(prompts=[[1, 2], []]), "non-empty"),
    (dict(prompts=[[1.5, 2.0]]), "dtype float"),
    (dict(max_len=5), r"needs 7 cache slots, more than max_len=5"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=0.5), "needs key="),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=65), "top_k=65"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(kv_cache=KVCacheSpec(group_size=3)), "group_size=3 does not divide"),
    (dict(stop_token=99), "stop_token"),
])
def test_bad_input_raises_clear_errors(toy, kwargs, match):
  args = dict(prompts=[[1, 2, 3]], max_new_tokens=5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    generate.generate(toy, toy.params, args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_prefill_rejects_a_prompt_longer_than_the_cache(toy):
  cache = generate.init_cache(toy, 1, 4)
  with pytest.raises(ValueError, match="prompt length 6 exceeds the cache's max_len=4"):
    generate.prefill(toy, toy.params, np.ones((1, 6), np.int32), np.zeros(1, np.int32), cache)
  with pytest.raises(ValueError, match="pad="):
    generate.prefill(toy, toy.params, np.ones((1, 3), np.int32), np.asarray([3]), cache)
  with pytest.raises(TypeError, match="Llama-style"):
    generate.generate(object(), None, [[1]], 2)


def test_key_must_be_a_prng_key():
  m = models.llama_init(models.LlamaConfig(), jax.random.key(0))
  with pytest.raises(TypeError, match=r"key=0; allowed: a PRNG key"):
    generate.generate(m, m.params, [[1, 2, 3]], 4, temperature=1.0, key=0)


def test_cached_decode_keeps_sliding_windows_and_gemma3_options():
  """Gemma 3's options (window 3 on two of three layers, q/k norms, post-norms, GeGLU): each cached decode step's
  logits equal the full forward's at that position, past the window, with a left-padded row in the batch."""
  cfg = models.LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=32, head_dim=16,
                           activation="gelu_tanh", qk_norm=True, post_norms=True, embed_scale=True,
                           sliding_window=3, sliding_window_pattern=3, rope_local_theta=100.0, rope_theta=1e4)
  m = models.llama_init(cfg, jax.random.key(4))
  seq = np.asarray([[5, 9, 33, 2, 40, 12, 7, 1, 60, 3], [0, 0, 0, 8, 21, 34, 55, 13, 62, 4]], np.int32)
  pad = np.asarray([0, 3], np.int32)
  # Full forwards in one batch: row 1 without its left padding, right-padded instead (causal: inert).
  unpadded = np.stack([seq[0], np.concatenate([seq[1, 3:], np.zeros(3, np.int32)])])
  apply = jax.jit(lambda c, p, t: models.Model(c, p).apply(p, t), static_argnums=0)
  full = np.asarray(apply(cfg, m.params, unpadded))
  cache = generate.init_cache(m, 2, seq.shape[1], None)
  logits, cache = generate.prefill(m, m.params, seq[:, :4], pad, cache)
  got = [np.asarray(logits)]
  for i in range(4, seq.shape[1]):
    logits, cache = generate.decode_step(m, m.params, cache, seq[:, i])
    got.append(np.asarray(logits))
  got = np.stack(got, axis=1)  # (2, 7, V): positions 3..9 of row 0, 0..6 of row 1
  np.testing.assert_allclose(got[0], full[0, 3:], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got[1], full[1, :7], rtol=2e-5, atol=2e-5)
  import dataclasses
  no_window = np.asarray(apply(dataclasses.replace(cfg, sliding_window=10**6), m.params, unpadded))  # wider than T
  assert np.max(np.abs(no_window[0] - full[0])) > 1e-3  # the window changes these logits


def test_flat_or_text_prompts_are_refused():
  """New user: generate(m, p, [1, 2, 3]) silently ran three one-token prompts; text gave a dtype error."""
  with pytest.raises(ValueError, match=r"prompts=\[1, 2, 3\] is one flat list of ints; .* pass \[ids\]"):
    generate.left_pad([1, 2, 3])
  with pytest.raises(TypeError, match="prompts are text; allowed: token ids. Tokenize first"):
    generate.left_pad("hello")
  with pytest.raises(TypeError, match="prompts are text"):
    generate.left_pad(["a", "b"])
