"""jquant's decoder parameter paths <-> llama.cpp's GGUF tensor names, and the q/k row permutation.

One table serves both architectures jquant reads and writes: ``llama`` and
``gemma3`` (whose extra tensors are the q/k norms and the post-norms).

jquant's Llama (`jquant.models.llama`) keeps Dense kernels ``(in, out)`` and
rotates RoPE pairs ``(i, i + hd/2)`` (Hugging Face order); a GGUF stores
weights as rows ``(out, in)`` with the q/k rows of each head interleaved for
llama.cpp's adjacent-pair rotation (``convert_hf_to_gguf.py``'s ``permute``).

Example:
    >>> gguf_name("layers_3/attn/q/kernel")
    ('blk.3.attn_q.weight', 'kernel')
    >>> param_path("blk.3.ffn_down.weight")
    ('layers_3/mlp/down/kernel', 'kernel')
"""

from __future__ import annotations

import re

import numpy as np

_DENSE = {"attn/q": "attn_q", "attn/k": "attn_k", "attn/v": "attn_v", "attn/o": "attn_output",
          "mlp/gate": "ffn_gate", "mlp/up": "ffn_up", "mlp/down": "ffn_down"}
_NORMS = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn/q_norm": "attn_q_norm",
          "attn/k_norm": "attn_k_norm", "post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm"}
# Tensors that configure the model rather than hold parameters (read into LlamaConfig).
CONFIG_TENSORS = ("rope_freqs.weight",)
# Architectures whose converter permutes q/k rows for llama.cpp's adjacent-pair RoPE (gemma3 uses NeoX order).
PERMUTED_ROPE = ("llama",)
_TOP = {"embed/embedding": ("token_embd.weight", "embedding"), "final_norm/scale": ("output_norm.weight", "norm"),
        "lm_head/kernel": ("output.weight", "kernel")}

SUPPORTED = ("embed/embedding", "final_norm/scale", "lm_head/kernel", "layers_<i>/attn/{q,k,v,o}/kernel",
             "layers_<i>/mlp/{gate,up,down}/kernel",
             "layers_<i>/{attn_norm,mlp_norm,post_attn_norm,post_mlp_norm,attn/q_norm,attn/k_norm}/scale")


def gguf_name(path: str) -> tuple[str, str]:
  """(GGUF tensor name, kind) of a jquant Llama parameter path; kind is "kernel" ((in, out), stored
  transposed), "embedding" ((rows, k), stored as is) or "norm" (1-D).

  Raises:
    ValueError: a path that is not part of jquant's Llama (the message lists the supported ones).
  """
  if path in _TOP:
    return _TOP[path]
  m = re.fullmatch(r"layers_(\d+)/(attn/[qkvo]|mlp/(?:gate|up|down))/kernel", path)
  if m:
    return f"blk.{m.group(1)}.{_DENSE[m.group(2)]}.weight", "kernel"
  m = re.fullmatch(r"layers_(\d+)/(attn_norm|mlp_norm|post_attn_norm|post_mlp_norm|attn/[qk]_norm)/scale", path)
  if m:
    return f"blk.{m.group(1)}.{_NORMS[m.group(2)]}.weight", "norm"
  raise ValueError(f"jquant.gguf: parameter {path!r} is not part of the Llama decoder GGUF export writes; "
                   f"supported: {', '.join(SUPPORTED)}.")


def param_path(name: str) -> tuple[str, str]:
  """Inverse of `gguf_name`: (jquant path, kind) of a GGUF tensor name.

  Raises:
    ValueError: a tensor jquant's Llama has no place for (named in the message).
  """
  for path, (n, kind) in _TOP.items():
    if n == name:
      return path, kind
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
  if m:
    for short, g in _DENSE.items():
      if g == m.group(2):
        return f"layers_{m.group(1)}/{short}/kernel", "kernel"
    for short, g in _NORMS.items():
      if g == m.group(2):
        return f"layers_{m.group(1)}/{short}/scale", "norm"
  raise ValueError(f"jquant.gguf: tensor {name!r} is not part of the decoder jquant builds; supported: "
                   "token_embd, output_norm, output, rope_freqs, blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,"
                   "ffn_up,ffn_down,attn_norm,ffn_norm,attn_q_norm,attn_k_norm,post_attention_norm,"
                   "post_ffw_norm}.weight.")


# The LlamaConfig options of llama.cpp's gemma3 architecture (read by jquant.gguf.reader, checked by arch_of).
GEMMA3_OPTIONS = {"activation": "gelu_tanh", "qk_norm": True, "post_norms": True, "embed_scale": True}


def gemma3_attn_scale(dim: int, n_heads: int, n_layers: int):
  """llama.cpp's gemma3 query scale: ``(dim / n_heads) ** -0.5`` for the 27B (62 layers); None (head_dim) otherwise."""
  return (dim / n_heads) ** -0.5 if n_layers == 62 else None


def arch_of(config) -> str:
  """The GGUF architecture that writes a `jquant.models.LlamaConfig`: ``llama`` or ``gemma3``.

  Raises:
    NotImplementedError: a combination of options neither architecture
      expresses (e.g. q/k norms without post-norms), or a query scale
      llama.cpp would not apply; the message names the options.
  """
  opts = {k: getattr(config, k) for k in GEMMA3_OPTIONS}
  if opts == GEMMA3_OPTIONS:
    arch = "gemma3"
  elif opts == {"activation": "silu", "qk_norm": False, "post_norms": False, "embed_scale": False} and (
      config.sliding_window is None):
    arch = "llama"
  else:
    raise NotImplementedError(f"jquant.gguf: no GGUF architecture jquant writes has the options {opts} "
                              f"(sliding_window={config.sliding_window}); supported: llama (activation='silu', "
                              "and none of qk_norm, post_norms, embed_scale, sliding_window) and gemma3 "
                              f"({GEMMA3_OPTIONS}).")
  rule = gemma3_attn_scale(config.dim, config.n_heads, config.n_layers) if arch == "gemma3" else None
  if config.attn_scale is not None and not (rule is not None and np.isclose(config.attn_scale, rule)):
    raise NotImplementedError(f"jquant.gguf: attn_scale={config.attn_scale} is not what llama.cpp applies to {arch} "
                              "(head_dim ** -0.5; Gemma 3 27B: (dim / n_heads) ** -0.5); supported: None.")
  return arch


def rope_rows(path: str, n_heads: int, n_kv_heads: int, arch: str = "llama"):
  """The number of heads whose rows llama.cpp permutes for this path (q: n_heads, k: n_kv_heads), or None.

  Only architectures in `PERMUTED_ROPE` are permuted; gemma3's converter keeps Hugging Face's row order.
  """
  if arch not in PERMUTED_ROPE:
    return None
  if path.endswith("/attn/q/kernel"):
    return n_heads
  if path.endswith("/attn/k/kernel"):
    return n_kv_heads
  return None


def to_gguf_rows(out: int, n_heads: int) -> np.ndarray:
  """Row order for export: ``gguf_rows = hf_rows[idx]`` (llama.cpp's converter ``permute``)."""
  hd = out // n_heads
  return np.arange(out).reshape(n_heads, 2, hd // 2).swapaxes(1, 2).reshape(-1)


def from_gguf_rows(out: int, n_heads: int) -> np.ndarray:
  """Row order for import: ``hf_rows = gguf_rows[idx]`` (inverse of `to_gguf_rows`)."""
  hd = out // n_heads
  return np.arange(out).reshape(n_heads, hd // 2, 2).swapaxes(1, 2).reshape(-1)
