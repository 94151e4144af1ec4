"""A Llama-style decoder in Flax Linen: RMSNorm, RoPE, grouped-query attention,
SwiGLU MLP, tied (or separate) output embedding; with the Gemma 3 options
(q/k norms, post-norms, GeGLU, embedding scaling, sliding-window layers with
their own RoPE base) as configuration, not as another model.

Parameters are a plain tree (Dense kernels laid out (in, out))::

    {"embed": {"embedding": (V, d)},
     "layers_0": {"attn_norm": {"scale"}, "attn": {"q", "k", "v", "o": {"kernel"}},
                  "mlp_norm": {"scale"}, "mlp": {"gate", "up", "down": {"kernel"}}},
     ...,
     "final_norm": {"scale"}}            # + "lm_head": {"kernel"} when untied

With ``qk_norm`` each attention also holds ``q_norm``/``k_norm`` ``{"scale"}``
(head_dim,); with ``post_norms`` each block holds ``post_attn_norm`` and
``post_mlp_norm`` ``{"scale"}`` (d,). Norm scales multiply as stored: Gemma's
``(1 + scale)`` is stored as ``1 + scale``, as llama.cpp's GGUF files do.

It is an ordinary Flax model (``nn.Dense``, ``nn.Embed``, an RMSNorm); quantized
trees run through `jquant.quantized`, as any user's model does. `Model.apply`
does that for you.

RoPE follows the Hugging Face layout: the rotated pairs are ``(i, i + hd/2)``
within each head. GGUF files store q/k rows permuted for llama.cpp's
adjacent-pair rotation; `jquant.models.from_gguf` undoes that permutation.

Example:
    >>> import jax, jax.numpy as jnp, jquant
    >>> m = jquant.models.llama_init(jquant.models.LlamaConfig(), jax.random.key(0))
    >>> tokens = jnp.zeros((2, 16), jnp.int32)
    >>> m.apply(m.params, tokens).shape
    (2, 16, 256)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant import kvcache
from jquant.intercept import quantized
from jquant.models.layers import RMSNorm
from jquant.tokens import check_token_ids


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a Llama-style decoder. Defaults: a toy model for tests.

  Attributes:
    vocab_size: Token count.
    dim: Model width d.
    n_layers: Transformer blocks.
    n_heads: Query heads.
    n_kv_heads: Key/value heads (grouped-query attention; divides n_heads).
    ffn_dim: SwiGLU hidden width.
    head_dim: Per-head width; ``dim // n_heads`` when None.
    rope_theta: RoPE base frequency.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: Output logits use the input embedding table.
    dtype: Compute dtype of activations (``"float32"`` or ``"bfloat16"``);
      norms, softmax and logits stay float32.
    rope_freq_factors: Llama 3.1-style per-frequency divisors (head_dim/2
      floats, GGUF ``rope_freqs``): frequency i is
      ``theta**(-2i/head_dim) / rope_freq_factors[i]``; None: plain RoPE.
    rope_scale: Linear RoPE scaling of the global (not sliding-window)
      layers: positions are divided by it (GGUF ``rope.scaling.type =
      linear``; Gemma 3 4B+ use 8).
    activation: ``"silu"`` (SwiGLU, Llama) or ``"gelu_tanh"`` (GeGLU with
      the tanh approximation, Gemma).
    qk_norm: RMSNorm over head_dim of every query and key head before RoPE
      (Gemma 3, Qwen 3).
    post_norms: RMSNorm of the attention and MLP outputs before the residual
      add (Gemma 2/3 "sandwich" norms).
    embed_scale: Multiply the embeddings by ``sqrt(dim)`` (Gemma; the tied
      output head is not scaled).
    attn_scale: Query scaling; None: ``head_dim ** -0.5``.
    sliding_window: Keys visible to a query on sliding-window layers: those
      with ``query_pos - key_pos < sliding_window``; None: every layer global.
    sliding_window_pattern: With a window, layer i is global when
      ``(i + 1) % sliding_window_pattern == 0`` (Gemma 3: 6, five local layers
      then a global one); 0: every layer local.
    rope_local_theta: RoPE base of the sliding-window layers (Gemma 3:
      10000); None: ``rope_theta``.

  Example:
    >>> LlamaConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256)
    >>> LlamaConfig.gemma3_270m().global_layers
    (5, 11, 17)
  """

  vocab_size: int = 256
  dim: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  ffn_dim: int = 128
  head_dim: Optional[int] = None
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = "float32"
  rope_freq_factors: Optional[tuple] = None
  rope_scale: float = 1.0
  activation: str = "silu"
  qk_norm: bool = False
  post_norms: bool = False
  embed_scale: bool = False
  attn_scale: Optional[float] = None
  sliding_window: Optional[int] = None
  sliding_window_pattern: int = 0
  rope_local_theta: Optional[float] = None

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"LlamaConfig: {name}={v!r}; allowed: a positive int.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"LlamaConfig: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}.")
    if self.head_dim is None:
      if self.dim % self.n_heads:
        raise ValueError(f"LlamaConfig: n_heads={self.n_heads} does not divide dim={self.dim}; "
                         "pass head_dim explicitly.")
      object.__setattr__(self, "head_dim", self.dim // self.n_heads)
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for RoPE.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"LlamaConfig: dtype={self.dtype!r}; allowed: 'float32', 'bfloat16'.")
    for name in ("qk_norm", "post_norms", "embed_scale", "tie_embeddings"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"LlamaConfig: {name}={getattr(self, name)!r}; allowed: True or False.")
    if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, (int, np.integer)) or self.head_dim < 2:
      raise ValueError(f"LlamaConfig: head_dim={self.head_dim!r}; allowed: an even int >= 2, or None.")
    for name, lo in (("rope_theta", 0.0), ("norm_eps", None), ("rope_local_theta", 0.0), ("attn_scale", 0.0),
                     ("rope_scale", 0.0)):
      v = getattr(self, name)
      if v is None and name in ("rope_local_theta", "attn_scale"):
        continue
      ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)
      if not ok or (lo is not None and v <= lo) or (lo is None and v < 0):
        what = "a finite float >= 0" if lo is None else "a finite float > 0"
        raise ValueError(f"LlamaConfig: {name}={v!r}; allowed: {what}"
                         f"{' or None' if name in ('rope_local_theta', 'attn_scale') else ''}.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"LlamaConfig: activation={self.activation!r}; allowed: {sorted(ACTIVATIONS)}.")
    if self.rope_freq_factors is not None:
      f = tuple(float(x) for x in np.asarray(self.rope_freq_factors, np.float64).reshape(-1))
      if len(f) != self.head_dim // 2 or not all(np.isfinite(x) and x > 0 for x in f):
        raise ValueError(f"LlamaConfig: rope_freq_factors has {len(f)} values; allowed: head_dim/2 = "
                         f"{self.head_dim // 2} finite positive floats (GGUF rope_freqs), or None.")
      object.__setattr__(self, "rope_freq_factors", f)
    if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or not isinstance(
        self.sliding_window, (int, np.integer)) or self.sliding_window < 1):
      raise ValueError(f"LlamaConfig: sliding_window={self.sliding_window!r}; allowed: a positive int or None.")
    if isinstance(self.sliding_window_pattern, bool) or not isinstance(
        self.sliding_window_pattern, (int, np.integer)) or self.sliding_window_pattern < 0:
      raise ValueError(f"LlamaConfig: sliding_window_pattern={self.sliding_window_pattern!r}; allowed: an int >= 0.")
    if self.sliding_window is None and (self.sliding_window_pattern or self.rope_local_theta is not None):
      raise ValueError(f"LlamaConfig: sliding_window_pattern={self.sliding_window_pattern!r} and rope_local_theta="
                       f"{self.rope_local_theta!r} describe sliding-window layers, but sliding_window=None; allowed: "
                       "set sliding_window, or leave them at 0 and None.")

  def __repr__(self):
    """The fields that differ from the defaults (a Gemma 3 config would not fit a line otherwise)."""
    parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
             if f.name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim") or getattr(self, f.name) != f.default]
    return f"LlamaConfig({', '.join(parts)})"

  @property
  def global_layers(self) -> tuple:
    """Indices of the layers that attend to every earlier position (all of them without a window)."""
    return tuple(i for i in range(self.n_layers) if self.is_global(i))

  def is_global(self, layer: int) -> bool:
    """Whether layer ``layer`` attends globally (see ``sliding_window_pattern``)."""
    if self.sliding_window is None:
      return True
    p = self.sliding_window_pattern
    return p > 0 and (layer + 1) % p == 0

  def rope(self, layer: int) -> tuple:
    """``(theta, position divisor, freq_factors)`` of layer ``layer``'s RoPE."""
    if self.is_global(layer):
      return self.rope_theta, self.rope_scale, self.rope_freq_factors
    return (self.rope_theta if self.rope_local_theta is None else self.rope_local_theta), 1.0, self.rope_freq_factors

  @classmethod
  def smollm2_135m(cls) -> "LlamaConfig":
    """SmolLM2-135M's shape (for reference; `from_gguf` reads it from the file)."""
    return cls(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
               rope_theta=100000.0, norm_eps=1e-5)

  @classmethod
  def gemma3_270m(cls) -> "LlamaConfig":
    """Gemma 3 270M's shape and options (for reference; `jquant.models.from_gguf` reads them from the file)."""
    return cls(vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, ffn_dim=2048, head_dim=256,
               rope_theta=1e6, norm_eps=1e-6, activation="gelu_tanh", qk_norm=True, post_norms=True,
               embed_scale=True, sliding_window=512, sliding_window_pattern=6, rope_local_theta=10000.0)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def _inv_freq(head_dim: int, theta: float, scale: float = 1.0, factors=None):
  """RoPE angular frequencies (head_dim/2,) float32, divided by the linear scale and the per-frequency factors."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if factors is not None:
    inv = inv / jnp.asarray(factors, jnp.float32)
  return inv / scale if scale != 1.0 else inv


def rope_cos_sin(length: int, head_dim: int, theta: float, scale: float = 1.0, factors=None):
  """cos/sin tables (length, head_dim/2) for positions 0..length-1 (float32).

  ``scale`` divides positions (linear RoPE scaling), ``factors`` divide the
  frequencies one by one (Llama 3.1's ``rope_freqs``).
  """
  ang = jnp.arange(length, dtype=jnp.float32)[:, None] * _inv_freq(head_dim, theta, scale, factors)[None, :]
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
  """Rotates pairs (i, i + hd/2) of x (B, T, H, hd) by the position angles."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def _dense(c: "LlamaConfig", features: int, name: str) -> nn.Dense:
  """A Flax Dense without bias in the model's compute dtype (kernels stay float32 parameters)."""
  return nn.Dense(features, use_bias=False, dtype=jnp.dtype(c.dtype), name=name)


def rope_cos_sin_at(positions, head_dim: int, theta: float, scale: float = 1.0, factors=None):
  """cos/sin tables (B, T, head_dim/2) for per-row int positions (B, T) (float32, as `rope_cos_sin`)."""
  ang = positions.astype(jnp.float32)[..., None] * _inv_freq(head_dim, theta, scale, factors)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope_at(x, cos, sin):
  """`apply_rope` with per-row tables cos/sin (B, T, hd/2) for x (B, T, H, hd)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE. Dense children: q, k, v, o.

  q, k and v receive the same input array (the attention norm's output).
  With ``config.qk_norm`` the heads of q and k pass an RMSNorm (``q_norm``,
  ``k_norm``) before RoPE; on sliding-window layers a query sees only the
  last ``config.sliding_window`` positions.

  Attributes:
    config: The `LlamaConfig`.
    kv_quant: Optional `jquant.kvcache.KVCacheSpec`: the full forward
      fake-quantizes keys (after RoPE) and values as that cache stores them
      (for perplexity with a quantized cache; KIVI keys: a query sees a key
      block quantized once the block is complete, as in decoding).
    layer: The block's index (selects global or sliding-window attention and
      the RoPE base, `LlamaConfig.rope`).

  ``kv=(layer_cache, spec, positions, start, pad)`` runs the cached path
  (`jquant.generate`): keys/values of the T input tokens are written at slots
  ``start..start+T-1`` of the `jquant.kvcache.LayerCache`, attention reads
  the whole cache (slots before ``pad[b]``, after each query and, on
  sliding-window layers, ``sliding_window`` or more slots before it masked)
  and the call returns ``(out, new_layer_cache)``.
  """

  config: LlamaConfig
  kv_quant: Any = None
  layer: int = 0

  def _scores(self, q, k):
    """Attention logits (B, K, G, T, S) float32 of q (B, T, K, G, hd) against keys (B, S, K, hd)."""
    c = self.config
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    return s / np.sqrt(c.head_dim) if c.attn_scale is None else s * np.float32(c.attn_scale)

  def _window(self, q_pos, k_pos):
    """Visibility (..., T, S) of keys at k_pos from queries at q_pos: causal, and the window if local."""
    c = self.config
    ok = k_pos <= q_pos
    if not c.is_global(self.layer):
      ok = ok & (q_pos - k_pos < c.sliding_window)
    return ok

  @nn.compact
  def __call__(self, x, kv=None):
    c = self.config
    b, t, _ = x.shape
    hd, kvh, g = c.head_dim, c.n_kv_heads, c.n_heads // c.n_kv_heads
    q = _dense(c, c.n_heads * hd, "q")(x).reshape(b, t, c.n_heads, hd)
    k = _dense(c, kvh * hd, "k")(x).reshape(b, t, kvh, hd)
    v = _dense(c, kvh * hd, "v")(x).reshape(b, t, kvh, hd)
    if c.qk_norm:
      q = RMSNorm(c.norm_eps, name="q_norm")(q)
      k = RMSNorm(c.norm_eps, name="k_norm")(k)
    if kv is not None:
      return self._cached(x, q, k, v, *kv)
    cos, sin = rope_cos_sin(t, hd, *c.rope(self.layer))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Query head h uses key/value head h // g (Hugging Face's repeat_kv order).
    q = q.reshape(b, t, kvh, g, hd)
    pos = jnp.arange(t)
    visible = self._window(pos[:, None], pos[None, :])
    if self.kv_quant is None:
      scores = self._scores(q, k)
    else:
      k_hat, v = kvcache.fake_quantize(k, v, self.kv_quant)
      scores = self._scores(q, k_hat)
      if self.kv_quant.key_axis == "channel":  # the open block's keys are still float (KIVI's residual)
        scores = jnp.where(kvcache.channel_key_mask(t, self.kv_quant), scores, self._scores(q, k))
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, c.n_heads * hd)
    return _dense(c, c.dim, "o")(out)

  def _cached(self, x, q, k, v, cache, spec, positions, start, pad):
    c = self.config
    b, t, _ = x.shape
    hd, kvh, g = c.head_dim, c.n_kv_heads, c.n_heads // c.n_kv_heads
    cos, sin = rope_cos_sin_at(positions, hd, *c.rope(self.layer))
    q, k = apply_rope_at(q, cos, sin), apply_rope_at(k, cos, sin)
    cache = kvcache.write(cache, spec, k, v, start, pad)
    keys, values = kvcache.read(cache, spec, start + t, x.dtype)
    q = q.reshape(b, t, kvh, g, hd)
    scores = self._scores(q, keys)
    slot = jnp.arange(keys.shape[1])
    # Slots and positions differ by the row's padding only, so the window holds on slots.
    visible = (slot[None, None, :] >= pad[:, None, None]) & self._window(
        start + jnp.arange(t)[None, :, None], slot[None, None, :])  # (B, T, S)
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, c.n_heads * hd)
    return _dense(c, c.dim, "o")(out), cache


class MLP(nn.Module):
  """Gated MLP ``down(act(gate(x)) * up(x))``: SwiGLU (silu) or GeGLU (gelu_tanh); gate and up share x."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = ACTIVATIONS[c.activation](_dense(c, c.ffn_dim, "gate")(x)) * _dense(c, c.ffn_dim, "up")(x)
    return _dense(c, c.dim, "down")(h)


class Block(nn.Module):
  """Pre-norm transformer block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``.

  With ``config.post_norms`` the attention and MLP outputs pass their own
  RMSNorm (``post_attn_norm``, ``post_mlp_norm``) before the residual add.
  With ``kv`` (see `Attention`) it returns ``(h, new_layer_cache)``.
  """

  config: LlamaConfig
  kv_quant: Any = None
  layer: int = 0

  @nn.compact
  def __call__(self, h, kv=None):
    c = self.config
    a = Attention(c, self.kv_quant, self.layer, name="attn")(RMSNorm(c.norm_eps, name="attn_norm")(h), kv)
    a, cache = a if kv is not None else (a, None)
    if c.post_norms:
      a = RMSNorm(c.norm_eps, name="post_attn_norm")(a)
    h = h + a
    m = MLP(c, name="mlp")(RMSNorm(c.norm_eps, name="mlp_norm")(h))
    if c.post_norms:
      m = RMSNorm(c.norm_eps, name="post_mlp_norm")(m)
    h = h + m
    return h if kv is None else (h, cache)


class Transformer(nn.Module):
  """The whole decoder: embedding, ``layers_0..N-1``, final norm, (tied) output projection.

  ``kv_quant`` (a `jquant.kvcache.KVCacheSpec`) fake-quantizes every layer's
  keys and values in ``__call__``; `decode` is the cached path.
  """

  config: LlamaConfig
  kv_quant: Any = None

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.dim, embedding_init=nn.initializers.normal(c.dim**-0.5))
    # named layers_0, layers_1, ...
    self.layers = [Block(c, self.kv_quant, layer=i) for i in range(c.n_layers)]
    self.final_norm = RMSNorm(c.norm_eps)
    if not c.tie_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=jnp.dtype(c.dtype))

  def embed_tokens(self, tokens):
    h = self.embed(tokens)
    if self.config.embed_scale:
      h = h * jnp.sqrt(jnp.float32(self.config.dim)).astype(h.dtype)
    return h.astype(self.config.dtype)

  def head(self, h):
    h = self.final_norm(h)
    if self.config.tie_embeddings:
      return self.embed.attend(h.astype(jnp.float32))
    return self.lm_head(h).astype(jnp.float32)

  def __call__(self, tokens):
    h = self.embed_tokens(tokens)
    for layer in self.layers:
      h = layer(h)
    return self.head(h)

  def decode(self, tokens, positions, cache, start):
    """Cached forward of T tokens (B, T) at per-row RoPE positions (B, T), written at slots ``start..``.

    Returns:
      ``(logits, cache)``: float32 logits (B, V) of the last position and the
      `jquant.kvcache.KVCache` with ``length = start + T``.
    """
    h = self.embed_tokens(tokens)
    layers = []
    for layer, lc in zip(self.layers, cache.layers):
      h, lc = layer(h, (lc, cache.spec, positions, start, cache.pad))
      layers.append(lc)
    logits = self.head(h[:, -1:])[:, 0]
    return logits, cache.replace(layers=tuple(layers), length=jnp.asarray(start + tokens.shape[1], jnp.int32))


def _linen_apply(module, params, *args):
  return module.apply({"params": params}, *args)


def _check_tokens(tokens, vocab_size):
  """Integer ids (batch, length) in [0, vocab_size) (the range is checked on concrete arrays only)."""
  tokens = check_token_ids(tokens, vocab_size, fn="Model.apply")
  if tokens.ndim != 2:
    raise ValueError(f"Model.apply: tokens must be an integer array (batch, length); got shape {tokens.shape}, "
                     f"dtype {tokens.dtype}.")
  return tokens


@dataclasses.dataclass
class Model:
  """A decoder with its parameters and tokenizer; every method is pure in ``params``.

  Attributes:
    config: The `LlamaConfig`.
    params: The float parameter tree (see module docstring).
    tokenizer: A ``tokenizers.Tokenizer`` (None for toy models).
    kv_quant: None, or a `jquant.kvcache.KVCacheSpec` whose quantization
      `apply` applies to every layer's keys and values (see
      `jquant.generate.with_kv_fake_quant`).
  """

  config: LlamaConfig
  params: Any
  tokenizer: Any = None
  kv_quant: Any = None

  def __repr__(self):
    n = sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(self.params))
    return (f"Model({self.config!r}, params: {n:,} values, tokenizer={'yes' if self.tokenizer else None}, "
            f"kv_quant={self.kv_quant!r})")

  @property
  def module(self) -> Transformer:
    return Transformer(self.config, self.kv_quant)

  def apply(self, params, tokens):
    """Logits (B, T, V) float32 for int tokens (B, T).

    ``params`` may hold quantized leaves (`QArray`, `W8A8Weight`, QAT
    leaves): the Flax module runs through `jquant.quantized`.

    Raises:
      ValueError: tokens that are not an integer (B, T) array, or concrete
        ids outside ``[0, vocab_size)`` (the message names the first bad id,
        its index and the vocabulary size). Under ``jax.jit`` the ids are
        tracers and only their dtype and shape are checked: an out-of-range
        id then gives NaN logits (``-1`` reads the last row), so check
        windows before jitting (`jquant.tokens.check_token_ids`).
    """
    tokens = _check_tokens(tokens, self.config.vocab_size)
    return quantized(_linen_apply)(self.module, params, tokens)

  def generate(self, params, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt`` (needs a tokenizer); returns the new text.

    The tokenizer adds what its file asks for (Gemma's ``<bos>``). Runs the
    full forward on a fixed-length buffer so one compilation serves every step
    (causal attention makes the padding after the cursor inert).

    Raises:
      TypeError: a prompt that is not a str.
      ValueError: no tokenizer, an empty prompt, or ``max_new_tokens < 1``.
    """
    if self.tokenizer is None:
      raise ValueError("generate: this model has no tokenizer; pass token ids to apply instead.")
    if not isinstance(prompt, str):
      raise TypeError(f"Model.generate: prompt must be a str; got {type(prompt).__name__}. For token ids use "
                      "generate_ids or jquant.generate.generate.")
    ids = self.tokenizer.encode(prompt).ids
    if not ids:
      raise ValueError("Model.generate: prompt is empty (no tokens); allowed: a non-empty str.")
    return self.tokenizer.decode(self.generate_ids(params, ids, max_new_tokens))

  def generate_ids(self, params, ids, max_new_tokens: int = 8, *, buffer_len: Optional[int] = None) -> list[int]:
    """Greedy continuation of the token ids ``ids`` (full forward per step, no cache); the new ids.

    The reference `jquant.generate.generate` is tested against. Every step
    runs the forward on a buffer of ``buffer_len`` tokens (default
    ``len(ids) + max_new_tokens``; causal attention makes the slots after the
    cursor inert), so one compilation serves every step and every prompt of
    the same buffer length.

    Raises:
      ValueError: ids outside the vocabulary, or a buffer_len shorter than
        ``len(ids) + max_new_tokens``.

    Example:
        >>> m.generate_ids(m.params, [1, 2, 3], 4)      # doctest: +SKIP
        [17, 17, 201, 5]
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise ValueError(f"Model.generate: max_new_tokens={max_new_tokens!r}; allowed: an int >= 1.")
    ids = [int(i) for i in np.asarray(check_token_ids(np.asarray(ids), self.config.vocab_size,
                                                      fn="Model.generate_ids", name="ids")).reshape(-1)]
    n = len(ids)
    length = n + max_new_tokens if buffer_len is None else int(buffer_len)
    if length < n + max_new_tokens:
      raise ValueError(f"Model.generate_ids: buffer_len={buffer_len} < len(ids) + max_new_tokens = "
                       f"{n + max_new_tokens}; allowed: at least that.")
    buf = np.zeros((1, length), np.int32)
    buf[0, :n] = ids
    for i in range(n, n + max_new_tokens):
      buf[0, i] = int(_greedy_step(self.config, self.kv_quant, params, buf, i - 1))
    return buf[0, n:n + max_new_tokens].tolist()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _greedy_step(config, kv_quant, params, tokens, i):
  """argmax of the logits at position i (one compilation per config and buffer shape)."""
  logits = quantized(_linen_apply)(Transformer(config, kv_quant), params, tokens)
  return jnp.argmax(logits[0, i])


def llama_init(config: LlamaConfig, key) -> Model:
  """A `Model` with random weights (same API as `from_gguf`; no tokenizer).

  Example:
    >>> m = llama_init(LlamaConfig(), jax.random.key(0))
    >>> sorted(m.params["layers_0"]["attn"])
    ['k', 'o', 'q', 'v']
  """
  if not isinstance(config, LlamaConfig):
    raise TypeError(f"llama_init: config must be a LlamaConfig, got {type(config).__name__}.")
  if not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,))):
    raise TypeError(f"llama_init: key must be a JAX PRNG key (jax.random.key(0)); got {type(key).__name__} "
                    f"{key!r}.")
  params = jax.jit(Transformer(config).init)(key, jnp.zeros((1, 2), jnp.int32))["params"]
  return Model(config, jax.tree_util.tree_map(jnp.asarray, dict(params)))
