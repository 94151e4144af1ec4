"""Hadamard and randomised Hadamard rotations of any size a construction exists for, and their fast transform.

QuaRot (Ashkboos et al., 2024) and SpinQuant (Liu et al., 2024) rotate
activations with ``x @ R``, ``R`` an orthogonal ``n x n`` matrix that spreads
an outlier channel over all channels. A normalised Hadamard matrix
``H / sqrt(n)`` does that best (every entry has magnitude ``1/sqrt(n)``) and
applies in ``O(n log n)``. Sylvester's construction only gives ``n = 2^k``;
SmolLM2 has ``d = 576 = 2^6 * 9`` and an MLP width ``1536 = 2^9 * 3``.

Here ``n = p * 2^j`` with ``H_n = H_p (x) H_{2^j}`` (Kronecker product), where
``H_p`` is Paley's construction I for ``p = q + 1``, ``q`` a prime ``= 3 mod
4`` (``p`` in 4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, ...), or ``p = 1``.
``576 = 72 * 8`` and ``1536 = 12 * 128``. A size with no such factorisation
(``n = 3 * 2^j`` for ``j < 2``, any odd ``n > 1``, ...) has no `hadamard`;
`Rotation.random` then uses a random orthogonal factor (QR of a Gaussian
matrix) of the smallest such ``p`` instead, still fast in the power-of-two
part.

Convention: a `Rotation` ``R`` acts on row vectors, ``y = x @ R``, and
``R @ R.T = I``. ``R = diag(signs) @ (A (x) B) / sqrt(n)`` with ``A`` the
``p x p`` factor, ``B`` Sylvester's ``2^j x 2^j`` matrix, ``signs`` in
``{-1, +1}^n`` (all +1 for a plain Hadamard; random for QuaRot's randomised
Hadamard).

Example:
    >>> import numpy as np
    >>> from jquant.rotation import hadamard
    >>> r = hadamard.Rotation.random(576, seed=0)
    >>> q = r.matrix()                               # (576, 576) float64
    >>> bool(np.allclose(q @ q.T, np.eye(576)))
    True
    >>> x = np.random.default_rng(0).normal(size=(2, 576)).astype(np.float32)
    >>> bool(np.allclose(r.apply(x), x @ q, atol=1e-5))  # fast transform == dense product
    True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


class RotationError(ValueError):
  """A rotation that does not exist for the size asked, or does not fit a model."""


def _is_prime(q: int) -> bool:
  if q < 2:
    return False
  return all(q % d for d in range(2, int(q ** 0.5) + 1))


def _check_size(n, fn: str) -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise RotationError(f"{fn}: n={n!r}; allowed: a positive int (the number of channels rotated).")
  return int(n)


def _split(n: int) -> tuple[int, int]:
  """``(m, 2^k)``: the odd part of ``n`` and its largest power-of-two divisor."""
  k = 0
  while n % 2 == 0:
    n //= 2
    k += 1
  return n, 2 ** k


@functools.lru_cache(maxsize=None)
def paley(p: int) -> np.ndarray:
  """Paley's construction I: a ``p x p`` Hadamard matrix (entries +-1) for ``p - 1`` a prime ``= 3 mod 4``.

  ``H = I + S`` with ``S = [[0, 1^T], [-1, Q]]``, ``Q[i, j] = chi(j - i)``
  (Legendre symbol mod ``q = p - 1``); ``H @ H.T = p I``.

  Raises:
    RotationError: ``p - 1`` is not a prime ``= 3 mod 4``.
  """
  q = p - 1
  if not (_is_prime(q) and q % 4 == 3):
    raise RotationError(f"paley: p={p}; allowed: p - 1 a prime = 3 mod 4 (4, 8, 12, 20, 24, 32, 44, 48, ...).")
  squares = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if i in squares else -1 for i in range(1, q)], np.int64)
  idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
  s = np.zeros((p, p), np.int64)
  s[0, 1:] = 1
  s[1:, 0] = -1
  s[1:, 1:] = chi[idx]
  h = np.eye(p, dtype=np.int64) + s
  assert np.array_equal(h @ h.T, p * np.eye(p, dtype=np.int64)), p
  return h.astype(np.float64)


def sylvester(n: int) -> np.ndarray:
  """Sylvester's (Walsh-Hadamard) ``n x n`` matrix, ``n`` a power of two, natural order, entries +-1."""
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  if h.shape[0] != n:
    raise RotationError(f"sylvester: n={n}; allowed: a power of two.")
  return h


def hadamard_factor(n: int) -> Optional[int]:
  """The Paley order ``p`` (or 1) with ``n = p * 2^j`` used by `hadamard`, or None when there is none."""
  n = _check_size(n, "hadamard_factor")
  m, two = _split(n)
  if m == 1:
    return 1
  p = m
  while p <= n:
    if _is_prime(p - 1) and (p - 1) % 4 == 3:
      return p
    p *= 2
  return None


def has_hadamard(n: int) -> bool:
  """True when `hadamard` (``n = p * 2^j``, ``p`` 1 or a Paley order) exists for ``n``."""
  return hadamard_factor(n) is not None


def hadamard(n: int) -> np.ndarray:
  """The ``n x n`` Hadamard matrix ``H_p (x) H_{2^j}`` (entries +-1, float64, ``H @ H.T = n I``).

  Raises:
    RotationError: ``n`` has no factorisation ``p * 2^j`` with a Paley order
      ``p`` (use ``Rotation.random(n, seed, kind="orthogonal")`` there).
  """
  n = _check_size(n, "hadamard")
  p = hadamard_factor(n)
  if p is None:
    raise RotationError(f"hadamard: n={n} = {_split(n)[0]} * {_split(n)[1]} has no construction here (allowed: "
                        "p * 2^j with p = 1 or p - 1 a prime = 3 mod 4); use Rotation.random(n, seed, "
                        "kind='orthogonal'), which uses a random orthogonal factor.")
  a = np.ones((1, 1)) if p == 1 else paley(p)
  return np.kron(a, sylvester(n // p))


def _random_orthogonal(p: int, rng: np.random.Generator) -> np.ndarray:
  q, r = np.linalg.qr(rng.normal(size=(p, p)))
  return q * np.sign(np.diag(r))[None, :]  # Haar-distributed


def _fwht(x):
  """``x @ sylvester(n)`` over the last axis (unnormalised), ``n`` a power of two, in ``log2 n`` butterflies."""
  n = x.shape[-1]
  lead = x.shape[:-1]
  h = 1
  while h < n:
    y = x.reshape(lead + (n // (2 * h), 2, h))
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
    h *= 2
  return x


@dataclasses.dataclass(frozen=True, eq=False)
class Rotation:
  """An orthogonal ``n x n`` rotation ``R = diag(signs) (A (x) H_{2^j}) / sqrt(n)`` acting as ``x @ R``.

  Attributes:
    n: Size.
    factor: ``A``, the ``p x p`` float64 factor (a Paley Hadamard matrix, a
      random orthogonal matrix scaled by ``sqrt(p)``, or ``[[1]]``).
    signs: ``(n,)`` float64 +-1 (randomised Hadamard), or None (all +1).
    kind: ``"hadamard"`` or ``"orthogonal"`` (random factor).

  Build one with `Rotation.hadamard` or `Rotation.random`.
  """

  n: int
  factor: np.ndarray
  signs: Optional[np.ndarray] = None
  kind: str = "hadamard"

  @classmethod
  def hadamard(cls, n: int) -> "Rotation":
    """The normalised Hadamard rotation ``H_n / sqrt(n)`` (raises `RotationError` where none exists)."""
    n = _check_size(n, "Rotation.hadamard")
    p = hadamard_factor(n)
    if p is None:
      hadamard(n)  # raises with the explanation
    return cls(n, np.ones((1, 1)) if p == 1 else paley(p))

  @classmethod
  def random(cls, n: int, seed: int = 0, kind: str = "hadamard") -> "Rotation":
    """A randomised rotation: ``diag(random signs) H_n / sqrt(n)`` (QuaRot), fixed by ``seed``.

    Args:
      n: Size.
      seed: NumPy seed.
      kind: ``"hadamard"`` (falls back to a random orthogonal factor where no
        Hadamard matrix of size ``n`` is built) or ``"orthogonal"`` (always a
        random orthogonal factor of the odd part of ``n``).
    """
    n = _check_size(n, "Rotation.random")
    if kind not in ("hadamard", "orthogonal"):
      raise RotationError(f"Rotation.random: kind={kind!r}; allowed: 'hadamard', 'orthogonal'.")
    rng = np.random.default_rng(seed)
    p = hadamard_factor(n) if kind == "hadamard" else None
    if p is not None:
      factor, kind = (np.ones((1, 1)) if p == 1 else paley(p)), "hadamard"
    else:
      p = _split(n)[0]
      factor, kind = _random_orthogonal(p, rng) * np.sqrt(p), "orthogonal"
    signs = rng.choice(np.array([-1.0, 1.0]), size=n)
    return cls(n, factor, signs, kind)

  def _key(self):
    return (self.n, self.kind, self.factor.tobytes(), None if self.signs is None else self.signs.tobytes())

  def __eq__(self, other):  # by value: a Rotation is static pytree data (jit caches compare it)
    return isinstance(other, Rotation) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  @property
  def p(self) -> int:
    return int(self.factor.shape[0])

  def matrix(self) -> np.ndarray:
    """The dense ``(n, n)`` float64 matrix ``R`` (orthogonal)."""
    r = np.kron(self.factor, sylvester(self.n // self.p)) / np.sqrt(self.n)
    return r if self.signs is None else self.signs[:, None] * r

  def apply(self, x):
    """``x @ R`` over the last axis in ``O(n (log n + p))``; float32 arithmetic for float32 ``x``.

    Args:
      x: Float array ``(..., n)``.

    Returns:
      ``(..., n)``, ``x``'s dtype (computed in float32 at least).

    Raises:
      RotationError: the last axis is not ``n``.
    """
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != self.n:
      raise RotationError(f"Rotation.apply: x has shape {tuple(x.shape)}; allowed: (..., {self.n}).")
    dtype = x.dtype
    y = x.astype(jnp.promote_types(dtype, jnp.float32))
    if self.signs is not None:
      y = y * jnp.asarray(self.signs, y.dtype)
    lead, p = y.shape[:-1], self.p
    y = _fwht(y.reshape(lead + (p, self.n // p)))
    if p > 1:  # Y = A^T X B: contract the factor over the p axis
      y = jnp.einsum("...ab,ac->...cb", y, jnp.asarray(self.factor, y.dtype), precision=jax.lax.Precision.HIGHEST)
    return (y.reshape(lead + (self.n,)) * np.float32(1.0 / np.sqrt(self.n))).astype(dtype)


__all__ = ["Rotation", "RotationError", "hadamard", "has_hadamard", "hadamard_factor", "paley", "sylvester"]
