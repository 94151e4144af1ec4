"""Quantizing whole parameter trees: `quantize_params`, `dequantize_params`, `footprint`.

Works on any pytree of arrays: Flax Linen parameter dicts, NNX ``nnx.State``
(paths skip the variables' ``.value`` step), plain nested dicts and lists.

Example:
    >>> import jax, jquant
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (256, 128)),
    ...                     "bias": jax.numpy.zeros(128)}}
    >>> rules = [jquant.Rule(r"kernel$", jquant.QuantSpec(bits=4, granularity="group", group_size=128))]
    >>> qparams = jquant.quantize_params(params, rules)
    >>> print(jquant.footprint(qparams))          # bytes and bits per weight, per leaf
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jquant.qarray import QArray, dequantize, quantize
from jquant.spec import Rule, first_match
from jquant.utils import check_finite, path_str


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


def _is_float_array(x) -> bool:
  return hasattr(x, "dtype") and hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.floating)


def sharding_like(shape, sharding) -> Optional[jax.sharding.Sharding]:
  """The layout of ``sharding`` for an array of ``shape`` (a part of the weight it shards).

  A `NamedSharding` keeps its mesh and, per dimension, the mesh axes whose
  total size divides that dimension of ``shape`` (others are replicated;
  dimensions beyond the spec too). A `SingleDeviceSharding` fits any shape
  and is returned as is.

  Args:
    shape: The array's shape (a QArray's packed payload, scales...).
    sharding: The float weight's sharding.

  Returns:
    A sharding valid for ``shape``, or None for other sharding types (then
    the caller keeps its default placement).

  Example:
    >>> mesh = jax.make_mesh((8,), ("x",))
    >>> sharding_like((3, 64), NamedSharding(mesh, PartitionSpec("x", None))).spec   # 3 rows: replicated
    PartitionSpec(None, None)
  """
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  if not isinstance(sharding, NamedSharding):
    return None
  mesh, spec = sharding.mesh, tuple(sharding.spec)[:len(shape)]
  spec += (None,) * (len(shape) - len(spec))
  kept = []
  for dim, names in zip(shape, spec):
    size = 1
    for n in (names if isinstance(names, tuple) else (names,)):
      size *= mesh.shape[n] if n is not None else 1
    kept.append(names if names is not None and dim % size == 0 else None)
  return NamedSharding(mesh, PartitionSpec(*kept), memory_kind=sharding.memory_kind)


def shard_like(q: QArray, sharding) -> QArray:
  """Lays out a QArray's payload, scales and zero points like a float weight's sharding.

  Each array of ``q`` goes onto ``sharding``'s mesh with the named axes whose
  size divides its own dimensions, and, along the contraction axis, only
  where every device's slice holds whole packing units and whole groups
  (`jquant.sharding.qarray_shardings`), so that each device holds the codes
  and scales of its own slice of the float weight; other sharding types
  leave ``q`` as it is. `jquant.quantize_params` and `jquant.load` (a float
  target for a quantized checkpoint) lay QArrays out this way.

  Args:
    q: A `QArray`.
    sharding: The float weight's sharding (usually a `NamedSharding`).

  Returns:
    The QArray with its arrays placed.

  Example:
    >>> mesh = jax.make_mesh((8,), ("x",))
    >>> q = shard_like(jquant.quantize(w, spec), NamedSharding(mesh, PartitionSpec(None, "x")))
  """
  if not isinstance(sharding, NamedSharding) or any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(q)):
    return q
  from jquant.sharding import qarray_shardings  # each device keeps the codes and groups of its own slice
  return jax.device_put(q, qarray_shardings(q, sharding))


_quantize_jit = jax.jit(quantize, static_argnames=("spec",))


def _sharded(x) -> bool:
  s = getattr(x, "sharding", None)
  return isinstance(s, NamedSharding) and len(s.device_set) > 1 and not isinstance(x, jax.core.Tracer)


def quantize_params(params, rules: Sequence[Rule], *, key=None, axes: Optional[Mapping[str, Any]] = None,
                    importance: Optional[Mapping[str, Any]] = None):
  """Quantizes the leaves that ``rules`` select; everything else is untouched.

  Args:
    params: A pytree of arrays (Linen params, ``nnx.State``, nested dicts).
    rules: `jquant.Rule` list; for each float leaf, the first rule whose
      pattern ``re.search``-es its ``/``-joined path decides (spec None: keep
      float). Leaves no rule matches stay float.
    key: PRNG key, needed only by specs with stochastic rounding.
    axes: Optional ``{path: contraction axes}``, e.g. from
      `jquant.capture.contraction_axes` (the axes read from the model's own
      matmuls). A leaf found there is quantized along those axes whatever its
      spec's ``axis``, so that one rule serves ``Dense``, ``DenseGeneral`` and
      ``Einsum`` kernels alike; a rule-matched leaf that is not there (a norm
      scale, a bias: no matmul contracts it) stays float, with a warning.
      Paths may carry a leading ``params/``.
    importance: Optional ``{path: weights}``: per-element error weights of
      the ``clip="mse"`` / ``"fit"`` group searches (`jquant.quantize`), either
      broadcastable to the leaf or one vector over its contraction axes
      (``(K,)``: e.g. the diagonal of the matmul's input Hessian,
      `jquant.mixed.hessians`; llama.cpp's importance matrix). Paths may carry
      a leading ``params/``; leaves without an entry are quantized unweighted,
      and a path that names no quantized leaf raises ValueError.

  Returns:
    The same tree with the selected leaves replaced by `QArray` s, laid out on
    the same mesh axes as the float leaves they came from (each device holds
    the codes and scales of its own slice: `jquant.sharding.qarray_shardings`);
    a sharded leaf is quantized where it lives, never gathered.

  Raises:
    ValueError: a selected leaf holds NaN or inf (the message names every
      such leaf path and its count; leaves kept in float are not checked),
      or a leaf the spec cannot quantize (naming its path). Traced leaves
      (under ``jax.jit``) cannot be checked.
    TypeError: rules that are not `jquant.Rule`.

  Warns:
    UserWarning if no leaf is quantized, listing the paths nearest to the
    patterns.
  """
  rules = list(rules)
  for r in rules:
    if not isinstance(r, Rule):
      raise TypeError(f"quantize_params: rules must be jquant.Rule objects, got {type(r).__name__}.")
  seen_paths, quantized = [], [0]
  axes_by_path = {str(k).removeprefix("params/"): tuple(v) for k, v in (axes or {}).items()}
  imp_by_path = {str(k).removeprefix("params/"): v for k, v in (importance or {}).items()}
  used: set = set()
  not_matmul: list = []
  _check_selected_finite(params, rules, axes_by_path)

  def visit(keypath, leaf):
    if is_qarray(leaf) or not _is_float_array(leaf):
      return leaf
    path = path_str(keypath)
    seen_paths.append(path)
    matched, spec = first_match(rules, path)
    if not matched or spec is None:
      return leaf
    found = axes_by_path.get(path.removeprefix("params/"))
    if axes_by_path and found is None:
      not_matmul.append(path)  # a rule matched it, but the model never contracts it in a matmul
      return leaf
    if found is not None:
      spec = spec.replace(axis=tuple(found) if len(found) > 1 else found[0])
    try:
      k = None if key is None else jax.random.fold_in(key, len(seen_paths))
      # A leaf sharded over several devices: one compiled quantizer per layout, not one per eager op.
      imp = imp_by_path.get(path.removeprefix("params/"))
      if imp is not None:
        used.add(path.removeprefix("params/"))
        imp = _along_contraction(imp, leaf, spec)
      q = (_quantize_jit if _sharded(leaf) else quantize)(leaf, spec, key=k, importance=imp)
    except (ValueError, TypeError) as e:
      raise type(e)(f"quantize_params: leaf {path!r} (shape {tuple(leaf.shape)}): {e}") from None
    quantized[0] += 1
    return shard_like(q, getattr(leaf, "sharding", None))

  out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_qarray)
  unused = sorted(set(imp_by_path) - used)
  if unused:
    raise ValueError(f"quantize_params: importance names {unused[:4]}, which are not leaves the rules quantize; "
                     f"allowed: paths of rule-selected float leaves such as {seen_paths[:3]}.")
  if not_matmul:
    warnings.warn(
        f"quantize_params: rules matched {len(not_matmul)} leaves that no matmul of the model contracts "
        f"(not in axes=); they stay float: {not_matmul[:6]}{' ...' if len(not_matmul) > 6 else ''}. "
        "Narrow the rule patterns to kernels to silence this.", stacklevel=2)
  if rules and quantized[0] == 0 and any(r.spec is not None for r in rules):
    near = sorted({p for r in rules for p in difflib.get_close_matches(r.pattern, seen_paths, n=3, cutoff=0.0)})
    warnings.warn(
        f"quantize_params: rules {[r.pattern for r in rules]} quantized no leaf. "
        f"Nearby paths: {near[:8]}. Patterns are re.search-ed on '/'-joined paths.", stacklevel=2)
  return out


def _along_contraction(imp, leaf, spec):
  """A ``(K,)`` importance vector laid along ``leaf``'s contraction axes (K their product); else as given."""
  imp = jnp.asarray(imp, jnp.float32)
  axes = spec.axes(leaf.ndim)
  k = int(np.prod([leaf.shape[a] for a in axes]))
  if imp.ndim != 1 or leaf.ndim == 1:
    return imp
  if imp.shape[0] != k:
    raise ValueError(f"importance has shape {tuple(imp.shape)}; allowed: ({k},) over the contraction axes "
                     f"{axes} of a leaf shaped {tuple(leaf.shape)}, or weights broadcastable to the leaf.")
  shape = [1] * leaf.ndim
  for a in axes:
    shape[a] = leaf.shape[a]
  return imp.reshape(shape)


def _check_selected_finite(params, rules, axes_by_path):
  """Raises naming every rule-selected float leaf of ``params`` that holds NaN or inf."""
  selected = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
    if is_qarray(leaf) or not _is_float_array(leaf):
      continue
    path = path_str(kp)
    matched, spec = first_match(rules, path)
    if matched and spec is not None and (not axes_by_path or path.removeprefix("params/") in axes_by_path):
      selected[path] = leaf
  check_finite(selected, "quantize_params", "the selected leaves",
               "Fix these weights, or keep them in float (a rule with spec None before the others).")


def dequantize_params(tree):
  """Replaces every `QArray` in ``tree`` by its dequantized float array."""
  return jax.tree_util.tree_map(lambda x: dequantize(x) if is_qarray(x) else x, tree, is_leaf=is_qarray)


class LeafFootprint(NamedTuple):
  path: str
  shape: tuple
  kind: str
  nbytes: int
  numel: int
  float_nbytes: int

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / max(self.numel, 1)


class Footprint(NamedTuple):
  """Memory of a tree: one `LeafFootprint` per leaf, and totals."""

  leaves: tuple

  @property
  def total_bytes(self) -> int:
    return sum(l.nbytes for l in self.leaves)

  @property
  def float_bytes(self) -> int:
    return sum(l.float_nbytes for l in self.leaves)

  @property
  def numel(self) -> int:
    return sum(l.numel for l in self.leaves)

  @property
  def bits_per_weight(self) -> float:
    """Bits per element over the whole tree (float leaves included)."""
    return 8.0 * self.total_bytes / max(self.numel, 1)

  @property
  def quantized_bits_per_weight(self) -> float:
    """Bits per element over the quantized leaves only."""
    q = [l for l in self.leaves if l.kind.startswith("int")]
    return 8.0 * sum(l.nbytes for l in q) / max(sum(l.numel for l in q), 1)

  def table(self, max_rows: int = 40) -> str:
    head = f"{'path':<44} {'shape':<16} {'kind':<22} {'bytes':>12} {'bits/w':>7}"
    lines = [head, "-" * len(head)]
    for l in self.leaves[:max_rows]:
      lines.append(f"{l.path[-44:]:<44} {str(l.shape):<16} {l.kind:<22} {l.nbytes:>12,} {l.bits_per_weight:>7.3f}")
    if len(self.leaves) > max_rows:
      lines.append(f"... {len(self.leaves) - max_rows} more leaves")
    lines.append("-" * len(head))
    lines.append(f"{'total':<44} {'':<16} {f'{self.numel:,} elements':<22} {self.total_bytes:>12,} "
                 f"{self.bits_per_weight:>7.3f}")
    lines.append(f"float size {self.float_bytes:,} bytes; compression {self.float_bytes / max(self.total_bytes, 1):.2f}x")
    return "\n".join(lines)

  def __str__(self):
    return self.table()


def _kind(q: QArray) -> str:
  s = q.spec
  gran = {"tensor": "tensor", "channel": "channel", "group": f"g{s.group_size}"}[s.granularity]
  return f"int{s.bits} {gran} {'sym' if s.symmetric else 'asym'}"


def footprint(tree) -> Footprint:
  """Bytes and bits per weight of every leaf and in total.

  Example:
    >>> fp = jquant.footprint(qparams); fp.total_bytes, fp.bits_per_weight
  """
  rows = []
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)[0]:
    path = path_str(keypath)
    if is_qarray(leaf):
      numel = int(np.prod(leaf.shape))
      rows.append(LeafFootprint(path, leaf.shape, _kind(leaf), leaf.nbytes, numel,
                                numel * np.dtype(leaf.dtype).itemsize))
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      numel = int(np.prod(leaf.shape))
      nbytes = numel * np.dtype(leaf.dtype).itemsize
      rows.append(LeafFootprint(path, tuple(leaf.shape), np.dtype(leaf.dtype).name, nbytes, numel, nbytes))
  return Footprint(tuple(rows))
