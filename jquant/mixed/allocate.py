"""The budgeted choice of one spec per weight: `allocate` -> `Allocation` (a list of `jquant.Rule` s).

Given a `jquant.mixed.Sensitivity` (damage ``d[t, c]`` and exact bytes
``b[t, c]`` of candidate c on weight t), `allocate` solves the
multiple-choice knapsack

    minimise sum_t d[t, c_t]   subject to   sum_t b[t, c_t] <= budget

with one of two solvers:

* ``"dp"``: exact dynamic programming over integer byte costs, all costs and
  the budget divided by the gcd of the costs. Cells: ``T x (budget/gcd + 1)``.
* ``"lagrange"``: the Lagrangian relaxation ``min sum_t d[t, c] + lam b[t, c]``
  swept over ``lam`` exactly, i.e. the lower convex hull of each weight's
  (bytes, damage) points walked in order of steepest damage per byte, then
  the bytes left filled greedily by single-weight changes. It is exact when
  the budget falls on the hull (the walk stops with every upgrade that fits
  taken); otherwise its damage exceeds the optimum by at most the one hull
  step that did not fit. `Allocation.bound` is the LP lower bound, so the gap
  is always known.

``"auto"`` runs ``"dp"`` when it has at most ``max_dp_cells`` cells, else
``"lagrange"``. Ties go to the candidate listed first, the weight listed
first: the same sensitivity and budget give the same rules.

Example:
    >>> sens = jquant.mixed.measure(m.params, hs, jquant.mixed.gguf_candidates())
    >>> alloc = jquant.mixed.allocate(sens, bits_per_weight=4.5)
    >>> print(alloc)                                      # per weight: type, bytes, damage
    >>> qparams = jquant.quantize_params(m.params, alloc.rules)
    >>> jquant.footprint(qparams).total_bytes             # float leaves + alloc.nbytes
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import NamedTuple, Optional

import numpy as np

from jquant.spec import Rule

METHODS = ("auto", "dp", "lagrange")


class Allocation(NamedTuple):
  """One spec per weight, chosen under a byte budget.

  Attributes:
    rules: One `jquant.Rule` per weight, pattern ``^path$``, for
      `jquant.quantize_params`, `jquant.gptq.quantize_model`, AWQ and
      `jquant.gguf.export` (GGML-grid specs export as their types).
    choices: ``((path, candidate name), ...)`` in the sensitivity's order.
    nbytes: Bytes of the chosen quantized weights (what `jquant.footprint`
      counts for them).
    numel: Elements of those weights.
    damage: Estimated total damage (sum of the chosen layer losses).
    bound: A lower bound on the optimal damage for the budget (equal to
      ``damage`` when the solution is proven optimal).
    budget: The byte budget.
    method: ``"dp"`` or ``"lagrange"``.
  """

  rules: tuple
  choices: tuple
  nbytes: int
  numel: int
  damage: float
  bound: float
  budget: int
  method: str

  @property
  def bits_per_weight(self) -> float:
    """Bits per element over the allocated weights."""
    return 8.0 * self.nbytes / max(self.numel, 1)

  @property
  def exact(self) -> bool:
    """Whether the choice is proven optimal for the per-weight damage model."""
    return self.damage <= self.bound * (1 + 1e-9) + 1e-300

  def counts(self) -> dict:
    """``{candidate name: number of weights}``."""
    return dict(Counter(n for _, n in self.choices))

  def table(self, max_rows: int = 300) -> str:
    """One line per weight (path, candidate, bytes), then the totals."""
    w = max([len(n) for _, n in self.choices] + [9])
    head = f"{'path':<40} {'candidate':<{w}}"
    lines = [head, "-" * len(head)]
    for p, n in self.choices[:max_rows]:
      lines.append(f"{p[-40:]:<40} {n:<{w}}")
    if len(self.choices) > max_rows:
      lines.append(f"... {len(self.choices) - max_rows} more weights")
    lines.append("-" * len(head))
    lines.append(f"{len(self.choices)} weights, {self.nbytes:,} bytes (budget {self.budget:,}), "
                 f"{self.bits_per_weight:.4f} bits/weight; counts {self.counts()}")
    lines.append(f"estimated damage {self.damage:.6g} (lower bound {self.bound:.6g}, "
                 f"{'optimal' if self.exact else 'not proven optimal'}; {self.method})")
    return "\n".join(lines)

  def __str__(self):
    return self.table()


def budget_bytes(sens, *, bits_per_weight: Optional[float] = None, bytes: Optional[int] = None) -> int:  # noqa: A002
  """The byte budget: ``bytes``, or ``floor(bits_per_weight * numel / 8)`` over the sensitivity's weights.

  Raises:
    ValueError: neither or both given, or a non-positive / non-finite value.
  """
  if (bits_per_weight is None) == (bytes is None):
    raise ValueError(f"allocate: give exactly one budget, bits_per_weight= or bytes=; got "
                     f"bits_per_weight={bits_per_weight!r}, bytes={bytes!r}.")
  if bytes is not None:
    if isinstance(bytes, bool) or not isinstance(bytes, (int, np.integer)) or bytes <= 0:
      raise ValueError(f"allocate: bytes={bytes!r}; allowed: a positive int.")
    return int(bytes)
  if isinstance(bits_per_weight, bool) or not isinstance(bits_per_weight, (int, float, np.number)) or not (
      math.isfinite(bits_per_weight) and bits_per_weight > 0):
    raise ValueError(f"allocate: bits_per_weight={bits_per_weight!r}; allowed: a positive finite number.")
  return int(math.floor(float(bits_per_weight) * int(np.sum(sens.numel)) / 8.0))


def allocate(sens, *, bits_per_weight: Optional[float] = None, bytes: Optional[int] = None,  # noqa: A002
             method: str = "auto", max_dp_cells: int = 20_000_000) -> Allocation:
  """Chooses one candidate per weight minimising the total damage within a byte budget.

  Args:
    sens: A `jquant.mixed.Sensitivity`.
    bits_per_weight: Budget in bits per element over the sensitivity's weights
      (scales and mins included, as `jquant.footprint` counts them).
    bytes: Budget in bytes of those weights. Give exactly one of the two.
    method: ``"auto"``, ``"dp"`` (exact) or ``"lagrange"`` (see the module).
    max_dp_cells: ``"auto"`` uses ``"dp"`` up to this many table cells.

  Returns:
    An `Allocation` whose ``nbytes <= budget``.

  Raises:
    ValueError: a bad budget or method; a budget below the smallest reachable
      size (the message gives that minimum in bytes and bits per weight);
      ``method="dp"`` on a table larger than ``max_dp_cells``.
  """
  if method not in METHODS:
    raise ValueError(f"allocate: method={method!r}; allowed: {METHODS}.")
  budget = budget_bytes(sens, bits_per_weight=bits_per_weight, bytes=bytes)
  cost = np.asarray(sens.nbytes, np.int64)
  dmg = np.asarray(sens.damage, np.float64)
  ok = cost >= 0
  if cost.ndim != 2 or cost.shape != dmg.shape or not ok.any(axis=1).all():
    raise ValueError("allocate: sens must have (T, C) damage and nbytes with at least one applicable candidate "
                     "per weight (use jquant.mixed.measure).")
  if np.any(~np.isfinite(dmg[ok])) or np.any(dmg[ok] < 0):
    raise ValueError("allocate: sens.damage holds negative or non-finite values where candidates apply; "
                     "allowed: finite damages >= 0. Recompute the sensitivity.")
  big = np.iinfo(np.int64).max // 4
  c = np.where(ok, cost, big)
  d = np.where(ok, dmg, np.inf)
  numel = int(np.sum(sens.numel))
  lo = int(c.min(axis=1).sum())
  if budget < lo:
    raise ValueError(f"allocate: the budget {budget:,} bytes ({8 * budget / numel:.4f} bits/weight) is below the "
                     f"smallest reachable size, {lo:,} bytes ({8 * lo / numel:.4f} bits/weight: every weight on "
                     f"its smallest candidate); allowed: a budget of at least that.")
  g = int(np.gcd.reduce(cost[ok]))
  cells = c.shape[0] * (budget // g + 1)
  if method == "dp" and cells > max_dp_cells:
    raise ValueError(f"allocate: method='dp' needs {cells:,} cells (weights x (budget/gcd {g} + 1)), more than "
                     f"max_dp_cells={max_dp_cells:,}; allowed: method='lagrange', or raise max_dp_cells.")
  if method == "dp" or (method == "auto" and cells <= max_dp_cells):
    pick = _dp(c // np.where(ok, g, 1), d, ok, budget // g)
    used = "dp"
    bound = None
  else:
    pick, bound = _lagrange(c, d, ok, budget)
    used = "lagrange"
  rows = np.arange(len(pick))
  damage = float(np.sum(d[rows, pick]))
  nbytes = int(np.sum(c[rows, pick]))
  rules = tuple(Rule("^" + re.escape(p) + "$", sens.specs[i][pick[i]]) for i, p in enumerate(sens.paths))
  choices = tuple((p, sens.names[pick[i]]) for i, p in enumerate(sens.paths))
  return Allocation(rules, choices, nbytes, numel, damage, damage if bound is None else min(bound, damage),
                    budget, used)


def _dp(c, d, ok, cap: int) -> np.ndarray:
  """Exact multiple-choice knapsack over integer costs ``c`` (T, C), capacity ``cap``."""
  T, C = c.shape
  best = np.zeros(cap + 1)  # best damage of the weights so far within each capacity
  arg = np.zeros((T, cap + 1), np.int16 if C < 2**15 else np.int32)
  for t in range(T):
    new = np.full(cap + 1, np.inf)
    for j in range(C):  # strict < keeps the first candidate on ties
      if not ok[t, j] or c[t, j] > cap:
        continue
      cand = np.full(cap + 1, np.inf)
      cand[c[t, j]:] = best[:cap + 1 - c[t, j]] + d[t, j]
      better = cand < new
      new[better] = cand[better]
      arg[t, better] = j
    best = new
  pick = np.zeros(T, np.int64)
  b = cap
  for t in range(T - 1, -1, -1):
    j = int(arg[t, b])
    pick[t] = j
    b -= int(c[t, j])
  return pick


def _hull(cost, dmg):
  """Indices of the lower convex hull of points (cost, dmg), cost ascending, damage strictly decreasing."""
  order = sorted(range(len(cost)), key=lambda j: (cost[j], dmg[j], j))
  pts = []
  for j in order:
    if pts and cost[j] == cost[pts[-1]]:
      continue  # same cost, no less damage (sorted)
    if pts and dmg[j] >= dmg[pts[-1]]:
      continue  # dominated: more bytes, no less damage
    while len(pts) >= 2:
      a, b = pts[-2], pts[-1]
      # b is above the chord a-j (or on it): drop it
      if (dmg[b] - dmg[a]) * (cost[j] - cost[a]) >= (dmg[j] - dmg[a]) * (cost[b] - cost[a]):
        pts.pop()
      else:
        break
    pts.append(j)
  return pts


def _lagrange(c, d, ok, budget: int):
  """Hull walk in order of damage decrease per byte, then a greedy fill. Returns (pick, LP lower bound)."""
  T, C = c.shape
  hulls = [_hull([int(c[t, j]) for j in range(C) if ok[t, j]], [float(d[t, j]) for j in range(C) if ok[t, j]])
           for t in range(T)]
  idx = [[j for j in range(C) if ok[t, j]] for t in range(T)]
  hulls = [[idx[t][k] for k in h] for t, h in enumerate(hulls)]
  pick = np.array([h[0] for h in hulls], np.int64)
  steps = []
  for t, h in enumerate(hulls):
    for k in range(1, len(h)):
      dc, dd = int(c[t, h[k]] - c[t, h[k - 1]]), float(d[t, h[k]] - d[t, h[k - 1]])
      steps.append((dd / dc, t, k, dc, dd))
  steps.sort(key=lambda s: (s[0], s[1], s[2]))
  used = int(c[np.arange(T), pick].sum())
  damage = float(d[np.arange(T), pick].sum())
  bound = None
  for slope, t, k, dc, dd in steps:
    if used + dc > budget:
      bound = damage + dd * (budget - used) / dc  # the LP optimum: this step taken fractionally
      break
    pick[t] = hulls[t][k]
    used += dc
    damage += dd
  if bound is None:
    return pick, damage
  # Greedy fill: best single-weight change that fits the bytes left, until none helps.
  rows = np.arange(T)
  for _ in range(10 * T + 10):
    left = budget - int(c[rows, pick].sum())
    gain = d[rows, pick][:, None] - d  # damage decrease of switching weight t to candidate j
    fits = ok & (c - c[rows, pick][:, None] <= left) & (gain > 0)
    if not fits.any():
      break
    gain = np.where(fits, gain, -np.inf)
    t, j = np.unravel_index(int(np.argmax(gain)), gain.shape)  # first maximum: deterministic
    pick[t] = j
  return pick, bound


__all__ = ["allocate", "budget_bytes", "Allocation", "METHODS"]
