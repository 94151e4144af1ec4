"""experiments/gemma3_gguf.py: the GGUF -> gemma-package mapping, on toy data (the tokenizer: test_gguf_tokenizer.py).

No gemma package, no GGUF file: a fake reader holds small float32 tensors in
llama.cpp's layout, and the mapped einsum kernels must compute exactly what
the GGUF's (out, in) matrices compute.
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import gemma3_gguf as G  # noqa: E402


class _Field:
  def __init__(self, v):
    self.v = v

  def contents(self):
    return self.v


class _Tensor:
  def __init__(self, name, arr):
    import gguf
    self.name, self.data = name, np.ascontiguousarray(arr, np.float32)
    self.shape = np.asarray(list(reversed(arr.shape)), np.uint64)  # GGUF lists ne0 (the inner axis) first
    self.tensor_type = gguf.GGMLQuantizationType.F32


class _Reader:
  def __init__(self, fields, tensors):
    self.fields = {k: _Field(v) for k, v in fields.items()}
    self.tensors = [_Tensor(k, v) for k, v in tensors.items()]


D, N, K, HD, F, V, L = 8, 2, 1, 4, 12, 10, 2


def _toy():
  rng = np.random.default_rng(0)
  t = {"token_embd.weight": rng.normal(size=(V, D)), "output_norm.weight": 1 + rng.normal(size=D)}
  for i in range(L):
    b = f"blk.{i}."
    t.update({b + "attn_q.weight": rng.normal(size=(N * HD, D)), b + "attn_k.weight": rng.normal(size=(K * HD, D)),
              b + "attn_v.weight": rng.normal(size=(K * HD, D)), b + "attn_output.weight": rng.normal(size=(D, N * HD)),
              b + "ffn_gate.weight": rng.normal(size=(F, D)), b + "ffn_up.weight": rng.normal(size=(F, D)),
              b + "ffn_down.weight": rng.normal(size=(D, F))})
    for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
      t[b + n + ".weight"] = 1 + rng.normal(size=D)
    for n in ("attn_q_norm", "attn_k_norm"):
      t[b + n + ".weight"] = 1 + rng.normal(size=HD)
  t = {k: v.astype(np.float32) for k, v in t.items()}
  fields = {"gemma3.attention.head_count": N, "gemma3.attention.head_count_kv": K, "gemma3.attention.key_length": HD}
  return _Reader(fields, t), t


def _expected():
  e = {"embedder/input_embedding": (V, D), "final_norm/scale": (D,)}
  for i in range(L):
    p = f"layer_{i}/"
    e.update({p + "attn/q_einsum/w": (N, D, HD), p + "attn/kv_einsum/w": (2, K, D, HD),
              p + "attn/attn_vec_einsum/w": (N, HD, D), p + "mlp/gating_einsum": (2, F, D), p + "mlp/linear": (F, D),
              p + "attn/_query_norm/scale": (HD,), p + "attn/_key_norm/scale": (HD,)})
    for n in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
      e[p + n + "/scale"] = (D,)
  return e


def test_mapped_kernels_compute_what_the_gguf_matrices_compute():
  reader, t = _toy()
  p = G.gemma_params(reader, _expected(), progress=False)
  x = np.random.default_rng(1).normal(size=(3, 5, D)).astype(np.float32)
  for i in range(L):
    b, a, m = f"blk.{i}.", p[f"layer_{i}"]["attn"], p[f"layer_{i}"]["mlp"]
    # gemma's own einsums (_modules.Attention / FeedForward) against y = x @ W.T with W (out, in).
    q = np.einsum("BTD,NDH->BTNH", x, a["q_einsum"]["w"])
    np.testing.assert_allclose(q, (x @ t[b + "attn_q.weight"].T).reshape(3, 5, N, HD), rtol=1e-5, atol=1e-5)
    k, v = np.einsum("BSD,CKDH->CBSKH", x, a["kv_einsum"]["w"])
    np.testing.assert_allclose(k, (x @ t[b + "attn_k.weight"].T).reshape(3, 5, K, HD), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, (x @ t[b + "attn_v.weight"].T).reshape(3, 5, K, HD), rtol=1e-5, atol=1e-5)
    o = np.einsum("BTNH,NHD->BTD", q, a["attn_vec_einsum"]["w"])
    np.testing.assert_allclose(o, q.reshape(3, 5, N * HD) @ t[b + "attn_output.weight"].T, rtol=1e-4, atol=1e-4)
    gate = np.einsum("...F,NHF->...NH", x, m["gating_einsum"])
    np.testing.assert_allclose(gate[..., 0, :], x @ t[b + "ffn_gate.weight"].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gate[..., 1, :], x @ t[b + "ffn_up.weight"].T, rtol=1e-5, atol=1e-5)
    h = gate[..., 1, :]
    np.testing.assert_allclose(np.einsum("...H,HF->...F", h, m["linear"]), h @ t[b + "ffn_down.weight"].T,
                               rtol=1e-4, atol=1e-4)
    # Gemma's RMSNorm multiplies by (1 + scale); llama.cpp stores 1 + scale.
    np.testing.assert_array_equal(p[f"layer_{i}"]["pre_ffw_norm"]["scale"], t[b + "ffn_norm.weight"] - np.float32(1))
    np.testing.assert_array_equal(a["_key_norm"]["scale"], t[b + "attn_k_norm.weight"] - np.float32(1))
  np.testing.assert_array_equal(p["embedder"]["input_embedding"], t["token_embd.weight"])


def test_mapping_refuses_shapes_the_model_does_not_expect():
  reader, _ = _toy()
  bad = dict(_expected(), **{"layer_1/mlp/linear": (D, F)})
  with pytest.raises(ValueError, match="layer_1/mlp/linear"):
    G.gemma_params(reader, bad, progress=False)
  with pytest.raises(ValueError, match="missing"):
    G.gemma_params(reader, dict(_expected(), **{"layer_2/mlp/linear": (F, D)}), progress=False)
