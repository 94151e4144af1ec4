"""Building blocks shared by the models: `Dense` (every matmul goes through
`jquant.ops.qdot`), `RMSNorm`, `LayerNorm`, and embedding look-ups that accept
packed weights.

`Dense` is the unit that quantization rules, capture (`jquant.capture`) and
the per-layer error report all speak of: its parameters are ``kernel`` (in, out)
and optionally ``bias``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jquant.models.layers import Dense
    >>> p = Dense(8).init(jax.random.key(0), jnp.ones((2, 4)))
    >>> Dense(8).apply(p, jnp.ones((2, 4))).shape
    (2, 8)
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant import ops
from jquant.qarray import QArray, dequantize


def _get_or_init(module: nn.Module, name: str, init_fn: Callable, shape, dtype=jnp.float32):
  """A parameter that may hold a `QArray` or a ``__qdot__`` wrapper.

  Linen's ``self.param`` compares the stored value's shape with the
  initializer's; a packed payload has a different shape, so stored values are
  read directly and the initializer runs only at ``init``.
  """
  if module.has_variable("params", name):
    return module.get_variable("params", name)
  return module.param(name, init_fn, shape, dtype)


def as_float(w, dtype=None):
  """Dequantizes a `QArray` (inside the compiled function); floats pass through."""
  if isinstance(w, QArray):
    return dequantize(w, dtype)
  return w if dtype is None else jnp.asarray(w).astype(dtype)


class Dense(nn.Module):
  """``y = qdot(x, kernel) + bias`` with ``kernel`` laid out (in, out).

  The kernel may be a float array, a `jquant.QArray` (dequantized inside the
  jitted forward, stored packed) or any object with ``__qdot__``. Inputs of
  every `Dense` call can be recorded with `jquant.capture.capture_inputs`.

  Attributes:
    features: Output size.
    use_bias: Adds a ``bias`` parameter (BERT) or not (Llama).
    kernel_init: Initializer for toy models.
  """

  features: int
  use_bias: bool = False
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = _get_or_init(self, "kernel", self.kernel_init, (x.shape[-1], self.features))
    y = ops.qdot(x, kernel)
    if self.use_bias:
      bias = _get_or_init(self, "bias", nn.initializers.zeros, (self.features,))
      y = y + as_float(bias, y.dtype)
    return y


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned ``scale`` (computed in float32)."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = _get_or_init(self, "scale", nn.initializers.ones, (x.shape[-1],))
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * as_float(scale, jnp.float32)).astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with ``scale`` and ``bias`` (computed in float32)."""

  eps: float = 1e-12

  @nn.compact
  def __call__(self, x):
    scale = _get_or_init(self, "scale", nn.initializers.ones, (x.shape[-1],))
    bias = _get_or_init(self, "bias", nn.initializers.zeros, (x.shape[-1],))
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + self.eps)
    return (y * as_float(scale, jnp.float32) + as_float(bias, jnp.float32)).astype(x.dtype)


class Embed(nn.Module):
  """Token embedding table ``embedding`` (vocab, dim); float or `QArray`."""

  num_embeddings: int
  features: int
  embedding_init: Callable = nn.initializers.normal(stddev=0.02)

  def setup(self):
    self.embedding = _get_or_init(self, "embedding", self.embedding_init,
                                  (self.num_embeddings, self.features))

  def __call__(self, tokens):
    return jnp.take(as_float(self.embedding), tokens, axis=0)

  def attend(self, h):
    """Logits against the (tied) table: ``h @ embedding.T``."""
    return jnp.dot(h, as_float(self.embedding, h.dtype).T)

