"""Parameter layouts over a `jax.sharding.Mesh`: FSDP and tensor parallelism as MaxText lays them out.

Models larger than one chip keep their weights sharded; jquant's algorithms
(`jquant.quantize_params`, `jquant.gptq.quantize_model`,
`jquant.awq.scale_model`, `jquant.calibrate`/`convert`,
`jquant.smoothquant.smooth`, `jquant.qat` (`init`, the compiled step,
`convert`), `jquant.blockwise.quantize_model`, `jquant.save` /
`jquant.load`) take such trees and return quantized trees laid out alike.
This module gives the layouts:

* `param_shardings` / `shard_params`: every leaf of a parameter tree named by
  *logical axes* (``("embed", "mlp")`` for a gate kernel, as MaxText's
  ``nn.with_logical_partitioning`` names them) and mapped to mesh axes by
  MaxText's ``logical_axis_rules`` (`MAXTEXT_AXIS_RULES`: ``embed`` over
  ``fsdp``; ``heads``, ``mlp``, ``vocab`` over ``tensor``). Leaves no pattern
  names are sharded FSDP-style (their largest dimension that divides).
* `qarray_shardings`: the layout of a `QArray`'s parts given the float
  weight's sharding, so that each device holds the codes, scales and zero
  points *of its own slice* of the float weight: the packed payload keeps
  the contraction axis' mesh axes only where every shard holds whole packing
  units (two int4 codes per byte halve the axis; eight 3-bit codes share
  three bytes), scales and zero points only where every shard holds whole
  quantization groups; free (output) axes keep theirs. A part that cannot be
  split that way is replicated along that mesh axis.
* `mesh_of`, `bytes_per_device`: the mesh a tree lives on, and what each
  device holds.

Meshes should have ``Auto`` axes (`make_mesh`, ``jax.sharding.Mesh(devices,
names)``, as MaxText builds them); the model code then needs no sharding
annotations and XLA's SPMD partitioner inserts the collectives.

Example:
    >>> import jax, jquant
    >>> from jquant import models, sharding
    >>> model = models.llama_init(models.LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4,
    ...                                              n_kv_heads=2, ffn_dim=128), jax.random.key(0))
    >>> mesh = sharding.make_mesh(4, 2)                       # ("fsdp", "tensor") over 8 devices
    >>> params = sharding.shard_params(model.params, mesh)
    >>> params["layers_0"]["mlp"]["gate"]["kernel"].sharding.spec
    P('fsdp', 'tensor')
    >>> spec = jquant.QuantSpec(bits=4, granularity="group", group_size=32)
    >>> q = jquant.quantize_params(params, [jquant.Rule(r"layers_\\d+/.*kernel$", spec)])
    >>> q["layers_0"]["mlp"]["gate"]["kernel"].qvalue.sharding.spec   # (32, 128) uint8: 2 codes a byte
    P('fsdp', 'tensor')
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jquant import packing
from jquant.qarray import QArray
from jquant.utils import path_str

# MaxText's default `logical_axis_rules` (MaxText/configs/base.yml) restricted to the two axes a
# (fsdp, tensor) mesh has: each logical axis -> the mesh axes it is split over, in order; mesh axes the
# mesh lacks are dropped, as MaxText does.
MAXTEXT_AXIS_RULES = (
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("norm", ("tensor",)),
)

# Logical axes of jquant's Llama (`jquant.models.llama_init`, GGUF/SmolLM2) parameters, by path regex,
# named as MaxText names its Llama weights (token_embedder ("vocab", "embed"); query/key/value
# ("embed", "heads"); out ("heads", "embed"); wi_0/wi_1 ("embed", "mlp"); wo ("mlp", "embed")).
LLAMA_LOGICAL_AXES = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"attn/q/kernel$", ("embed", "heads")),
    (r"attn/(k|v)/kernel$", ("embed", "kv_heads")),
    (r"attn/o/kernel$", ("heads", "embed")),
    (r"mlp/(gate|up)/kernel$", ("embed", "mlp")),
    (r"mlp/down/kernel$", ("mlp", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"norm/scale$", ("norm",)),
)


def make_mesh(fsdp: int, tensor: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ``(fsdp, tensor)`` mesh with ``Auto`` axes over the first ``fsdp * tensor`` devices.

  Args:
    fsdp: Devices along ``"fsdp"`` (weights' ``embed`` axis and the
      calibration batch are split over it).
    tensor: Devices along ``"tensor"`` (heads, MLP and vocabulary axes).
    devices: Devices to use (default: ``jax.devices()``).

  Raises:
    ValueError: sizes that are not positive ints, or more than the devices.

  Example:
    >>> mesh = make_mesh(2, 4)      # mesh.shape == {"fsdp": 2, "tensor": 4}
  """
  for name, v in (("fsdp", fsdp), ("tensor", tensor)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"make_mesh: {name}={v!r}; allowed: a positive int.")
  devices = list(jax.devices() if devices is None else devices)
  if fsdp * tensor > len(devices):
    raise ValueError(f"make_mesh: fsdp * tensor = {fsdp * tensor}, but only {len(devices)} devices are given; "
                     "use sizes whose product is at most the device count (on CPU, set XLA_FLAGS="
                     "--xla_force_host_platform_device_count=N before jax starts).")
  return Mesh(np.array(devices[:fsdp * tensor]).reshape(fsdp, tensor), ("fsdp", "tensor"))


def _names(entry) -> tuple:
  """A PartitionSpec entry as a tuple of mesh axis names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(names: tuple):
  return None if not names else (names[0] if len(names) == 1 else tuple(names))


def _size(mesh: Mesh, names: tuple) -> int:
  return math.prod(mesh.shape[n] for n in names)


def logical_spec(shape, logical, mesh: Mesh, rules=MAXTEXT_AXIS_RULES) -> PartitionSpec:
  """The `PartitionSpec` of an array of ``shape`` whose axes are named ``logical``.

  Each logical name maps to the mesh axes ``rules`` give it (those the mesh
  has, not used by an earlier dimension); a dimension the product of their
  sizes does not divide is replicated (MaxText raises there; a calibration
  toy with 6 heads on 4 devices should still run).

  Args:
    shape: The array's shape.
    logical: One logical axis name (or None) per dimension.
    mesh: The mesh.
    rules: ``(logical name, mesh axis names)`` pairs.

  Raises:
    ValueError: ``logical`` of another length than ``shape``.

  Example:
    >>> logical_spec((64, 128), ("embed", "mlp"), make_mesh(4, 2))
    P('fsdp', 'tensor')
  """
  if len(logical) != len(shape):
    raise ValueError(f"logical_spec: logical={tuple(logical)} names {len(logical)} axes; the array has shape "
                     f"{tuple(shape)}; give one name (or None) per dimension.")
  table = {k: tuple(v) if isinstance(v, (tuple, list)) else ((v,) if v else ()) for k, v in rules}
  used, out = set(), []
  for dim, name in zip(shape, logical):
    names = tuple(n for n in table.get(name, ()) if n in mesh.axis_names and n not in used)
    if names and dim % _size(mesh, names) == 0 and _size(mesh, names) > 1:
      used.update(names)
      out.append(_entry(names))
    else:
      out.append(None)
  return PartitionSpec(*out)


def _fsdp_spec(shape, mesh: Mesh, fsdp_axis: str) -> PartitionSpec:
  """FSDP for a leaf no pattern names: its largest dimension that the ``fsdp_axis`` size divides."""
  spec = [None] * len(shape)
  if fsdp_axis in mesh.axis_names and mesh.shape[fsdp_axis] > 1:
    n = mesh.shape[fsdp_axis]
    fits = [d for d in range(len(shape)) if shape[d] % n == 0]
    if fits:
      spec[max(fits, key=lambda d: (shape[d], -d))] = fsdp_axis
  return PartitionSpec(*spec)


def param_shardings(params, mesh: Mesh, *, logical=LLAMA_LOGICAL_AXES, rules=MAXTEXT_AXIS_RULES,
                    fsdp_axis: str = "fsdp"):
  """`NamedSharding` s for every array leaf of ``params`` (abstract leaves too).

  Args:
    params: A parameter tree (arrays, ``jax.ShapeDtypeStruct`` s, or
      `QArray` s, whose logical shape is used: lay them out with
      `qarray_shardings`).
    mesh: The mesh, usually `make_mesh` ``(fsdp, tensor)``.
    logical: ``(path regex, logical axes)`` pairs; the first pattern that
      ``re.search``-es a leaf's ``/``-joined path names its axes. Default:
      jquant's Llama, named as MaxText names its Llama.
    rules: Logical axis -> mesh axes (default: MaxText's).
    fsdp_axis: Mesh axis for leaves no pattern names (FSDP: the largest
      dimension it divides; else replicated).

  Returns:
    A tree like ``params`` with a `NamedSharding` per array leaf (QArray
    leaves get the sharding of their float weight).

  Raises:
    ValueError: a pattern's logical axes of another rank than its leaf.

  Example:
    >>> shardings = param_shardings(model.params, make_mesh(2, 4))
    >>> shardings["layers_0"]["attn"]["o"]["kernel"].spec
    P('tensor', 'fsdp')
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"param_shardings: mesh is a {type(mesh).__name__}; allowed: a jax.sharding.Mesh "
                    "(jquant.sharding.make_mesh(fsdp, tensor)).")
  check_auto_axes(mesh, "param_shardings")
  used = {a for _, axes in rules for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))} | {fsdp_axis}
  if not used & set(mesh.axis_names):
    raise ValueError(f"param_shardings: mesh axes {tuple(mesh.axis_names)} include none of the axes the rules "
                     f"place parameters on ({sorted(used)}): every device would hold the whole model. Name the "
                     "mesh axes ('fsdp', 'tensor') (jquant.sharding.make_mesh) or pass rules= and fsdp_axis= for "
                     "yours.")
  compiled = [(re.compile(p), tuple(ax)) for p, ax in logical]

  def one(kp, leaf):
    shape = tuple(leaf.shape)
    path = path_str(kp)
    for pat, ax in compiled:
      if pat.search(path):
        if len(ax) != len(shape):
          raise ValueError(f"param_shardings: pattern {pat.pattern!r} names logical axes {ax} for leaf {path!r} of "
                           f"shape {shape}; give one name per dimension (or a more specific pattern).")
        return NamedSharding(mesh, logical_spec(shape, ax, mesh, rules))
    return NamedSharding(mesh, _fsdp_spec(shape, mesh, fsdp_axis))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QArray))


def shard_params(params, mesh: Mesh, **kwargs):
  """``params`` placed by `param_shardings` (float leaves) and `qarray_shardings` (QArray leaves).

  Keyword arguments go to `param_shardings`.

  Example:
    >>> params = shard_params(model.params, make_mesh(8, 1))   # FSDP over 8 devices
  """
  shardings = param_shardings(params, mesh, **kwargs)

  def put(leaf, s):
    if isinstance(leaf, QArray):
      return jax.device_put(leaf, qarray_shardings(leaf, s))
    return jax.device_put(leaf, s)

  return jax.tree_util.tree_map(put, params, shardings, is_leaf=lambda x: isinstance(x, QArray))


def qarray_shardings(q: QArray, sharding) -> Any:
  """The layout of each part of ``q`` that keeps every device on its own slice of the float weight.

  ``sharding`` is the float weight's (logical shape ``q.shape``). For each
  part (payload, scales, zero points, two-level super scales/mins), all of
  rank ``q.stored_shape`` (the contraction axes flattened into one):

  * a free (output) dimension keeps the float dimension's mesh axes where
    their size divides the part's dimension (a per-tensor scale's size-1
    dimensions are replicated);
  * the contraction dimension keeps the mesh axes of the float's first
    contraction axis (the others must be unsharded: a flattened ``(H, D)``
    split over H is split in contiguous blocks) only where each device's
    slice of the float weight is a whole number of the part's units: the
    payload's packing units (`jquant.packing.pack_unit`: 2 int4 codes per
    byte, 8 3-bit codes per 3 bytes, none padded), the scales' and zero
    points' quantization groups (``size`` divisible by ``n * group_size``),
    the super scales' super-groups. Otherwise that dimension is replicated.

  Other sharding types (``SingleDeviceSharding``, None) are returned as is
  for every part.

  Args:
    q: A `QArray` (concrete or with abstract parts).
    sharding: The float weight's sharding.

  Returns:
    A `QArray`-structured tree of shardings: ``jax.device_put(q,
    qarray_shardings(q, s))`` places ``q``.

  Example:
    >>> s = NamedSharding(make_mesh(4, 2), PartitionSpec("fsdp", "tensor"))
    >>> q = jquant.quantize(jnp.ones((256, 64)), jquant.QuantSpec(bits=4, granularity="group", group_size=128))
    >>> lay = qarray_shardings(q, s)
    >>> lay.qvalue.spec, lay.scale.spec        # 2 groups on 4 devices: scales replicated along fsdp
    (P('fsdp', 'tensor'), P(None, 'tensor'))
  """
  if not isinstance(q, QArray):
    raise TypeError(f"qarray_shardings: q must be a jquant.QArray, got {type(q).__name__}.")
  children, aux = q.tree_flatten()  # None zero points stay None
  if not isinstance(sharding, NamedSharding):
    return QArray.tree_unflatten(aux, [None if c is None else sharding for c in children])
  mesh, logical_shape = sharding.mesh, tuple(q.shape)
  spec = tuple(sharding.spec) + (None,) * (len(logical_shape) - len(tuple(sharding.spec)))
  rank = len(q.stored_shape)
  k = q.axis % rank
  n_k = 1 if q.axis_shape is None else len(q.axis_shape)
  k_spec = spec[k:k + n_k]
  # The flattened contraction axis: contiguous blocks iff only its first (outermost) axis is split.
  k_names = _names(k_spec[0]) if all(e is None for e in k_spec[1:]) else ()
  free_spec = spec[:k] + spec[k + n_k:]
  n = _size(mesh, k_names)
  s = q.spec
  values, nbytes = packing.pack_unit(q.bits, s.dense_pack)

  def k_unit(part: str, dim: int) -> bool:
    """Does every device's slice of the contraction axis hold whole units of ``part``?"""
    if n == 1 or q.size % n or dim % n:
      return False
    per = q.size // n
    if part == "qvalue":
      return dim == packing.packed_size(q.size, q.bits, s.dense_pack) and per % values == 0 and q.size % values == 0
    if s.granularity == "tensor":
      return False
    group = q.size if s.granularity == "channel" else s.group_size
    if part in ("super_scale", "super_min"):
      group = s.super_group_size
    elif s.two_level:  # group scale codes packed at scale_bits along the axis
      sv, _ = packing.pack_unit(s.scale_bits)
      return per % (group * sv) == 0 and q.size % (group * sv) == 0
    return per % group == 0 and q.size % group == 0

  names = ("qvalue", "scale", "zero_point", "super_scale", "super_min")[:len(children)]
  out = []
  for part, arr in zip(names, children):
    if arr is None:
      out.append(None)
      continue
    shape = tuple(arr.shape)
    entries = []
    free = iter(free_spec)
    for d in range(len(shape)):
      if d == k:
        entries.append(_entry(k_names) if k_unit(part, shape[d]) else None)
      else:
        e = _names(next(free))
        entries.append(_entry(e) if e and shape[d] % _size(mesh, e) == 0 else None)
    out.append(NamedSharding(mesh, PartitionSpec(*entries), memory_kind=sharding.memory_kind))
  return QArray.tree_unflatten(aux, out)


def check_auto_axes(mesh: Mesh, fn: str) -> None:
  """Raises ValueError if ``mesh`` has axes that are not ``Auto`` (jquant's passes run on Auto meshes).

  ``jax.make_mesh`` builds ``Explicit`` axes by default; under them the traced model's gathers (an embedding
  lookup of a batch split over devices) need sharding annotations the model does not carry.
  """
  types = tuple(getattr(mesh, "axis_types", ()) or ())
  if any(t != jax.sharding.AxisType.Auto for t in types):
    raise ValueError(f"{fn}: mesh has axis types {types}; allowed: Auto axes only. Build the mesh with "
                     "jquant.sharding.make_mesh(fsdp, tensor) or jax.sharding.Mesh(devices, names) (jax.make_mesh "
                     "defaults to Explicit axes; pass axis_types=(jax.sharding.AxisType.Auto,) * n there).")


def mesh_of(tree) -> Optional[Mesh]:
  """The mesh the `NamedSharding` leaves of ``tree`` share (None: no leaf is on a multi-device mesh).

  Raises:
    ValueError: leaves on different meshes (naming two of them).

  Example:
    >>> mesh_of(shard_params(model.params, make_mesh(2, 4))).shape["tensor"]
    4
  """
  found, where = None, None
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    s = getattr(leaf, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.size > 1:
      if found is None:
        found, where = s.mesh, path_str(kp)
      elif s.mesh != found:
        raise ValueError(f"mesh_of: leaf {path_str(kp)!r} is on mesh {dict(s.mesh.shape)} but {where!r} is on "
                         f"{dict(found.shape)}; put every leaf on one mesh (jquant.sharding.shard_params).")
  return found


def bytes_per_device(tree) -> dict:
  """``{device: bytes}`` of the shards of ``tree``'s concrete jax arrays each device holds.

  Example:
    >>> max(bytes_per_device(shard_params(model.params, make_mesh(8, 1))).values())
  """
  out: dict = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
      for sh in leaf.addressable_shards:
        out[sh.device] = out.get(sh.device, 0) + sh.data.nbytes
  return out


__all__ = ["MAXTEXT_AXIS_RULES", "LLAMA_LOGICAL_AXES", "make_mesh", "logical_spec", "param_shardings",
           "shard_params", "qarray_shardings", "check_auto_axes", "mesh_of", "bytes_per_device"]
