"""Recording the input of every `Dense` layer: the one capture mechanism of jquant.

GPTQ Hessians, AWQ activation statistics, W8A8 activation ranges and the
per-layer error report all need the activations that reach each Dense layer.
`capture_inputs` runs a function and returns those inputs keyed by the layer's
path *relative to the parameters the Flax module was applied to*:

* ``m.block(params["layers_3"], h)``  -> ``"attn/q"``, ``"attn/k"``, ..., ``"mlp/down"``
* ``m.apply(params, tokens)``         -> ``"layers_3/attn/q"``, ...

Layers fed by one array receive the *same* array: in the Llama block ``attn/q``,
``attn/k``, ``attn/v`` share the attention norm's output and ``mlp/gate``,
``mlp/up`` share the MLP norm's output (`shared_input_groups` lists them), so a
solver may compute one statistic (e.g. one GPTQ Hessian) per group.

It uses Flax's method interception while ``fn`` is traced or run: it works
eagerly and under ``jax.jit`` (call `capture_inputs` *inside* the jitted
function and reduce the activations there; ``fn`` itself must not be a
separately jitted function, whose cached trace would bypass the recording).

Example:
    >>> import jax, jax.numpy as jnp, jquant
    >>> m = jquant.models.llama_init(jquant.models.LlamaConfig(), jax.random.key(0))
    >>> h = m.embed(m.params, jnp.zeros((1, 8), jnp.int32))
    >>> @jax.jit
    ... def hessians(bp, h):
    ...   out, xs = jquant.capture.capture_inputs(m.block, bp, h)
    ...   return out, {k: jnp.einsum("bti,btj->ij", x, x) for k, x in xs.items()}
    >>> out, H = hessians(m.params["layers_0"], h)
    >>> sorted(H)
    ['attn/k', 'attn/o', 'attn/q', 'attn/v', 'mlp/down', 'mlp/gate', 'mlp/up']
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from jquant.models.layers import Dense


class CaptureError(RuntimeError):
  """Raised when the recorded inputs are ambiguous or missing."""


def capture_inputs(fn: Callable, *args, **kwargs) -> tuple[Any, dict[str, Any]]:
  """Runs ``fn(*args, **kwargs)`` and records the input of every `Dense` call.

  Args:
    fn: A function that applies jquant models (``m.apply``, ``m.block``,
      ``m.embed``/``m.head``, a BERT encoder...), not wrapped in its own jit.
    *args: Its arguments.
    **kwargs: Its keyword arguments.

  Returns:
    ``(out, inputs)``: ``fn``'s result, and ``{"a/b/c": x}`` with ``x`` the
    (..., in) activation that entered the Dense at path ``a/b/c`` (the path of
    its ``kernel`` without the ``/kernel``).

  Raises:
    CaptureError: a Dense path was called twice (capture one application at a
      time), or nothing was recorded although ``fn`` ran (typically ``fn`` is
      a jitted function whose trace was cached).
  """
  recorded: dict[str, Any] = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    if isinstance(context.module, Dense) and context.method_name == "__call__":
      path = "/".join(str(p) for p in context.module.path)
      if path in recorded:
        raise CaptureError(
            f"capture_inputs: Dense {path!r} ran twice inside one capture; capture each module "
            "application separately (e.g. one m.block call per capture).")
      recorded[path] = call_args[0]
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    out = fn(*args, **kwargs)
  if not recorded:
    raise CaptureError(
        "capture_inputs: no Dense input was recorded. fn must apply jquant models directly; if fn is "
        "wrapped in jax.jit, jit the caller of capture_inputs instead.")
  return out, recorded


def shared_input_groups(paths) -> list[list[str]]:
  """Groups Dense paths known to receive the same input array.

  ``*/attn/{q,k,v}`` share one input, as do ``*/mlp/{gate,up}``; every other
  layer is its own group. Order follows ``paths``.

  Example:
    >>> shared_input_groups(["attn/q", "attn/k", "attn/v", "attn/o"])
    [['attn/q', 'attn/k', 'attn/v'], ['attn/o']]
  """
  groups: dict[str, list[str]] = {}
  for p in paths:
    prefix, _, leaf = p.rpartition("/")
    parent = prefix.rpartition("/")[2]
    if parent == "attn" and leaf in ("q", "k", "v"):
      key = prefix + "/qkv"
    elif parent == "mlp" and leaf in ("gate", "up"):
      key = prefix + "/gate_up"
    else:
      key = p
    groups.setdefault(key, []).append(p)
  return list(groups.values())
