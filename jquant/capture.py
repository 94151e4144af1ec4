"""Recording the input of every matmul of any model: the one capture mechanism of jquant.

GPTQ Hessians, AWQ activation statistics, W8A8 activation ranges and the
per-layer error report all need the activations that reach each weight.
`capture_inputs` runs a function (a Linen ``model.apply``, an NNX
merge-and-call, a block of one, jquant's own models) and returns the input of
every ``dot_general`` against a parameter leaf (float, rank >= 2, or
quantized), keyed by the weight's parameter path *relative to the arguments*:

* ``model.apply({"params": p}, x)``  -> ``"layers_3/attn/q/kernel"``, ...
* ``block.apply({"params": p["layers_3"]}, h)`` -> ``"attn/q/kernel"``, ...
* an NNX state ``s`` in ``lambda s, x: nnx.merge(g, s)(x)`` -> ``"layers/0/attn/q/kernel"``

Inputs come back shaped ``(..., K)``: the contracted axes of the activation
flattened last, in the order of the weight's axes, so that ``x @ W2`` with
``W2`` the weight viewed as ``(K, N)`` (`contraction_axes` says which axes
are K) is the layer's product. It works for ``nn.Dense``, ``nn.DenseGeneral``,
``nn.Einsum``, ``jnp.einsum``/``jnp.dot`` on parameters, NNX's ``Linear``,
``LinearGeneral`` and ``Einsum``, eagerly and under ``jax.jit`` (it reads the
program JAX traces, see `jquant.intercept`).

Layers fed by the same array (q/k/v after one norm, gate/up) are listed by
`shared_input_groups`, so a solver can compute one statistic (e.g. one GPTQ
Hessian) per group.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jquant
    >>> model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(8)])
    >>> x = jnp.ones((4, 16))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> out, xs = jquant.capture.capture_inputs(model.apply, {"params": params}, x)
    >>> {k: v.shape for k, v in xs.items()}
    {'layers_0/kernel': (4, 16), 'layers_2/kernel': (4, 32)}
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from jquant import intercept


class CaptureError(RuntimeError):
  """Raised when the recorded inputs are ambiguous or missing."""


@jax.tree_util.register_pytree_node_class
class Captured(NamedTuple):
  """What `capture` records; a pytree whose axes and groups are static (it can leave a jit).

  Attributes:
    out: The function's output.
    inputs: ``{path: x}``, ``x`` shaped ``(..., K)``.
    axes: ``{path: the weight's contraction axes}`` (ascending).
    groups: Paths fed by the same array, in call order (`shared_input_groups`).
  """

  out: Any
  inputs: dict
  axes: dict
  groups: list

  def tree_flatten(self):
    return (self.out, self.inputs), (tuple(self.axes.items()), tuple(tuple(g) for g in self.groups))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], children[1], dict(aux[0]), [list(g) for g in aux[1]])


def capture(fn: Callable, *args, **kwargs) -> Captured:
  """Runs ``fn(*args, **kwargs)`` and records the input of every matmul against a parameter.

  Raises:
    CaptureError: no matmul against a parameter leaf was found, or one
      parameter fed two matmuls (capture one application at a time).
  """
  out, inputs, axes, order, sources = intercept.record_matmul_inputs(fn, *args, **kwargs)
  if not inputs:
    raise CaptureError(
        "capture: no matmul against a parameter was found. Looked for dot_general (nn.Dense, DenseGeneral, "
        "Einsum, jnp.einsum, jnp.dot, nnx.Linear...) whose operand is a leaf of the arguments: a float array "
        "of rank >= 2 or a quantized leaf. Pass the parameters as arguments of fn (not closed over).")
  return Captured(out, {p: inputs[p] for p in order}, {p: axes[p] for p in order},
                  intercept.group_by_source(order, sources))


def capture_inputs(fn: Callable, *args, **kwargs) -> tuple[Any, dict[str, Any]]:
  """``(out, {path: x})``: `capture` without the axes and groups.

  Args:
    fn: Any function of parameters and inputs (``model.apply``, a block's
      apply, an NNX merge-and-call).
    *args: Its arguments; parameters must be among them.
    **kwargs: Its keyword arguments.

  Returns:
    ``fn``'s result, and ``{"a/b/kernel": x}`` with ``x`` the ``(..., K)``
    activation that entered the matmul against that parameter.

  Raises:
    CaptureError: nothing recorded, or a parameter used by two matmuls.
  """
  c = capture(fn, *args, **kwargs)
  return c.out, c.inputs


def _abstract(fn: Callable, *args, **kwargs) -> Captured:
  """`capture` run abstractly: its axes and groups are static, so they survive `jax.eval_shape`."""
  return jax.eval_shape(lambda *a, **kw: capture(fn, *a, **kw), *args, **kwargs)


def contraction_axes(fn: Callable, *args, **kwargs) -> dict[str, tuple]:
  """``{path: axes}``: the axes each parameter is contracted over, read from the model's own ops.

  Runs abstractly (`jax.eval_shape`): nothing is computed. Pass the result
  to `jquant.quantize_params(..., axes=...)` so that one rule quantizes every
  weight of a model along its real contraction (Gemma's ``(heads, d, hd)``
  query kernel along ``d``, a ``DenseGeneral`` output projection along
  ``(heads, head_dim)``).

  Example:
    >>> axes = jquant.capture.contraction_axes(model.apply, {"params": params}, x)
  """
  return _abstract(fn, *args, **kwargs).axes


def shared_input_groups(fn: Callable, *args, **kwargs) -> list[list[str]]:
  """Groups of parameter paths whose matmuls read the very same activation array.

  Read from the traced program, not from names: q/k/v after one norm are one
  group, gate/up another; every other layer is its own group.
  """
  return _abstract(fn, *args, **kwargs).groups


__all__ = ["capture", "capture_inputs", "contraction_axes", "shared_input_groups", "Captured",
           "CaptureError"]
