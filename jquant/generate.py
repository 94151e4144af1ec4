"""Generation with a KV cache: prefill, one-token decode steps, greedy and sampled decoding.

For jquant's Llama-style decoders (`jquant.models.Model`). The cache
(`jquant.kvcache.KVCache`) has static shapes, so `prefill` compiles once per
prompt shape and `decode_step` once for all steps. Parameters may hold any
jquant leaf (packed `QArray`, `W8A8Weight`, ...): the model runs through
`jquant.quantized`, so every decode matmul is a `jquant.ops.qdot` (Pallas
kernels on GPU/TPU where they apply). The cache may be float or quantized
(`jquant.kvcache.KVCacheSpec`: int8/int4, per-token or KIVI).

Prompts of different lengths are left-padded to one length P: every row
writes the same cache slot at each step; row b's prompt starts at slot
``pad[b]``, its RoPE positions count from there, and attention never sees
slots before it.

Sampling follows the usual order: logits / temperature, then top-k, then
top-p (nucleus: the smallest set of most likely tokens whose probability
reaches ``top_p``), then a categorical draw with ``jax.random.fold_in(key,
step)``. ``temperature=0`` is greedy (argmax, first index on ties).

Example:
    >>> import jax, jquant
    >>> from jquant import generate, kvcache, models
    >>> m = models.llama_init(models.LlamaConfig(), jax.random.key(0))
    >>> out = generate.generate(m, m.params, [[1, 2, 3], [4, 5]], max_new_tokens=4)
    >>> out.tokens.shape                                  # (batch, max_new_tokens) int32
    (2, 4)
    >>> out = generate.generate(m, m.params, [[1, 2, 3]], 4, kv_cache=kvcache.KVCacheSpec(bits=8),
    ...                         temperature=0.8, top_p=0.9, key=jax.random.key(1))
    >>> # A research loop: prefill, then one step at a time.
    >>> tokens, pad = generate.left_pad([[1, 2, 3], [4, 5]])
    >>> cache = generate.init_cache(m, batch=2, max_len=16)
    >>> logits, cache = generate.prefill(m, m.params, tokens, pad, cache)
    >>> logits, cache = generate.decode_step(m, m.params, cache, logits.argmax(-1))
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jquant import kvcache
from jquant.intercept import quantized
from jquant.kvcache import KVCache, KVCacheSpec
from jquant.tokens import check_token_ids

# How many times each jitted function was traced (a Python side effect runs once per trace).
TRACES: collections.Counter = collections.Counter()


class Sampler(NamedTuple):
  """Decoding rule (static: each distinct value compiles once).

  Attributes:
    temperature: 0 for greedy; > 0 divides the logits.
    top_k: Keep the k most likely tokens (None: all).
    top_p: Keep the smallest most-likely set with probability >= top_p (1: all).
  """

  temperature: float = 0.0
  top_k: Optional[int] = None
  top_p: float = 1.0


class GenerateResult(NamedTuple):
  """What `generate` returns.

  Attributes:
    tokens: int32 (B, max_new_tokens) new ids per prompt (after ``stop_token``: ``stop_token``).
    prompt_lengths: int (B,) prompt lengths.
    cache_bytes: Bytes of the KV cache arrays.
    prefill_seconds: Wall time of the prefill (includes its compilation on a first call).
    decode_seconds: Wall time of the decode steps (the first step's compilation excluded).
    decode_steps: Decode steps timed (``max(max_new_tokens - 2, 0)``: the
      first decode step compiles and is not timed); 0 means no timing.
  """

  tokens: np.ndarray
  prompt_lengths: np.ndarray
  cache_bytes: int
  prefill_seconds: float
  decode_seconds: float
  decode_steps: int


def _check_model(model, fn):
  from jquant.models.llama import LlamaConfig
  if not isinstance(getattr(model, "config", None), LlamaConfig):
    raise TypeError(f"{fn}: model must be a jquant.models.Model (Llama-style decoder); got {type(model).__name__}.")
  return model.config


def _check_int(v, name, fn, lo=1):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
    raise ValueError(f"{fn}: {name}={v!r}; allowed: an int >= {lo}.")
  return int(v)


def check_sampler(temperature, top_k, top_p, vocab: int, fn: str = "generate") -> Sampler:
  """A `Sampler` from the arguments; raises ValueError naming a bad one."""
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) or not (
      np.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"{fn}: temperature={temperature!r}; allowed: a finite float >= 0 (0 is greedy).")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                            or not 1 <= top_k <= vocab):
    raise ValueError(f"{fn}: top_k={top_k!r}; allowed: None or an int in 1..{vocab} (the vocabulary size).")
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.number)) or not 0 < top_p <= 1:
    raise ValueError(f"{fn}: top_p={top_p!r}; allowed: a float in (0, 1].")
  return Sampler(float(temperature), None if top_k is None else int(top_k), float(top_p))


def sample(logits, key, sampler: Sampler):
  """Next tokens (B,) int32 from logits (B, V) under ``sampler`` (see module docstring)."""
  if sampler.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  lg = logits.astype(jnp.float32) / sampler.temperature
  neg = jnp.finfo(jnp.float32).min
  if sampler.top_k is not None:
    kth = jax.lax.top_k(lg, sampler.top_k)[0][..., -1:]
    lg = jnp.where(lg < kth, neg, lg)
  if sampler.top_p < 1:
    srt = jnp.sort(lg, axis=-1)[..., ::-1]
    p = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # probability of the strictly more likely tokens
    cut = jnp.min(jnp.where(before < sampler.top_p, srt, jnp.inf), axis=-1, keepdims=True)
    lg = jnp.where(lg < cut, neg, lg)
  return jax.random.categorical(key, lg, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
  """Left-pads ragged prompts to one length.

  Args:
    prompts: B non-empty sequences of token ids (or an int (B, P) array: no padding).
    pad_id: Id written in padding slots (masked out; any valid id).

  Returns:
    ``(tokens, pad)``: int32 (B, P) with P the longest prompt, and int32 (B,)
    padding per row (row b's prompt is ``tokens[b, pad[b]:]``).

  Raises:
    ValueError: no prompts, an empty one, or one flat list of ints (one
      prompt must be wrapped: ``[ids]``).
    TypeError: text instead of token ids.
  """
  if isinstance(prompts, (np.ndarray, jax.Array)):
    a = np.asarray(prompts)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
      raise ValueError(f"left_pad: prompts array must be (batch >= 1, length >= 1); got shape {a.shape}.")
    return a, np.zeros(a.shape[0], np.int32)
  if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and any(isinstance(p, str) for p in prompts)):
    raise TypeError("left_pad: prompts are text; allowed: token ids. Tokenize first: "
                    "[model.tokenizer.encode(text).ids for text in texts].")
  if isinstance(prompts, (list, tuple)) and prompts and all(
      isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in prompts):
    raise ValueError(f"left_pad: prompts={list(prompts)[:8]}{'...' if len(prompts) > 8 else ''} is one flat list of "
                     "ints; allowed: a list of B prompts, each a sequence of token ids. For one prompt pass "
                     "[ids].")
  rows = [list(np.asarray(p).reshape(-1)) for p in prompts]
  if not rows or any(len(r) == 0 for r in rows):
    raise ValueError(f"left_pad: prompts must be >= 1 non-empty sequences of token ids; got lengths "
                     f"{[len(r) for r in rows]}.")
  n = max(len(r) for r in rows)
  tokens = np.full((len(rows), n), pad_id, dtype=np.asarray(rows[0]).dtype if rows[0] else np.int32)
  pad = np.zeros(len(rows), np.int32)
  for i, r in enumerate(rows):
    tokens[i, n - len(r):] = r
    pad[i] = n - len(r)
  return tokens, pad


def init_cache(model, batch: int, max_len: int, kv_cache: Optional[KVCacheSpec] = None) -> KVCache:
  """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated).

  Args:
    model: A `jquant.models.Model`.
    batch: Rows.
    max_len: Slots (rounded up to a multiple of ``kv_cache.key_block`` for KIVI keys).
    kv_cache: None (float, the model's compute dtype) or a `KVCacheSpec`.

  Raises:
    ValueError: bad ``batch``/``max_len``, or a spec whose group_size does not divide head_dim.
  """
  c = _check_model(model, "init_cache")
  batch = _check_int(batch, "batch", "init_cache")
  max_len = _check_int(max_len, "max_len", "init_cache")
  spec = kvcache.check_spec(kv_cache, c.head_dim, "init_cache")
  s = kvcache.padded_len(max_len, spec)
  layers = tuple(kvcache.init_layer(spec, batch, s, c.n_kv_heads, c.head_dim, jnp.dtype(c.dtype))
                 for _ in range(c.n_layers))
  return KVCache(layers, jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32), spec)


def _decode_fn(config):
  from jquant.models.llama import Transformer

  def fn(params, tokens, positions, cache, start):
    return Transformer(config).apply({"params": params}, tokens, positions, cache, start,
                                     method=Transformer.decode)
  return quantized(fn)


def _prefill_impl(config, params, tokens, pad, cache):
  TRACES["prefill"] += 1
  cache = cache.replace(pad=pad)
  pos = jnp.maximum(jnp.arange(tokens.shape[1])[None, :] - cache.pad[:, None], 0)
  return _decode_fn(config)(params, tokens, pos, cache, jnp.zeros((), jnp.int32))


def _step_impl(config, params, cache, tokens):
  TRACES["decode_step"] += 1
  pos = (cache.length - cache.pad)[:, None]
  return _decode_fn(config)(params, tokens[:, None], pos, cache, cache.length)


def _sample_step_impl(config, sampler, params, cache, tokens, done, key, step, stop):
  TRACES["generate_step"] += 1
  logits, cache = _step_impl(config, params, cache, tokens)
  nxt = sample(logits, jax.random.fold_in(key, step), sampler)
  nxt = jnp.where(done, stop, nxt)
  return nxt, done | (nxt == stop), cache


_prefill_jit = jax.jit(_prefill_impl, static_argnums=0, donate_argnums=4)
_step_jit = jax.jit(_step_impl, static_argnums=0, donate_argnums=2)
_sample_step_jit = jax.jit(_sample_step_impl, static_argnums=(0, 1), donate_argnums=3)
_first_jit = jax.jit(lambda sampler, logits, key: sample(logits, jax.random.fold_in(key, 0), sampler),
                     static_argnums=0)


def prefill(model, params, tokens, pad, cache: KVCache):
  """Runs the prompts through the model and writes their keys/values at slots ``0..P-1``.

  Args:
    model: A `jquant.models.Model`.
    params: Its parameters (float or holding quantized leaves).
    tokens: int (B, P) left-padded prompts (`left_pad`).
    pad: int (B,) left padding per row.
    cache: An empty `KVCache` from `init_cache` (B rows, >= P slots); donated.

  Returns:
    ``(logits, cache)``: float32 (B, V) logits of the last prompt token, the
    cache with ``length = P``.

  Raises:
    ValueError: ids outside the vocabulary, a shape that does not match the
      cache, a prompt longer than the cache, or bad padding.
  """
  c = _check_model(model, "prefill")
  tokens = check_token_ids(tokens, c.vocab_size, fn="prefill")
  pad = np.asarray(pad)
  b = cache.pad.shape[0]
  if tokens.ndim != 2 or tokens.shape[0] != b:
    raise ValueError(f"prefill: tokens must be (batch={b}, length) like the cache; got shape {tokens.shape}.")
  if tokens.shape[1] > cache.max_len:
    raise ValueError(f"prefill: prompt length {tokens.shape[1]} exceeds the cache's max_len={cache.max_len}; "
                     "make the cache with a larger max_len (init_cache).")
  if pad.shape != (b,) or not np.issubdtype(pad.dtype, np.integer) or np.any(pad < 0) or np.any(
      pad >= tokens.shape[1]):
    raise ValueError(f"prefill: pad={pad!r}; allowed: ints (batch={b},) in 0..{tokens.shape[1] - 1} "
                     "(each row keeps >= 1 prompt token).")
  return _prefill_jit(c, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(pad, jnp.int32), cache)


def decode_step(model, params, cache: KVCache, tokens):
  """One decode step: feeds ``tokens`` (B,) at slot ``cache.length``; one compilation for all steps.

  Returns:
    ``(logits, cache)``: float32 (B, V) next-token logits and the cache with
    ``length + 1`` (the input cache is donated).

  Raises:
    ValueError: the cache is full, or ids outside the vocabulary / a wrong shape.
  """
  c = _check_model(model, "decode_step")
  tokens = check_token_ids(tokens, c.vocab_size, fn="decode_step")
  b = cache.pad.shape[0]
  if tokens.shape != (b,):
    raise ValueError(f"decode_step: tokens must be (batch={b},); got shape {tokens.shape}.")
  if int(cache.length) >= cache.max_len:
    raise ValueError(f"decode_step: the cache is full ({int(cache.length)} of max_len={cache.max_len} slots); "
                     "make it with a larger max_len (init_cache).")
  return _step_jit(c, params, cache, jnp.asarray(tokens, jnp.int32))


def generate(model, params, prompts, max_new_tokens: int = 16, *, kv_cache: Optional[KVCacheSpec] = None,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0, key=None,
             stop_token: Optional[int] = None, max_len: Optional[int] = None) -> GenerateResult:
  """Decodes ``max_new_tokens`` tokens after each prompt with a KV cache.

  Args:
    model: A `jquant.models.Model` (Llama-style decoder).
    params: Its parameters; may hold packed `QArray`s, `W8A8Weight`s.
    prompts: Token ids: a list of B non-empty sequences (left-padded), or an
      int (B, P) array.
    max_new_tokens: New tokens per prompt (>= 1).
    kv_cache: None (float cache) or a `jquant.kvcache.KVCacheSpec`.
    temperature, top_k, top_p: The `Sampler`; ``temperature=0`` is greedy.
    key: A ``jax.random.key``; required when ``temperature > 0``.
    stop_token: Once a row emits it, the row emits only it.
    max_len: Cache slots; default the longest prompt + max_new_tokens - 1.

  Returns:
    A `GenerateResult`.

  Raises:
    ValueError: ids outside the vocabulary, empty prompts, bad sampler
      arguments, a missing key, a prompt + new tokens longer than
      ``max_len``, a bad ``kv_cache`` (bits, group size not dividing head_dim).
  """
  c = _check_model(model, "generate")
  n_new = _check_int(max_new_tokens, "max_new_tokens", "generate")
  sampler = check_sampler(temperature, top_k, top_p, c.vocab_size)
  if sampler.temperature > 0 and key is None:
    raise ValueError("generate: temperature > 0 needs key=jax.random.key(seed) (sampling is explicit).")
  key = jax.random.key(0) if key is None else key
  if not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                          or (key.dtype == jnp.uint32 and key.shape == (2,)))):
    raise TypeError(f"generate: key={key!r}; allowed: a PRNG key, jax.random.key(seed) "
                    "(or a raw jax.random.PRNGKey(seed)).")
  kvcache.check_spec(kv_cache, c.head_dim, "generate")
  tokens, pad = left_pad(prompts)
  tokens = np.asarray(check_token_ids(tokens, c.vocab_size, fn="generate", name="prompts"))
  if stop_token is not None:
    check_token_ids(np.asarray([stop_token]), c.vocab_size, fn="generate", name="stop_token")
  b, p = tokens.shape
  need = p + n_new - 1
  if max_len is None:
    max_len = need
  elif _check_int(max_len, "max_len", "generate") < need:
    raise ValueError(f"generate: the longest prompt ({p} tokens) + max_new_tokens={n_new} needs {need} cache "
                     f"slots, more than max_len={max_len}; raise max_len or shorten the prompt.")
  cache = init_cache(model, b, max_len, kv_cache)
  nbytes = cache.nbytes
  t0 = time.perf_counter()
  logits, cache = prefill(model, params, tokens, pad, cache)
  tok = _first_jit(sampler, logits, key)
  tok.block_until_ready()
  t_prefill = time.perf_counter() - t0
  stop = jnp.asarray(-1 if stop_token is None else stop_token, jnp.int32)
  done = tok == stop
  out = [tok]
  t_decode, t1 = 0.0, None
  for i in range(1, n_new):
    tok, done, cache = _sample_step_jit(c, sampler, params, cache, tok, done, key, jnp.asarray(i, jnp.int32), stop)
    out.append(tok)
    if i == 1:  # the first step compiles: time the rest
      tok.block_until_ready()
      t1 = time.perf_counter()
  if t1 is not None:
    out[-1].block_until_ready()
    t_decode = time.perf_counter() - t1
  toks = np.stack([np.asarray(t) for t in out], axis=1).astype(np.int32)
  return GenerateResult(toks, (p - pad).astype(np.int64), nbytes, t_prefill, t_decode, max(n_new - 2, 0))


def with_kv_fake_quant(model, kv_cache: Optional[KVCacheSpec]):
  """A copy of ``model`` whose ``apply`` quantizes keys and values as ``kv_cache`` stores them.

  For perplexity with a quantized cache: ``jquant.eval.perplexity(with_kv_fake_quant(m, spec), params, w)``
  scores every position as if the keys/values before it came from the cache
  (KIVI keys: complete blocks quantized, the open block float).

  Raises:
    ValueError: a spec whose group_size does not divide the model's head_dim.
  """
  c = _check_model(model, "with_kv_fake_quant")
  spec = kvcache.check_spec(kv_cache, c.head_dim, "with_kv_fake_quant")
  return dataclasses.replace(model, kv_quant=spec)


__all__ = ["generate", "prefill", "decode_step", "init_cache", "left_pad", "sample", "Sampler", "check_sampler",
           "GenerateResult", "with_kv_fake_quant", "TRACES"]
