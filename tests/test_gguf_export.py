"""GGUF export (jquant -> llama.cpp's format) and packed import (GGUF -> jquant QArrays)."""

import os
import stat

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import models
from jquant.gguf import names, types

_CFG = models.LlamaConfig(vocab_size=301, dim=256, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=512,
                          tie_embeddings=False)
_TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 301, (2, 12)), jnp.int32)


@pytest.fixture(scope="module")
def toy():
  return models.llama_init(_CFG, jax.random.key(0))


def _is_q(x):
  return isinstance(x, jquant.QArray)


def _assert_same_tree(a, b):
  la = jax.tree_util.tree_flatten_with_path(a, is_leaf=_is_q)[0]
  lb = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(b, is_leaf=_is_q)[0])
  assert len(la) == len(lb)
  for k, x in la:
    y = lb[jax.tree_util.keystr(k)]
    assert _is_q(x) == _is_q(y), k
    if _is_q(x):
      assert types.type_of(x) == types.type_of(y) and x.shape == y.shape and x.axis == y.axis
      for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", types.QUANT_TYPES)
def test_export_then_packed_import_is_bit_exact(tmp_path, toy, name):
  """jquant's QArrays -> GGUF -> packed QArrays: every payload, scale and float leaf bit for bit, and the
  packed model computes exactly the logits of the quantized tree it came from."""
  qparams = jquant.quantize_params(toy.params, jquant.gguf.rules(toy.params, name))
  report = jquant.gguf.export(tmp_path / "toy.gguf", qparams, like=toy, types=name)
  assert report.type_counts() == {name: 9, "F32": 3} and not report.fallbacks
  assert report.nbytes == os.path.getsize(tmp_path / "toy.gguf")
  m = jquant.gguf.load(tmp_path / "toy.gguf", tokenizer=False)
  assert m.config == _CFG and m.tokenizer is None
  _assert_same_tree(qparams, m.params)
  if name in ("Q4_1", "Q4_K", "Q6_K"):
    f = jax.jit(toy.apply)
    np.testing.assert_array_equal(np.asarray(f(qparams, _TOKENS)), np.asarray(f(m.params, _TOKENS)))
  if name == "Q4_K":  # any model runs them too: jquant.quantized's interpreter (two-level scales as matrices)
    g = jax.jit(jquant.quantized(toy.apply))
    np.testing.assert_array_equal(np.asarray(g(m.params, _TOKENS)), np.asarray(f(qparams, _TOKENS)))
  # The file's tensors, dequantized by the gguf package, are jquant's weights (transposed, q/k permuted).
  reader = gguf.GGUFReader(tmp_path / "toy.gguf")
  t = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
  ref = np.asarray(jquant.dequantize(qparams["layers_0"]["attn"]["k"]["kernel"])).T
  got = gguf.quants.dequantize(t.data, t.tensor_type)
  np.testing.assert_array_equal(got, ref[names.to_gguf_rows(ref.shape[0], _CFG.n_kv_heads)])


def test_float_export_and_rope_rows_match_the_loader(tmp_path, toy):
  """Float weights: F32 exactly, F16/BF16 as the dtype rounds them; q/k rows are permuted as
  llama.cpp's converter does (undone here by an independent reshape: adjacent pairs back to halves)."""
  def _unpermute_rope(w, n_heads):
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)

  old = os.umask(0o022)
  try:
    jquant.gguf.export(tmp_path / "f32.gguf", toy.params, like=_CFG)
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "f32.gguf").st_mode) == 0o644  # a plain file's mode, not mkstemp's 0600
  reader = gguf.GGUFReader(tmp_path / "f32.gguf")
  q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
  np.testing.assert_array_equal(_unpermute_rope(np.asarray(q.data), _CFG.n_heads),
                                np.asarray(toy.params["layers_0"]["attn"]["q"]["kernel"]).T)
  for ft, dt in (("F16", jnp.float16), ("BF16", jnp.bfloat16)):
    rep = jquant.gguf.export(tmp_path / f"{ft}.gguf", toy.params, like=_CFG, float_type=ft)
    assert rep.type_counts() == {ft: 9, "F32": 3}
    back = jquant.gguf.load(tmp_path / f"{ft}.gguf", tokenizer=False).params
    w = toy.params["layers_0"]["mlp"]["down"]["kernel"]
    np.testing.assert_array_equal(np.asarray(back["layers_0"]["mlp"]["down"]["kernel"]),
                                  np.asarray(w.astype(dt).astype(jnp.float32)))


def test_fallback_types_are_chosen_and_reported(tmp_path):
  """576-wide SmolLM2-like shapes: Q4_K tensors with 320 inputs fall back to Q5_0 (llama.cpp's choice),
  the 512-input down projection stays Q4_K; the report says which and why."""
  cfg = models.LlamaConfig(vocab_size=37, dim=320, n_layers=1, n_heads=5, n_kv_heads=1, ffn_dim=512)
  m = models.llama_init(cfg, jax.random.key(1))
  rules = jquant.gguf.rules(m.params, "Q4_K")
  qparams = jquant.quantize_params(m.params, rules)
  assert types.type_of(qparams["layers_0"]["mlp"]["down"]["kernel"]) == "Q4_K"
  assert types.type_of(qparams["layers_0"]["attn"]["q"]["kernel"]) == "Q5_0"
  assert types.type_of(qparams["embed"]["embedding"]) == "Q5_0"
  report = jquant.gguf.export(tmp_path / "fb.gguf", qparams, like=m, types="Q4_K")
  fb = {t.name: t for t in report.fallbacks}
  assert set(fb) == {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                     "blk.0.attn_output.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"}
  assert all(t.type == "Q5_0" and "320 inputs" in t.fallback for t in fb.values())
  assert "Q5_0" in str(report)
  # Float weights quantized by export itself (RTN) get the same fallbacks.
  rep2 = jquant.gguf.export(tmp_path / "fb2.gguf", m.params, like=m, types="Q4_K")
  assert {t.name: t.type for t in rep2.tensors} == {t.name: t.type for t in report.tensors}
  with pytest.raises(ValueError, match="fallback=False"):
    jquant.gguf.rules(m.params, "Q4_K", fallback=False)
  with pytest.raises(ValueError, match="fallback=False"):
    jquant.gguf.export(tmp_path / "fb3.gguf", m.params, like=m, types="Q4_K", fallback=False)


def test_export_errors(tmp_path, toy):
  path = tmp_path / "e.gguf"
  with pytest.raises(ValueError, match="IQ4_NL.*supported: F32, F16, BF16, Q8_0"):
    jquant.gguf.export(path, toy.params, like=toy, types="IQ4_NL")
  bad = jax.tree_util.tree_map(lambda x: x, toy.params)
  bad["layers_0"]["mlp"]["up"]["kernel"] = bad["layers_0"]["mlp"]["up"]["kernel"].at[0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match="layers_0/mlp/up/kernel.*non-finite"):
    jquant.gguf.export(path, bad, like=toy)
  odd = dict(toy.params, embed={"embedding": jquant.quantize(toy.params["embed"]["embedding"],
                                                              types.spec_for("Q8_0", axis=0, pad_groups=True))})
  with pytest.raises(ValueError, match="quantize it with axis=-1"):
    jquant.gguf.export(path, odd, like=toy)
  plain = jquant.quantize_params(toy.params, [jquant.Rule("down/kernel", jquant.QuantSpec(bits=4))])
  with pytest.raises(ValueError, match="no GGML type's grid"):
    jquant.gguf.export(path, plain, like=toy)
  extra = dict(toy.params, vision={"kernel": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match="'vision/kernel' is not part of the Llama decoder"):
    jquant.gguf.export(path, extra, like=toy)
  assert not os.listdir(tmp_path)  # failed exports leave nothing behind (no temp files)
  jquant.gguf.export(path, toy.params, like=toy)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    jquant.gguf.export(path, toy.params, like=toy)
  with pytest.raises(ValueError, match="do not match the metadata source"):
    jquant.gguf.export(tmp_path / "x.gguf", toy.params, like=None)  # SmolLM2's metadata: 30 layers


def _rewrite(src, dst, *, arch=None, fields=(), extra=()):
  """A copy of GGUF ``src`` with another architecture, more fields or more tensors."""
  r = gguf.GGUFReader(src)
  w = gguf.GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
  for f in r.fields.values():
    if f.name.startswith("GGUF.") or f.name == "general.architecture":
      continue
    key = f.name if arch is None else f.name.replace("llama.", f"{arch}.")
    w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
  for key, val, vtype in fields:
    w.add_key_value(key, val, vtype)
  for t in r.tensors:
    w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
  for name, data, qtype in extra:
    w.add_tensor(name, data, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_load_errors_name_what_is_unsupported(tmp_path, toy):
  src = tmp_path / "src.gguf"
  jquant.gguf.export(src, toy.params, like=toy)
  _rewrite(src, tmp_path / "arch.gguf", arch="mamba")
  with pytest.raises(NotImplementedError, match="'mamba'.*supported: \\('llama', 'gemma3'\\)"):
    jquant.gguf.load(tmp_path / "arch.gguf")
  iq = np.zeros((2, 18), np.uint8)
  _rewrite(src, tmp_path / "iq.gguf", extra=[("blk.0.extra.weight", iq, gguf.GGMLQuantizationType.IQ4_NL)])
  with pytest.raises(NotImplementedError, match="IQ4_NL; supported: F32, F16, BF16, Q8_0"):
    jquant.gguf.load(tmp_path / "iq.gguf")
  _rewrite(src, tmp_path / "tok.gguf", fields=[("tokenizer.ggml.model", "rwkv", gguf.GGUFValueType.STRING)])
  with pytest.raises(NotImplementedError, match="tokenizer=False"):
    jquant.gguf.load(tmp_path / "tok.gguf")
  m = jquant.gguf.load(tmp_path / "tok.gguf", tokenizer=False)  # the weights load all the same
  _assert_same_tree(toy.params, m.params)
  with pytest.raises(FileNotFoundError, match="not a file"):
    jquant.gguf.load(tmp_path / "missing.gguf")


@pytest.fixture(scope="module")
def smollm2_packed():
  return jquant.gguf.load()


def test_smollm2_packed_import(smollm2, smollm2_packed):
  """SmolLM2-135M (Q4_1 and Q8_0 tensors) loads as packed QArrays at the file's own size whose
  dequantized values are the float model's (the gguf package's values) bit for bit."""
  reader = gguf.GGUFReader(models.default_gguf_path())
  file_bytes = sum(int(t.n_bytes) for t in reader.tensors)
  assert jquant.footprint(smollm2_packed.params).total_bytes == file_bytes
  assert types.type_of(smollm2_packed.params["layers_0"]["attn"]["q"]["kernel"]) == "Q4_1"
  assert types.type_of(smollm2_packed.params["embed"]["embedding"]) == "Q8_0"
  assert smollm2_packed.config == smollm2.config
  flat = jax.tree_util.tree_flatten_with_path(smollm2_packed.params, is_leaf=_is_q)[0]
  ref = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(smollm2.params)[0])
  deq = jax.jit(jquant.dequantize)
  for k, leaf in flat:
    got = deq(leaf) if _is_q(leaf) else leaf
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref[jax.tree_util.keystr(k)]))


def test_smollm2_reexport_reproduces_the_file(tmp_path, smollm2_packed):
  """Exporting the packed SmolLM2 tree again (metadata from its own file) writes every tensor's bytes
  exactly as llama.cpp's converter did."""
  out = tmp_path / "smol.gguf"
  jquant.gguf.export(out, smollm2_packed.params)
  a = {t.name: t for t in gguf.GGUFReader(models.default_gguf_path()).tensors}
  b = {t.name: t for t in gguf.GGUFReader(out).tensors}
  assert set(a) == set(b)
  for name, t in a.items():
    assert t.tensor_type == b[name].tensor_type, name
    np.testing.assert_array_equal(np.asarray(t.data), np.asarray(b[name].data))
  r = gguf.GGUFReader(out)
  assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"


# ----------------------------------------------------------------------------- gemma3 and rope_freqs
_GEMMA = models.LlamaConfig(vocab_size=67, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, head_dim=16,
                            rope_theta=1e6, norm_eps=1e-6, activation="gelu_tanh", qk_norm=True, post_norms=True,
                            embed_scale=True, sliding_window=4, sliding_window_pattern=2, rope_local_theta=1e4)


def test_gemma3_export_and_import_round_trip(tmp_path):
  """A Gemma 3 tree is written as llama.cpp's gemma3 (q/k norms, post-norms, no q/k row permutation) and both
  loaders read back the same config and parameters (packed quantized types: the llama tests above, and the real
  Gemma 3 file in experiments/gemma3_jquant.py)."""
  m = models.llama_init(_GEMMA, jax.random.key(2))
  rep = jquant.gguf.export(tmp_path / "g.gguf", m.params, like=_GEMMA)
  reader = gguf.GGUFReader(tmp_path / "g.gguf")
  assert reader.fields["general.architecture"].contents() == "gemma3"
  assert reader.fields["gemma3.attention.sliding_window"].contents() == 4
  got = {t.name: t for t in reader.tensors}
  for n in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"):
    assert f"blk.1.{n}.weight" in got
  np.testing.assert_array_equal(np.asarray(got["blk.0.attn_q.weight"].data),  # HF row order: not permuted
                                np.asarray(m.params["layers_0"]["attn"]["q"]["kernel"]).T)
  assert rep.type_counts() == {"F32": 28}  # 2 x (7 kernels + 6 norms) + embedding + final norm
  for load in (lambda p: models.from_gguf(p, tokenizer=False),
               lambda p: jquant.gguf.load(p, tokenizer=False)):
    back = load(tmp_path / "g.gguf")
    assert back.config == _GEMMA
    _assert_same_tree(m.params, back.params)


def test_rope_freqs_round_trip_through_the_file(tmp_path):
  cfg = models.LlamaConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32,
                           rope_freq_factors=(1.0, 1.0, 2.0, 4.0, 8.0, 8.0, 16.0, 32.0), rope_scale=4.0)
  m = models.llama_init(cfg, jax.random.key(0))
  jquant.gguf.export(tmp_path / "r.gguf", m.params, like=cfg)
  reader = gguf.GGUFReader(tmp_path / "r.gguf")
  np.testing.assert_array_equal(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data,
                                np.float32(cfg.rope_freq_factors))
  assert jquant.gguf.read_config(reader) == cfg
  # Copied from a source file with like=<path>, as llama.cpp's Llama 3.1 files carry it.
  jquant.gguf.export(tmp_path / "copy.gguf", m.params, like=str(tmp_path / "r.gguf"))
  assert models.from_gguf(tmp_path / "copy.gguf", tokenizer=False).config == cfg


def test_export_argument_errors_name_the_argument(tmp_path, toy):
  """From a new user's trial: a Model for params, a missing folder and a quantized float_type gave unclear errors."""
  with pytest.raises(TypeError, match="params is a Model; allowed: a parameter tree: pass model.params"):
    jquant.gguf.export(tmp_path / "m.gguf", toy, like=toy)
  with pytest.raises(FileNotFoundError, match="the folder of path=.*nope.* does not exist"):
    jquant.gguf.export(tmp_path / "nope" / "m.gguf", toy.params, like=toy)
  with pytest.raises(ValueError, match=r"float_type='Q8_0'; allowed: \('F32', 'F16', 'BF16'\)"):
    jquant.gguf.export(tmp_path / "m.gguf", toy.params, like=toy, float_type="Q8_0")


@pytest.mark.parametrize("opts", [dict(qk_norm=True), dict(activation="gelu_tanh"), dict(sliding_window=8)])
def test_configs_no_gguf_architecture_expresses_are_refused(tmp_path, opts):
  cfg = models.LlamaConfig(**opts)
  with pytest.raises(NotImplementedError, match="no GGUF architecture jquant writes has the options"):
    jquant.gguf.export(tmp_path / "x.gguf", {}, like=cfg)  # refused before any tensor is read
  assert not os.path.exists(tmp_path / "x.gguf")
