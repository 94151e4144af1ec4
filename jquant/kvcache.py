"""Key/value caches for decoding: float, int8 and packed int4 (KIVI-style), and their bytes.

A cache holds, for every layer, the keys (after RoPE) and values of all
tokens seen so far in ``max_len`` static slots, shaped ``(B, S, KV, hd)``
(batch, slot, key/value head, head_dim). `KVCacheSpec` chooses how they are
stored:

* ``None`` (no spec): keys and values in the model's compute dtype.
* ``KVCacheSpec(bits=8 | 4, key_axis="token")``: per-token asymmetric
  quantization of keys and values, one (scale, min) pair per token, head and
  group of ``group_size`` channels along head_dim.
* ``KVCacheSpec(bits=..., key_axis="channel")``: KIVI (Liu et al. 2024,
  "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"): keys
  per channel, one (scale, min) pair per channel and block of ``key_block``
  consecutive slots (keys have outlier channels, so per-channel ranges fit
  them); values per token as above. A block is quantized when its last slot
  is written; until then its keys sit in a float *residual* of ``key_block``
  slots (KIVI's full-precision residual).

Codes are unsigned: ``x ~ code * scale + min`` with ``code`` in
``[0, 2**bits - 1]``, ``scale = (max - min) / (2**bits - 1)`` (1 where a
group is constant), rounding to nearest; so ``|x - x_hat| <= scale / 2``.
int4 codes are packed two per byte along head_dim (``byte = c[2i] | c[2i+1] << 4``).

Bytes (per layer; B batch, S slots, KV heads, hd head_dim, b bits, s the
scale dtype's bytes, G = hd / group_size, f the compute dtype's bytes):

* float: ``2 * B*S*KV*hd * f``
* per-token keys and values: ``2 * (B*S*KV*hd*b/8 + 2 * B*S*KV*G * s)``
* KIVI: values as per-token; keys ``B*S*KV*hd*b/8 + 2 * B*(S/key_block)*KV*hd * s
  + B*key_block*KV*hd * f`` (the residual).

`cache_bytes` computes this formula; `KVCache.nbytes` sums the arrays.

Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from jquant import kvcache
    >>> spec = kvcache.KVCacheSpec(bits=4, group_size=32)
    >>> x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 2, 64)), jnp.float32)
    >>> codes, scale, mn = kvcache.quantize_per_token(x, spec)
    >>> codes.shape, codes.dtype, scale.shape        # 2 codes per byte, 2 groups per head
    ((1, 8, 2, 32), dtype('uint8'), (1, 8, 2, 2))
    >>> x_hat = kvcache.dequantize_per_token(codes, scale, mn, spec, 64)
    >>> bool(jnp.all(jnp.abs(x_hat - x) <= scale.repeat(32, -1) / 2 + 1e-6))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jquant import packing

KEY_AXES = ("token", "channel")
SCALE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
  """How a quantized KV cache stores keys and values.

  Attributes:
    bits: Code width, 8 (int8) or 4 (two codes per byte).
    key_axis: ``"token"``: keys quantized per token like values;
      ``"channel"``: per channel over blocks of ``key_block`` slots (KIVI).
    group_size: Channels per (scale, min) pair along head_dim for per-token
      tensors; None: the whole head_dim. Must divide head_dim (checked when a
      cache is made for a model).
    key_block: Slots per per-channel key scale and length of the float
      residual (``key_axis="channel"`` only; KIVI's G = R = 32 by default).
    scale_dtype: dtype of the stored scales and minima.

  Example:
    >>> KVCacheSpec(bits=4, key_axis="channel", group_size=32)   # KIVI-4
    KVCacheSpec(bits=4, key_axis='channel', group_size=32, key_block=32, scale_dtype='float32')
  """

  bits: int = 8
  key_axis: str = "token"
  group_size: Optional[int] = None
  key_block: int = 32
  scale_dtype: str = "float32"

  def __post_init__(self):
    if isinstance(self.bits, bool) or self.bits not in (4, 8):
      raise ValueError(f"KVCacheSpec: bits={self.bits!r}; allowed: 8 or 4 (use kv_cache=None for a float cache).")
    if self.key_axis not in KEY_AXES:
      raise ValueError(f"KVCacheSpec: key_axis={self.key_axis!r}; allowed: {KEY_AXES} ('channel' is KIVI).")
    if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(
        self.group_size, (int, np.integer)) or self.group_size < 1):
      raise ValueError(f"KVCacheSpec: group_size={self.group_size!r}; allowed: None (whole head_dim) or a "
                       "positive int dividing head_dim.")
    if isinstance(self.key_block, bool) or not isinstance(self.key_block, (int, np.integer)) or self.key_block < 1:
      raise ValueError(f"KVCacheSpec: key_block={self.key_block!r}; allowed: a positive int.")
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"KVCacheSpec: scale_dtype={self.scale_dtype!r}; allowed: {SCALE_DTYPES}.")

  @property
  def qmax(self) -> int:
    return 2**self.bits - 1

  def groups(self, head_dim: int) -> int:
    """Groups per head along head_dim; raises ValueError if group_size does not divide head_dim."""
    g = head_dim if self.group_size is None else self.group_size
    if head_dim % g:
      raise ValueError(f"KVCacheSpec: group_size={self.group_size} does not divide the model's "
                       f"head_dim={head_dim}; allowed: a divisor of {head_dim} (or None).")
    return head_dim // g


def check_spec(spec, head_dim: int, fn: str) -> Optional[KVCacheSpec]:
  """``spec`` if it is None or a `KVCacheSpec` valid for ``head_dim``; raises otherwise."""
  if spec is None:
    return None
  if not isinstance(spec, KVCacheSpec):
    raise TypeError(f"{fn}: kv_cache={spec!r}; allowed: None (float cache) or a jquant.kvcache.KVCacheSpec.")
  spec.groups(head_dim)
  return spec


# ---------------------------------------------------------------------------
# Quantization math.


def pack_int4(codes):
  """uint8 codes in [0, 15] (..., n) with n even -> (..., n/2) bytes, ``c[2i] | c[2i+1] << 4`` (`jquant.packing`)."""
  return packing.pack(codes, 4, axis=-1)


def unpack_int4(packed):
  """Inverse of `pack_int4`: (..., n/2) bytes -> (..., n) uint8 codes."""
  return packing.unpack(packed, 4, packed.shape[-1] * 2, axis=-1)


def _encode(xf, mn, mx, spec: KVCacheSpec):
  """Codes (uint8, unpacked) and float32 (scale, min) of xf for broadcastable group minima/maxima."""
  scale = jnp.where(mx > mn, (mx - mn) / spec.qmax, 1.0)
  sdt = jnp.dtype(spec.scale_dtype)
  scale, mn = scale.astype(sdt).astype(jnp.float32), mn.astype(sdt).astype(jnp.float32)
  codes = jnp.clip(jnp.round((xf - mn) / scale), 0, spec.qmax).astype(jnp.uint8)
  return codes, scale, mn


def _store(codes, spec: KVCacheSpec):
  return pack_int4(codes) if spec.bits == 4 else codes


def _load(stored, spec: KVCacheSpec):
  return unpack_int4(stored) if spec.bits == 4 else stored


def quantize_per_token(x, spec: KVCacheSpec):
  """Per-token asymmetric quantization of x (..., hd) in groups of ``group_size`` channels.

  Args:
    x: Keys or values (..., hd), any float dtype.
    spec: The cache spec (bits, group_size, scale_dtype).

  Returns:
    ``(codes, scale, min)``: codes uint8 (..., hd) for 8 bits, (..., hd/2)
    packed for 4 bits; scale and min (..., hd/group_size) in ``scale_dtype``.
  """
  hd = x.shape[-1]
  g = spec.groups(hd)
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], g, hd // g)
  mn, mx = jnp.min(xf, -1, keepdims=True), jnp.max(xf, -1, keepdims=True)
  codes, scale, mn = _encode(xf, mn, mx, spec)
  sdt = jnp.dtype(spec.scale_dtype)
  return (_store(codes.reshape(x.shape), spec), scale[..., 0].astype(sdt), mn[..., 0].astype(sdt))


def dequantize_per_token(codes, scale, mn, spec: KVCacheSpec, head_dim: int, dtype=jnp.float32):
  """Inverse of `quantize_per_token`: (..., head_dim) in ``dtype``."""
  c = _load(codes, spec).astype(jnp.float32)
  g = scale.shape[-1]
  c = c.reshape(*c.shape[:-1], g, head_dim // g)
  x = c * scale[..., None].astype(jnp.float32) + mn[..., None].astype(jnp.float32)
  return x.reshape(*x.shape[:-2], head_dim).astype(dtype)


def quantize_per_channel(x, spec: KVCacheSpec, valid=None):
  """Per-channel asymmetric quantization over blocks of ``key_block`` tokens (KIVI keys).

  Args:
    x: Keys (B, T, KV, hd) with T a multiple of ``key_block``.
    spec: The cache spec.
    valid: Optional bool (B, T): tokens that enter the block statistics (left
      padding is excluded); invalid tokens are still encoded (clipped).

  Returns:
    ``(codes, scale, min)``: codes (B, T, KV, hd) uint8 (hd/2 packed for 4
    bits); scale and min (B, T/key_block, KV, hd) in ``scale_dtype``.
  """
  b, t, kv, hd = x.shape
  blk = spec.key_block
  if t % blk:
    raise ValueError(f"quantize_per_channel: {t} tokens is not a multiple of key_block={blk}.")
  xf = x.astype(jnp.float32).reshape(b, t // blk, blk, kv, hd)
  if valid is None:
    mn, mx = jnp.min(xf, 2, keepdims=True), jnp.max(xf, 2, keepdims=True)
  else:
    vm = valid.reshape(b, t // blk, blk, 1, 1)
    mn = jnp.min(jnp.where(vm, xf, jnp.inf), 2, keepdims=True)
    mx = jnp.max(jnp.where(vm, xf, -jnp.inf), 2, keepdims=True)
    empty = ~jnp.any(vm, axis=2, keepdims=True)  # an all-padding block: any finite range
    mn, mx = jnp.where(empty, 0.0, mn), jnp.where(empty, 0.0, mx)
  codes, scale, mn = _encode(xf, mn, mx, spec)
  sdt = jnp.dtype(spec.scale_dtype)
  return _store(codes.reshape(b, t, kv, hd), spec), scale[:, :, 0].astype(sdt), mn[:, :, 0].astype(sdt)


def dequantize_per_channel(codes, scale, mn, spec: KVCacheSpec, head_dim: int, dtype=jnp.float32):
  """Inverse of `quantize_per_channel`: (B, T, KV, head_dim) in ``dtype``."""
  c = _load(codes, spec).astype(jnp.float32)
  b, t, kv, _ = c.shape
  blk = spec.key_block
  c = c.reshape(b, t // blk, blk, kv, head_dim)
  x = c * scale[:, :, None].astype(jnp.float32) + mn[:, :, None].astype(jnp.float32)
  return x.reshape(b, t, kv, head_dim).astype(dtype)


def fake_quantize(k, v, spec: KVCacheSpec):
  """Keys and values (B, T, KV, hd) as the cache would return them (for perplexity).

  Keys with ``key_axis="channel"`` are quantized over blocks of
  ``key_block`` positions (the last, partial block padded by repetition and
  quantized too); `channel_key_mask` says which of them a query would see
  quantized during decoding.
  """
  hd = k.shape[-1]
  v_hat = dequantize_per_token(*quantize_per_token(v, spec), spec, hd, v.dtype)
  if spec.key_axis == "token":
    return dequantize_per_token(*quantize_per_token(k, spec), spec, hd, k.dtype), v_hat
  t, blk = k.shape[1], spec.key_block
  pad = -t % blk
  kp = jnp.concatenate([k, jnp.repeat(k[:, -1:], pad, axis=1)], axis=1) if pad else k
  k_hat = dequantize_per_channel(*quantize_per_channel(kp, spec), spec, hd, k.dtype)[:, :t]
  return k_hat, v_hat


def channel_key_mask(t: int, spec: KVCacheSpec):
  """(T, T) bool: query i sees key s quantized (its block is complete after token i is written)."""
  i = jnp.arange(t)[:, None]
  s = jnp.arange(t)[None, :]
  return s < ((i + 1) // spec.key_block) * spec.key_block


# ---------------------------------------------------------------------------
# The cache.


@flax.struct.dataclass
class LayerCache:
  """One layer's cache arrays (fields unused by a layout are None).

  Attributes:
    k, v: Float (B, S, KV, hd) for a float cache; uint8 codes (B, S, KV, hd)
      or packed (B, S, KV, hd/2) otherwise.
    k_scale, k_min: (B, S, KV, G) per-token, (B, S/key_block, KV, hd) KIVI.
    v_scale, v_min: (B, S, KV, G).
    k_residual: (B, key_block, KV, hd) float keys of the open block (KIVI).
  """

  k: jax.Array
  v: jax.Array
  k_scale: Optional[jax.Array] = None
  k_min: Optional[jax.Array] = None
  v_scale: Optional[jax.Array] = None
  v_min: Optional[jax.Array] = None
  k_residual: Optional[jax.Array] = None


@flax.struct.dataclass
class KVCache:
  """A whole model's cache: one `LayerCache` per layer, the fill level and the left padding.

  Attributes:
    layers: Tuple of `LayerCache`, one per transformer block.
    length: int32 scalar, slots written so far (shared by all rows).
    pad: int32 (B,), left-padding slots of each row (its prompt starts there).
    spec: The `KVCacheSpec` (None: float), static.
  """

  layers: tuple
  length: jax.Array
  pad: jax.Array
  spec: Optional[KVCacheSpec] = flax.struct.field(pytree_node=False, default=None)

  @property
  def max_len(self) -> int:
    return int(self.layers[0].k.shape[1])

  @property
  def nbytes(self) -> int:
    """Bytes of the key/value arrays of every layer (scales, minima and residuals included)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self.layers)))


def cache_bytes(spec: Optional[KVCacheSpec], *, n_layers: int, batch: int, max_len: int, n_kv_heads: int,
                head_dim: int, dtype="float32") -> int:
  """The cache's bytes by the formula in the module docstring (``max_len`` already a multiple of key_block)."""
  n = batch * max_len * n_kv_heads * head_dim
  f = jnp.dtype(dtype).itemsize
  if spec is None:
    return n_layers * 2 * n * f
  s = jnp.dtype(spec.scale_dtype).itemsize
  codes = n * spec.bits // 8
  per_token = codes + 2 * batch * max_len * n_kv_heads * spec.groups(head_dim) * s
  if spec.key_axis == "token":
    keys = per_token
  else:
    keys = (codes + 2 * batch * (max_len // spec.key_block) * n_kv_heads * head_dim * s
            + batch * spec.key_block * n_kv_heads * head_dim * f)
  return n_layers * (keys + per_token)


def padded_len(max_len: int, spec: Optional[KVCacheSpec]) -> int:
  """Slots allocated for ``max_len`` tokens: a multiple of ``key_block`` for KIVI keys."""
  if spec is None or spec.key_axis == "token":
    return int(max_len)
  return int(-(-max_len // spec.key_block) * spec.key_block)


def init_layer(spec: Optional[KVCacheSpec], batch: int, max_len: int, n_kv: int, head_dim: int,
               dtype) -> LayerCache:
  """An empty (zero) `LayerCache` of ``max_len`` slots (a multiple of key_block for KIVI)."""
  shape = (batch, max_len, n_kv, head_dim)
  if spec is None:
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
  cshape = shape[:-1] + (head_dim // 2 if spec.bits == 4 else head_dim,)
  sdt = jnp.dtype(spec.scale_dtype)
  tok = (batch, max_len, n_kv, spec.groups(head_dim))
  z = lambda s, d=sdt: jnp.zeros(s, d)
  if spec.key_axis == "token":
    return LayerCache(z(cshape, jnp.uint8), z(cshape, jnp.uint8), z(tok), z(tok), z(tok), z(tok))
  ch = (batch, max_len // spec.key_block, n_kv, head_dim)
  return LayerCache(z(cshape, jnp.uint8), z(cshape, jnp.uint8), z(ch), z(ch), z(tok), z(tok),
                    z((batch, spec.key_block, n_kv, head_dim), dtype))


def _put(buf, new, start):
  """``buf[:, start:start+T] = new`` along the slot axis (start a traced scalar)."""
  idx = (0, start) + (0,) * (buf.ndim - 2)
  return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), idx)


def write(cache: LayerCache, spec: Optional[KVCacheSpec], k, v, start, pad=None) -> LayerCache:
  """Writes keys/values (B, T, KV, hd) into slots ``start .. start+T-1``.

  ``start`` is a traced int32 scalar. For KIVI keys, either ``start == 0``
  (prefill: full blocks are quantized, the rest goes to the residual) or
  ``T == 1`` (decode: the residual takes the key; when it completes a block,
  the block is quantized). ``pad`` (B,) int32: slots before ``pad[b]`` are
  left padding of row b and stay out of the per-channel block statistics.
  """
  if spec is None:
    return cache.replace(k=_put(cache.k, k, start), v=_put(cache.v, v, start))
  vc, vs, vm = quantize_per_token(v, spec)
  out = dict(v=_put(cache.v, vc, start), v_scale=_put(cache.v_scale, vs, start), v_min=_put(cache.v_min, vm, start))
  if spec.key_axis == "token":
    kc, ks, km = quantize_per_token(k, spec)
    out.update(k=_put(cache.k, kc, start), k_scale=_put(cache.k_scale, ks, start), k_min=_put(cache.k_min, km, start))
    return cache.replace(**out)
  b, t, kv, hd = k.shape
  blk = spec.key_block
  if t == 1:  # decode: one key into the residual; quantize the block it completes
    res = jax.lax.dynamic_update_slice(cache.k_residual, k.astype(cache.k_residual.dtype), (0, start % blk, 0, 0))
    block = start // blk
    valid = None if pad is None else (block * blk + jnp.arange(blk))[None, :] >= pad[:, None]
    kc, ks, km = quantize_per_channel(res, spec, valid)
    done = (start + 1) % blk == 0
    old = (jax.lax.dynamic_slice_in_dim(cache.k, block * blk, blk, 1),
           jax.lax.dynamic_slice_in_dim(cache.k_scale, block, 1, 1),
           jax.lax.dynamic_slice_in_dim(cache.k_min, block, 1, 1))
    kc, ks, km = (jnp.where(done, n, o) for n, o in zip((kc, ks, km), old))
    out.update(k=_put(cache.k, kc, block * blk), k_scale=_put(cache.k_scale, ks, block),
               k_min=_put(cache.k_min, km, block), k_residual=res)
    return cache.replace(**out)
  # prefill at slot 0: T tokens; full blocks quantized, the tail into the residual
  full = (t // blk) * blk
  if full:
    valid = None if pad is None else jnp.arange(full)[None, :] >= pad[:, None]
    kc, ks, km = quantize_per_channel(k[:, :full], spec, valid)
    out.update(k=_put(cache.k, kc, 0), k_scale=_put(cache.k_scale, ks, 0), k_min=_put(cache.k_min, km, 0))
  if t > full:
    out.update(k_residual=_put(cache.k_residual, k[:, full:], 0))
  return cache.replace(**out)


def read(cache: LayerCache, spec: Optional[KVCacheSpec], length, dtype):
  """Keys and values (B, S, KV, hd) in ``dtype`` as attention sees them after ``length`` slots are written.

  For KIVI keys, slots of complete blocks (``s < (length // key_block) *
  key_block``) are dequantized and the open block's slots read the residual.
  """
  if spec is None:
    return cache.k.astype(dtype), cache.v.astype(dtype)
  hd = cache.v.shape[-1] * (2 if spec.bits == 4 else 1)
  v = dequantize_per_token(cache.v, cache.v_scale, cache.v_min, spec, hd, dtype)
  if spec.key_axis == "token":
    return dequantize_per_token(cache.k, cache.k_scale, cache.k_min, spec, hd, dtype), v
  k = dequantize_per_channel(cache.k, cache.k_scale, cache.k_min, spec, hd, dtype)
  s, blk = k.shape[1], spec.key_block
  res = jnp.tile(cache.k_residual.astype(dtype), (1, s // blk, 1, 1))
  closed = (length // blk) * blk
  use_res = (jnp.arange(s) >= closed)[None, :, None, None]
  return jnp.where(use_res, res, k), v


__all__ = ["KVCacheSpec", "KVCache", "LayerCache", "cache_bytes", "padded_len", "init_layer", "write", "read",
           "quantize_per_token", "dequantize_per_token", "quantize_per_channel", "dequantize_per_channel",
           "fake_quantize", "channel_key_mask", "pack_int4", "unpack_int4", "check_spec"]
