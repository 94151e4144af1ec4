"""Toy models a user would write with Flax's own layers, for the folds, AWQ and SmoothQuant tests.

Each has two blocks and takes ``tokens (B, T) int32`` (or, for `LinenMLP`, ``x (B, T, D)``):

* `LinenLlama`: pre-norm decoder; ``nn.RMSNorm`` (``x * scale``), grouped-query attention with
  ``nn.DenseGeneral`` q/k/v ``(d, heads, head_dim)`` and o ``(heads, head_dim, d)`` contracted on
  ``(0, 1)``, a SwiGLU MLP with an ``nn.Einsum`` gate, ``nn.Dense`` up and down.
* `LinenGemma`: Gemma style: ``x * (1 + scale)`` norms, attention and MLP weights as raw einsum
  parameters (``q_einsum (N, D, H)``, stacked ``kv_einsum (2, N, D, H)``, ``attn_vec_einsum (N, H, D)``,
  stacked ``gating_einsum (2, F, D)``, ``linear (F, D)``), post-attention / post-MLP norms.
* `LinenBert`: post-LayerNorm encoder block with biases everywhere and a GELU MLP.
* `LinenMLP`: ``LayerNorm -> up (+bias) -> act -> down (+bias)`` residual blocks on float inputs, with
  the activation chosen (``"none"``, ``"relu"``, ``"gelu"``): the issue's bad folds.
* `NNXLlama`: ``nnx.RMSNorm`` and ``nnx.Linear`` (multi-head attention, SwiGLU), blocks in an ``nnx.List``.

`outliers(params, ...)` plants large channels in the norms, as trained LLMs have.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

V, D, H, KV, HD, F = 64, 32, 4, 2, 8, 64


def _causal(t):
  return jnp.tril(jnp.ones((t, t), bool))


class _LlamaBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    h = nn.RMSNorm(name="attn_norm")(x)
    q = nn.DenseGeneral((H, HD), use_bias=False, name="q")(h)
    k = nn.DenseGeneral((KV, HD), use_bias=False, name="k")(h)
    v = nn.DenseGeneral((KV, HD), use_bias=False, name="v")(h)
    q = q.reshape(b, t, KV, H // KV, HD)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(HD)
    p = jax.nn.softmax(jnp.where(_causal(t), s, -1e9), axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, H, HD)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o")(o)
    h = nn.RMSNorm(name="mlp_norm")(x)
    gate = nn.Einsum((D, F), "btd,df->btf", use_bias=False, name="gate")(h)
    up = nn.Dense(F, use_bias=False, name="up")(h)
    return x + nn.Dense(D, use_bias=False, name="down")(jax.nn.silu(gate) * up)


class LinenLlama(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, D, name="embed")(tokens)
    for i in range(2):
      x = _LlamaBlock(name=f"layers_{i}")(x)
    return nn.Dense(V, use_bias=False, name="head")(nn.RMSNorm(name="final_norm")(x))


class GemmaNorm(nn.Module):
  """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)``, scale initialized to 0."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + 1e-6) * (1 + scale)


class _GemmaBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    t = x.shape[1]
    init = nn.initializers.normal(0.2)
    h = GemmaNorm(name="pre_attention_norm")(x)
    q = jnp.einsum("BTD,NDH->BTNH", h, self.param("q_einsum", init, (H, D, HD)))
    k, v = jnp.einsum("BSD,CKDH->CBSKH", h, self.param("kv_einsum", init, (2, H, D, HD)))
    s = jnp.einsum("BTNH,BSNH->BTNS", q, k) / math.sqrt(HD)
    p = jax.nn.softmax(jnp.where(_causal(t)[None, :, None, :], s, -1e9), axis=-1)
    o = jnp.einsum("BTNS,BSNH->BTNH", p, v)
    o = jnp.einsum("BTNH,NHD->BTD", o, self.param("attn_vec_einsum", init, (H, HD, D)))
    x = x + GemmaNorm(name="post_attention_norm")(o)
    h = GemmaNorm(name="pre_ffw_norm")(x)
    gate, up = jnp.einsum("BTD,CFD->CBTF", h, self.param("gating_einsum", init, (2, F, D)))
    y = jnp.einsum("BTF,FD->BTD", jax.nn.gelu(gate) * up, self.param("linear", init, (F, D)))
    return x + GemmaNorm(name="post_ffw_norm")(y)


class LinenGemma(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, D, name="embedder")(tokens) * math.sqrt(D)
    for i in range(2):
      x = _GemmaBlock(name=f"layer_{i}")(x)
    return GemmaNorm(name="final_norm")(x)


class _BertBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    q = nn.Dense(D, name="q")(x).reshape(b, t, H, HD)
    k = nn.Dense(D, name="k")(x).reshape(b, t, H, HD)
    v = nn.Dense(D, name="v")(x).reshape(b, t, H, HD)
    p = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(HD), axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, D)
    x = nn.LayerNorm(name="attn_norm")(x + nn.Dense(D, name="o")(o))
    y = nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(F, name="up")(x)))
    return nn.LayerNorm(name="mlp_norm")(x + y)


class LinenBert(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.LayerNorm(name="embed_norm")(nn.Embed(V, D, name="embed")(tokens))
    for i in range(2):
      x = _BertBlock(name=f"layers_{i}")(x)
    return x


ACTIVATIONS = {"none": lambda h: h, "relu": jax.nn.relu, "gelu": jax.nn.gelu}


class _MLPBlock(nn.Module):
  act: str

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(F, name="up")(nn.LayerNorm(name="norm")(x))
    return x + nn.Dense(D, name="down")(ACTIVATIONS[self.act](h))


class LinenMLP(nn.Module):
  act: str = "none"

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = _MLPBlock(self.act, name=f"layers_{i}")(x)
    return x


class _NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn_norm = nnx.RMSNorm(D, rngs=rngs)
    self.q, self.k, self.v, self.o = (nnx.Linear(D, D, use_bias=False, rngs=rngs) for _ in range(4))
    self.mlp_norm = nnx.RMSNorm(D, rngs=rngs)
    self.gate = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    h = self.attn_norm(x)
    q, k, v = (f(h).reshape(b, t, H, HD) for f in (self.q, self.k, self.v))
    s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(HD)
    p = jax.nn.softmax(jnp.where(_causal(t), s, -1e9), axis=-1)
    x = x + self.o(jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, D))
    h = self.mlp_norm(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class NNXLlama(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.layers = nnx.List([_NNXBlock(rngs) for _ in range(2)])
    self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for blk in self.layers:
      x = blk(x)
    return self.head(x)


def tokens(n=8, t=16, seed=1):
  return jax.random.randint(jax.random.key(seed), (n, t), 0, V)


def init(model, x, seed=0):
  """Float params of a Linen model (a plain nested dict)."""
  return jax.tree_util.tree_map(jnp.asarray, model.init(jax.random.key(seed), x)["params"])


def outliers(params, norms, channels=((3, 20.0), (17, 12.0)), one_plus: bool = False):
  """``params`` with the norms' gain multiplied by ``f`` at channels ``c`` (``1 + scale`` when ``one_plus``)."""
  out = jax.tree_util.tree_map(lambda a: a, params)
  for path in norms:
    node = out
    *head, last = path.split("/")
    for p in head:
      node = node[p]
    s = node[last]
    for c, f in channels:
      s = s.at[c].set((1.0 + s[c]) * f - 1.0 if one_plus else s[c] * f)
    node[last] = s
  return out


def random_biases(params, seed=5, scale=0.5):
  """``params`` with every ``bias`` leaf drawn from N(0, scale^2) (Flax initializes them to 0)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [scale * jax.random.normal(k, v.shape, v.dtype) if getattr(kp[-1], "key", None) == "bias" else v
         for k, (kp, v) in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(tree, out)
