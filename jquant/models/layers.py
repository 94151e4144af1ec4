"""Norms shared by jquant's own models, written as ordinary Flax modules.

jquant's models use Flax's own ``nn.Dense`` and ``nn.Embed`` and these two
norms; nothing in them knows about quantization. Quantized parameter trees run
through `jquant.quantized` like any user's model.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jquant.models.layers import RMSNorm
    >>> p = RMSNorm().init(jax.random.key(0), jnp.ones((2, 4)))
    >>> RMSNorm().apply(p, jnp.ones((2, 4))).shape
    (2, 4)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned ``scale`` (computed in float32)."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with ``scale`` and ``bias`` (computed in float32)."""

  eps: float = 1e-12

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
