"""The rotation math on weights: exact in real arithmetic, done in float64, stored in the weight's dtype.

A rotation ``Q`` (orthogonal, acting on row vectors as ``x @ Q``) of the
activations ``x`` that a matmul reads is absorbed by its kernel ``W``
``(K, N)`` as ``Q^T W`` (`rotate_input`): ``(x Q)(Q^T W) = x W``. A
matmul (or an embedding table) that *writes* a rotated quantity gets
``W Q`` on its output channels, and its bias ``b Q`` (`rotate_output`).
N-D kernels are viewed as the ``(K, N)`` matrix of their contraction axes
(`jquant.qarray.to_matrix`). Per-head rotations (QuaRot's value/output
rotation) are block-diagonal: ``I (x) H_m`` over the ``m`` channels of each
head (`block_diagonal`).

A norm's scale does not commute with a rotation (``diag(g) Q != Q diag(g)``),
so it is folded into the kernels reading the norm first (`fold_norm_scale`,
through `jquant.folds.apply_fold` with ``s = g``, or ``1 + g`` for Gemma's
``x * (1 + scale)``): the norm then computes ``x / rms(x)``, which does
commute, since ``rms(x Q) = rms(x)``.

Example:
    >>> import numpy as np
    >>> q = jquant.rotation.Rotation.random(8, seed=0).matrix()
    >>> w = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    >>> x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    >>> bool(np.allclose((x @ q) @ np.asarray(rotate_input(w, (0,), q)), x @ w, atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jquant import folds as folds_lib
from jquant.rotation.hadamard import RotationError


def _check_q(q, k: int, what: str) -> np.ndarray:
  q = np.asarray(q, np.float64)
  if q.shape != (k, k):
    raise RotationError(f"{what}: the rotation is {q.shape}; allowed: ({k}, {k}), the channels it acts on.")
  return q


def _matrix(w, k_axes):
  """``w`` as its float64 ``(K, N)`` NumPy matrix (`jquant.qarray.to_matrix`'s layout) and the way back."""
  a = np.asarray(w, np.float64)
  k_axes = tuple(sorted(x % a.ndim for x in k_axes))
  free = tuple(x for x in range(a.ndim) if x not in k_axes)
  t = np.transpose(a, k_axes + free)
  k = int(np.prod([a.shape[x] for x in k_axes]))

  def back(m):
    out = np.transpose(m.reshape(t.shape), np.argsort(k_axes + free))
    return jnp.asarray(out.astype(np.float32)).astype(jnp.result_type(w))

  return t.reshape(k, -1), back


def rotate_input(w, k_axes: Sequence[int], q):
  """``Q^T W`` on the contraction ``k_axes`` (flattened row-major into K): the kernel reading ``x @ Q``.

  Args:
    w: Float kernel, any rank.
    k_axes: Its contraction axes.
    q: ``(K, K)`` orthogonal matrix.

  Returns:
    The kernel in ``w``'s shape and dtype.
  """
  m, back = _matrix(w, k_axes)
  q = _check_q(q, m.shape[0], "rotate_input")
  return back(q.T @ m)


def rotate_output(w, k_axes: Sequence[int], q):
  """``W Q`` on the output channels (the axes not in ``k_axes``, flattened row-major into N).

  An embedding table ``(V, d)`` is ``rotate_output(E, (0,), Q)``; a bias
  ``(N,)`` is ``rotate_output(b, (), Q)``.
  """
  w = jnp.asarray(w)
  if len(k_axes) == 0:
    b = np.asarray(w, np.float64).reshape(-1)
    q = _check_q(q, b.size, "rotate_output")
    return jnp.asarray((b @ q).astype(np.float32)).reshape(w.shape).astype(w.dtype)
  m, back = _matrix(w, k_axes)
  q = _check_q(q, m.shape[1], "rotate_output")
  return back(m @ q)


def fixing(q_rest, d: int, keep: Sequence[int]) -> np.ndarray:
  """The ``d x d`` rotation that leaves the channels ``keep`` fixed and applies ``q_rest`` to the others (in order)."""
  keep = sorted(set(int(c) for c in keep))
  rest = [c for c in range(d) if c not in keep]
  q_rest = np.asarray(q_rest, np.float64)
  if q_rest.shape != (len(rest), len(rest)):
    raise RotationError(f"fixing: q_rest is {q_rest.shape}; allowed: ({len(rest)}, {len(rest)}) for d={d} with "
                        f"{len(keep)} kept channels.")
  q = np.eye(d)
  q[np.ix_(rest, rest)] = q_rest
  return q


def block_diagonal(q_block, k: int) -> np.ndarray:
  """``I_{k/m} (x) q_block``: the same ``m x m`` rotation on each of the ``k/m`` heads."""
  q_block = np.asarray(q_block, np.float64)
  m = q_block.shape[0]
  if k % m:
    raise RotationError(f"block_diagonal: head size m={m} does not divide k={k} channels.")
  return np.kron(np.eye(k // m), q_block)


def fold_norm_scale(flat: Mapping, fold: folds_lib.Fold, keep: Sequence[int] = ()) -> dict:
  """``flat`` with the norm's scale folded into its consumers: the norm's gain becomes the identity.

  ``norm_scale``: ``scale -> 1``, consumers ``* scale``; ``norm_one_plus_scale``
  (Gemma): ``scale -> 0``, consumers ``* (1 + scale)``. A norm bias would be
  divided by the scale (it then no longer commutes with a rotation: the
  rotated model's check reports it).

  Channels in ``keep`` keep their gain in the norm (a rotation that leaves
  them fixed commutes with it): a massive channel the model silences with a
  near-zero gain stays silenced in the activation rather than in the weight.

  Raises:
    RotationError: ``fold`` is a ``linear`` fold, or the scale has a zero.
  """
  if fold.kind not in ("norm_scale", "norm_one_plus_scale"):
    raise RotationError(f"fold_norm_scale: fold {fold.name!r} has kind {fold.kind!r}; allowed: 'norm_scale', "
                        "'norm_one_plus_scale'.")
  g = np.asarray(flat[fold.source], np.float64).reshape(-1)
  s = g.copy() if fold.kind == "norm_scale" else 1.0 + g
  keep = np.asarray(sorted(set(int(c) for c in keep)), np.int64)
  if keep.size and (keep.min() < 0 or keep.max() >= s.size):
    raise RotationError(f"fold_norm_scale: keep={keep.tolist()}; allowed: channels in [0, {s.size}).")
  s[keep] = 1.0
  if np.any(s == 0):
    raise RotationError(f"fold_norm_scale: norm {fold.name!r} has a zero gain at channels "
                        f"{np.flatnonzero(s == 0)[:8].tolist()}; it cannot be folded into its consumers.")
  folds_lib.check_fold(flat, fold)
  out = dict(flat)
  for i, c in enumerate(fold.consumers):  # W * s along the contraction, in float64 (NumPy: no compilation)
    w = np.asarray(flat[c], np.float64)
    axes = [a % w.ndim for a in fold.axes_of(i)]
    shape = [w.shape[a] if a in axes else 1 for a in range(w.ndim)]
    out[c] = jnp.asarray((w * s.reshape(shape)).astype(np.float32)).astype(jnp.result_type(flat[c]))
  if fold.bias is not None:
    b = np.asarray(flat[fold.bias], np.float64)
    out[fold.bias] = jnp.asarray((b / s.reshape(b.shape)).astype(np.float32)).astype(jnp.result_type(flat[fold.bias]))
  one = 1.0 if fold.kind == "norm_scale" else 0.0  # exact identity gain, not g / g rounded
  src = flat[fold.source]
  new = np.full(g.shape, one, np.float32)
  new[keep] = np.asarray(src, np.float32).reshape(-1)[keep]
  out[fold.source] = jnp.asarray(new.reshape(np.shape(src))).astype(jnp.result_type(src))
  return out


__all__ = ["rotate_input", "rotate_output", "block_diagonal", "fixing", "fold_norm_scale"]
