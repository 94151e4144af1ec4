"""Model files: truncated, corrupted or non-finite GGUF and safetensors files fail clearly in every public loader.

(Checkpoint directories: tests/test_checkpoint.py.)
"""

import json
import os
import re
import shutil

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import jquant
from jquant import models
from jquant.files import FileFormatError

_Q = gguf.GGMLQuantizationType
_V, _D, _F, _H, _KV = 16, 32, 32, 2, 1
_SHAPES = {"token_embd.weight": (_V, _D), "output_norm.weight": (_D,), "blk.0.attn_norm.weight": (_D,),
           "blk.0.ffn_norm.weight": (_D,), "blk.0.attn_q.weight": (_D, _D), "blk.0.attn_k.weight": (_KV * 16, _D),
           "blk.0.attn_v.weight": (_KV * 16, _D), "blk.0.attn_output.weight": (_D, _D),
           "blk.0.ffn_gate.weight": (_F, _D), "blk.0.ffn_up.weight": (_F, _D), "blk.0.ffn_down.weight": (_D, _F)}


def write_tiny_gguf(path, *, nan=False, block_count=True, merges=("A B",)):
  """A one-block Llama GGUF (F32 tensors, ffn_down as Q8_0) with a byte-level BPE tokenizer: ~25 KB."""
  w = gguf.GGUFWriter(str(path), "llama")
  if block_count:
    w.add_block_count(1)
  w.add_context_length(64)
  w.add_embedding_length(_D)
  w.add_feed_forward_length(_F)
  w.add_head_count(_H)
  w.add_head_count_kv(_KV)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(_V)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list([chr(65 + i) for i in range(_V - 1)] + ["AB"])
  w.add_token_types([1] * _V)
  w.add_token_merges(list(merges))
  rng = np.random.default_rng(0)
  for name, shape in _SHAPES.items():
    a = rng.standard_normal(shape).astype(np.float32)
    if nan and name == "blk.0.ffn_up.weight":
      a[3, 5] = np.nan
    if name == "blk.0.ffn_down.weight":
      w.add_tensor(name, gguf.quants.quantize(a, _Q.Q8_0), raw_dtype=_Q.Q8_0)
    else:
      w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


_GGUF_LOADERS = {"from_gguf": models.from_gguf, "jquant.gguf.load": jquant.gguf.load}


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
  return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf")


def _copy(src, dst, edit=None):
  shutil.copy(src, dst)
  if edit is not None:
    data = bytearray(open(dst, "rb").read())
    data = edit(data)
    open(dst, "wb").write(bytes(data))
  return str(dst)


def _raises(fn, path, match):
  return pytest.raises(FileFormatError, match=f"^{re.escape(fn)}: {re.escape(str(path))}: .*{match}")


def test_tiny_gguf_loads(good_gguf):
  m = models.from_gguf(good_gguf)
  assert m.config.n_layers == 1 and m.tokenizer.encode("AB").ids == [_V - 1]
  p = jquant.gguf.load(good_gguf)
  assert isinstance(p.params["layers_0"]["mlp"]["down"]["kernel"], jquant.QArray)


@pytest.mark.parametrize("fn", list(_GGUF_LOADERS))
@pytest.mark.parametrize("cut", [-10, 0.5, 20, 0])
def test_truncated_gguf(tmp_path, good_gguf, fn, cut):
  size = os.path.getsize(good_gguf)
  keep = size + cut if cut < 0 else int(size * cut) if isinstance(cut, float) else cut
  path = _copy(good_gguf, tmp_path / "cut.gguf", lambda d: d[:keep])
  match = "runs past the end of the file" if keep > size // 4 else "not a readable GGUF file"
  with _raises(fn, path, f"{match}.*download or write it again"):
    _GGUF_LOADERS[fn](path)


@pytest.mark.parametrize("fn", list(_GGUF_LOADERS))
def test_bad_magic_and_tensor_past_the_end(tmp_path, good_gguf, fn):
  path = _copy(good_gguf, tmp_path / "magic.gguf", lambda d: b"GGUX" + d[4:])
  with _raises(fn, path, "not a readable GGUF file .*magic"):
    _GGUF_LOADERS[fn](path)
  path = _copy(good_gguf, tmp_path / "offset.gguf")
  reader = gguf.GGUFReader(path, "r+")  # point one tensor's data offset far past the end, in place
  next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").field.parts[-1][0] = 10**6
  del reader
  with _raises(fn, path, "tensor 'blk.0.attn_q.weight' .* runs past the end of the file"):
    _GGUF_LOADERS[fn](path)


@pytest.mark.parametrize("fn", list(_GGUF_LOADERS))
def test_gguf_metadata_and_nonfinite_weights(tmp_path, fn):
  path = write_tiny_gguf(tmp_path / "nobc.gguf", block_count=False)
  with _raises(fn, path, "metadata llama.block_count=None"):
    _GGUF_LOADERS[fn](path)
  path = write_tiny_gguf(tmp_path / "nan.gguf", nan=True)
  with pytest.raises(ValueError, match=f"{re.escape(fn)}: .*{re.escape(path)}.* non-finite .* blk.0.ffn_up.weight "
                                       r"\(1 value\)"):
    _GGUF_LOADERS[fn](path)


@pytest.mark.parametrize("fn", list(_GGUF_LOADERS))
def test_inconsistent_tokenizer_is_an_error_not_a_crash(tmp_path, fn):
  path = write_tiny_gguf(tmp_path / "tok.gguf", merges=("A B", "A Z9"))
  with _raises(fn, path, r"merges\[1\]='A Z9'.*pass tokenizer=False"):
    _GGUF_LOADERS[fn](path)
  m = _GGUF_LOADERS[fn](path, tokenizer=False)  # the weights load all the same
  assert m.tokenizer is None and m.config.n_layers == 1


# ----------------------------------------------------------------------------- safetensors
_BERT = models.BertConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, ffn_dim=16, max_len=8)


_DENSE = {"attention.self.query": ("attn", "q"), "attention.self.key": ("attn", "k"),
          "attention.self.value": ("attn", "v"), "attention.output.dense": ("attn", "o"),
          "intermediate.dense": ("mlp", "up"), "output.dense": ("mlp", "down")}


def _hf_tensors():
  """Random weights of `_BERT` under Hugging Face names, (out, in) layout (NumPy only: nothing to compile)."""
  rng = np.random.default_rng(0)
  d, f = _BERT.dim, _BERT.ffn_dim
  shapes = {"embeddings.word_embeddings.weight": (_BERT.vocab_size, d),
            "embeddings.position_embeddings.weight": (_BERT.max_len, d),
            "embeddings.token_type_embeddings.weight": (_BERT.type_vocab_size, d)}
  for name in ("embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm",
               "encoder.layer.0.output.LayerNorm"):
    shapes.update({f"{name}.weight": (d,), f"{name}.bias": (d,)})
  for name in _DENSE:
    out, inp = (f, d) if name == "intermediate.dense" else (d, f) if name == "output.dense" else (d, d)
    shapes.update({f"encoder.layer.0.{name}.weight": (out, inp), f"encoder.layer.0.{name}.bias": (out,)})
  return {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def write_tiny_bert(folder, *, drop=None, nan=None):
  """A Hugging Face BERT folder (config.json, model.safetensors) of `_BERT`'s shape; returns (folder, tensors)."""
  os.makedirs(folder, exist_ok=True)
  tensors = _hf_tensors()
  if drop:
    del tensors[drop]
  if nan:
    tensors[nan].flat[0] = np.nan
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  json.dump({"model_type": "bert", "vocab_size": _BERT.vocab_size, "hidden_size": _BERT.dim,
             "num_hidden_layers": 1, "num_attention_heads": _BERT.n_heads, "intermediate_size": _BERT.ffn_dim,
             "max_position_embeddings": _BERT.max_len}, open(os.path.join(folder, "config.json"), "w"))
  return str(folder), tensors


def test_tiny_safetensors_loads_bit_exact(tmp_path):
  folder, t = write_tiny_bert(tmp_path / "bert")
  m = models.from_safetensors(folder)
  assert m.config == _BERT and len(jax.tree.leaves(m.params)) == len(t)
  for name, (sub, leaf) in _DENSE.items():
    np.testing.assert_array_equal(np.asarray(m.params["layers_0"][sub][leaf]["kernel"]),
                                  t[f"encoder.layer.0.{name}.weight"].T)
  np.testing.assert_array_equal(np.asarray(m.params["embed"]["norm"]["bias"]), t["embeddings.LayerNorm.bias"])


@pytest.mark.parametrize("damage", ["truncated", "header", "empty"])
def test_bad_safetensors(tmp_path, damage):
  folder, _ = write_tiny_bert(tmp_path / "bert")
  st = os.path.join(folder, "model.safetensors")
  data = open(st, "rb").read()
  data = {"truncated": data[:-7], "header": data[:8] + b"#" + data[9:], "empty": b""}[damage]
  open(st, "wb").write(data)
  with _raises("from_safetensors", st, "not a readable safetensors file.*download or write it again"):
    models.from_safetensors(folder)


def test_safetensors_missing_tensor_nonfinite_and_bad_config(tmp_path):
  folder, _ = write_tiny_bert(tmp_path / "drop", drop="encoder.layer.0.output.dense.bias")
  with _raises("from_safetensors", os.path.join(folder, "model.safetensors"),
               "no tensor 'encoder.layer.0.output.dense.bias'"):
    models.from_safetensors(folder)
  folder, _ = write_tiny_bert(tmp_path / "nan", nan="encoder.layer.0.intermediate.dense.weight")
  with pytest.raises(ValueError, match=r"from_safetensors: .* non-finite .* encoder\.layer\.0\.intermediate\.dense"
                                       r"\.weight \(1 value\)"):
    models.from_safetensors(folder)
  folder, _ = write_tiny_bert(tmp_path / "cfg")
  cfg = os.path.join(folder, "config.json")
  open(cfg, "w").write('{"model_type": "be')
  with _raises("from_safetensors", cfg, "model config is truncated or corrupted"):
    models.from_safetensors(folder)
