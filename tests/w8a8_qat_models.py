"""Toy models a user would write, with Flax's own layers only (for the W8A8, calibration and QAT tests).

Four models, each ``tokens (B, T) int32 -> logits (B, T, V)`` with two blocks:

* `LinenDense`: ``nn.Embed``, ``nn.LayerNorm`` and ``nn.Dense`` MLP blocks ``layers_0``, ``layers_1``.
* `LinenGeneral` (Gemma / MaxText style): causal attention with a Gemma-style query einsum
  ``(heads, d, head_dim)`` contracted on axis 1, ``nn.DenseGeneral`` keys/values ``(d, heads, head_dim)``
  and output ``(heads, head_dim, d)`` contracted on ``(0, 1)``, a stacked gate/up ``nn.Einsum``
  ``(2, d, ffn)`` and a down ``nn.Einsum`` ``(d, ffn)`` contracted on its last axis.
* `NNXDense`, `NNXGeneral`: the same with ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum``,
  blocks in an ``nnx.List``.

`make(name)` returns ``(apply, params, tokens)`` with ``apply(params, tokens)``: for Linen,
``model.apply({"params": p}, t)``; for NNX, a merge-and-call over the split state.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

V, D, H, HD, F = 61, 32, 4, 8, 48
NAMES = ("linen_dense", "linen_general", "nnx_dense", "nnx_general")
# Contraction axes each model's own ops give its kernels (what capture.contraction_axes must read).
GENERAL_AXES = {"q/kernel": (1,), "k/kernel": (0,), "v/kernel": (0,), "o/kernel": (0, 1),
                "gate_up/kernel": (1,), "down/kernel": (1,)}


def _attend(q, k, v):
  t = q.shape[1]
  logits = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(HD)
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
  return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, axis=-1), v)


class _LinenDenseBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(F, name="up")(nn.LayerNorm(name="norm")(x))
    return x + nn.Dense(D, name="down")(jax.nn.gelu(h))


class LinenDense(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, D, name="embed")(tokens)
    for i in range(2):
      x = _LinenDenseBlock(name=f"layers_{i}")(x)
    return nn.Dense(V, name="head")(nn.LayerNorm(name="final_norm")(x))


class _LinenGeneralBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.RMSNorm(name="attn_norm")(x)
    q = nn.Einsum((H, D, HD), "btd,hdk->bthk", use_bias=False, name="q")(h)
    k = nn.DenseGeneral((H, HD), use_bias=False, name="k")(h)
    v = nn.DenseGeneral((H, HD), use_bias=False, name="v")(h)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o")(_attend(q, k, v))
    h = nn.RMSNorm(name="mlp_norm")(x)
    gu = nn.Einsum((2, D, F), "btd,cdf->cbtf", use_bias=False, name="gate_up")(h)
    return x + nn.Einsum((D, F), "btf,df->btd", use_bias=False, name="down")(jax.nn.gelu(gu[0]) * gu[1])


class LinenGeneral(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, D, name="embed")(tokens)
    for i in range(2):
      x = _LinenGeneralBlock(name=f"layers_{i}")(x)
    return nn.Dense(V, use_bias=False, name="head")(nn.RMSNorm(name="final_norm")(x))


class _NNXDenseBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, F, rngs=rngs)
    self.down = nnx.Linear(F, D, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class NNXDense(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.layers = nnx.List([_NNXDenseBlock(rngs) for _ in range(2)])
    self.final_norm = nnx.LayerNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for b in self.layers:
      x = b(x)
    return self.head(self.final_norm(x))


class _NNXGeneralBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn_norm = nnx.RMSNorm(D, rngs=rngs)
    self.q = nnx.Einsum("btd,hdk->bthk", (H, D, HD), rngs=rngs)
    self.k = nnx.LinearGeneral(D, (H, HD), use_bias=False, rngs=rngs)
    self.v = nnx.LinearGeneral(D, (H, HD), use_bias=False, rngs=rngs)
    self.o = nnx.LinearGeneral((H, HD), D, axis=(-2, -1), use_bias=False, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(D, rngs=rngs)
    self.gate_up = nnx.Einsum("btd,cdf->cbtf", (2, D, F), rngs=rngs)
    self.down = nnx.Einsum("btf,df->btd", (D, F), rngs=rngs)

  def __call__(self, x):
    h = self.attn_norm(x)
    x = x + self.o(_attend(self.q(h), self.k(h), self.v(h)))
    gu = self.gate_up(self.mlp_norm(x))
    return x + self.down(jax.nn.gelu(gu[0]) * gu[1])


class NNXGeneral(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.layers = nnx.List([_NNXGeneralBlock(rngs) for _ in range(2)])
    self.final_norm = nnx.RMSNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for b in self.layers:
      x = b(x)
    return self.head(self.final_norm(x))


def tokens(n=4, t=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (n, t), 0, V, jnp.int32)


def make(name: str, seed: int = 0):
  """``(model, apply, params, tokens)``: the model object, ``apply(params, tokens)``, float params, tokens."""
  toks = tokens()
  if name.startswith("linen"):
    model = LinenDense() if name == "linen_dense" else LinenGeneral()
    params = model.init(jax.random.key(seed), toks)["params"]
    return model, (lambda p, t: model.apply({"params": p}, t)), params, toks
  model = (NNXDense if name == "nnx_dense" else NNXGeneral)(nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  return model, (lambda s, t: nnx.merge(graphdef, s)(t)), state, toks


def block_kernels(name: str) -> list:
  """The block kernel paths (relative to a block) of model ``name``."""
  if name.endswith("dense"):
    return ["down/kernel", "up/kernel"]
  return sorted(GENERAL_AXES)


def block_prefix(name: str, i: int) -> str:
  return f"layers_{i}" if name.startswith("linen") else f"layers/{i}"
