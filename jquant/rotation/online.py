"""`OnlineRotation`: a weight leaf whose matmul rotates its input first (the transforms that cannot be folded).

The MLP's down projection reads ``silu(gate) * up``: an elementwise product,
so a rotation of its input cannot be folded into ``gate``/``up``. QuaRot
applies a Hadamard transform to that input in the forward pass instead and
folds its inverse into the kernel: ``(x R) (R^T W) = x W``. `OnlineRotation`
is that as a parameter leaf, so it works for any model run through
`jquant.quantized`: its ``__qdot__`` applies ``R`` (`Rotation.apply`, a fast
Walsh-Hadamard transform) and then `jquant.ops.qdot` with the inner weight,
which may be a float kernel, a `QArray`, or a leaf that also quantizes the
activations (`jquant.ops.W8A8Weight`, `jquant.ops.IntMatmulWeight`): those
quantize the *rotated* input.

Example:
    >>> from jquant.rotation import OnlineRotation, Rotation
    >>> r = Rotation.hadamard(1536)
    >>> leaf = OnlineRotation(r.matrix().T.astype("float32") @ w_down, r)   # R^T W, (1536, 576)
    >>> y = jquant.ops.qdot(x, leaf)                                         # == x @ w_down
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from jquant.rotation.hadamard import Rotation, RotationError


@jax.tree_util.register_pytree_node_class
class OnlineRotation(NamedTuple):
  """A (K, N) weight whose product first rotates the activations: ``qdot(x, leaf) = qdot(x @ R, weight)``.

  Attributes:
    weight: The kernel already multiplied by ``R^T`` on its contraction
      (float, `QArray`, or an activation-quantizing leaf).
    rotation: The `Rotation` ``R`` (K x K), static (pytree aux data).
  """

  weight: Any
  rotation: Rotation

  def tree_flatten(self):
    return (self.weight,), self.rotation

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], aux)

  @property
  def shape(self):
    from jquant.intercept import logical_struct
    w = self.weight
    return tuple(logical_struct(w).shape) if not hasattr(w, "shape") else tuple(w.shape)

  @property
  def dtype(self):
    from jquant.intercept import logical_struct
    w = self.weight
    return logical_struct(w).dtype if not hasattr(w, "dtype") else w.dtype

  def __qdot__(self, x):
    from jquant.ops import qdot
    if x.shape[-1] != self.rotation.n:
      raise RotationError(f"OnlineRotation: input has {x.shape[-1]} channels, the rotation {self.rotation.n}; "
                          "the leaf must wrap the kernel whose contraction the rotation was built for.")
    return qdot(self.rotation.apply(x), self.weight)


def wrap(params, paths, rotations) -> Any:
  """``params`` with the leaves at ``paths`` wrapped as `OnlineRotation` (``rotations[path]``)."""
  from jquant.intercept import is_quantized
  from jquant.utils import path_str
  leaves, tree = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
  out = []
  for kp, v in leaves:
    p = path_str(kp)
    out.append(OnlineRotation(v, rotations[p]) if p in paths else v)
  return jax.tree_util.tree_unflatten(tree, out)


__all__ = ["OnlineRotation", "wrap"]
