"""Atomic Orbax checkpoints of trees holding `QArray` s (and W8A8 weights): `save` and `load`.

A checkpoint is a directory with ``jquant.json`` (format marker, tree layout,
each QArray's spec and metadata) and ``arrays/`` (an Orbax PyTree checkpoint
of every payload, scale, zero point and float leaf). `save` writes everything
into a temporary sibling directory and renames it into place as its last step,
so an interrupted save never leaves a directory that `load` accepts.

Example:
    >>> jquant.save("/tmp/ckpt", qparams)
    >>> restored = jquant.load("/tmp/ckpt")        # bit-exact, QArrays included
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jquant.ops import W8A8Weight
from jquant.qarray import QArray
from jquant.spec import QuantSpec

FORMAT = "jquant-checkpoint"
VERSION = 1
_META = "jquant.json"


def _encode_key(k):
  if isinstance(k, jax.tree_util.DictKey):
    return ["dict", k.key if isinstance(k.key, (int, str)) else str(k.key)]
  if isinstance(k, jax.tree_util.SequenceKey):
    return ["seq", k.idx]
  if isinstance(k, jax.tree_util.GetAttrKey):
    return ["attr", k.name]
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return ["seq", k.key]
  return ["dict", str(k)]


def _to_pure(tree):
  """NNX states become plain nested dicts (restore with nnx.replace_by_pure_dict)."""
  to_pure = getattr(tree, "to_pure_dict", None)
  return to_pure() if callable(to_pure) else tree


@contextlib.contextmanager
def atomic_directory(path, *, overwrite: bool = False, fn: str = "save"):
  """Yields a temporary sibling directory that replaces ``path`` in one rename on success.

  Whatever the body writes appears at ``path`` all at once, or (on any error,
  interrupt included) not at all: a reader never sees a half-written directory.

  Args:
    path: Absolute target directory.
    overwrite: Replace an existing ``path``; otherwise it must not exist.
    fn: The calling function's name, for the error.

  Example:
    >>> with atomic_directory("/tmp/out", overwrite=True) as tmp:
    ...   open(os.path.join(tmp, "a.txt"), "w").write("done")
  """
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{fn}: path={path!r} exists; pass overwrite=True to replace it.")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    yield tmp
    if os.path.exists(path):
      old = path + ".old-" + os.path.basename(tmp)
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)  # the commit point: atomic on one filesystem
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _is_stored_node(x) -> bool:
  # Nodes stored as one entry, so that `load` rebuilds them without a target.
  return isinstance(x, (QArray, W8A8Weight))


def _put_qarray(arrays: dict, name: str, q: QArray) -> dict:
  arrays[f"{name}_qvalue"] = q.qvalue
  arrays[f"{name}_scale"] = q.scale
  if q.zero_point is not None:
    arrays[f"{name}_zero_point"] = q.zero_point
  entry = {"spec": dataclasses.asdict(q.spec), "size": q.size, "axis": q.axis, "dtype": np.dtype(q.dtype).name,
           "has_zero_point": q.zero_point is not None,
           "axis_shape": None if q.axis_shape is None else list(q.axis_shape)}
  for part in ("super_scale", "super_min"):  # two-level scales (GGUF k-quants)
    if getattr(q, part) is not None:
      arrays[f"{name}_{part}"] = getattr(q, part)
      entry[f"has_{part}"] = True
  return entry


def _get_qarray(arrays: dict, name: str, e: dict) -> QArray:
  zp = jnp.asarray(arrays[f"{name}_zero_point"]) if e["has_zero_point"] else None
  spec = dict(e["spec"])
  if isinstance(spec.get("axis"), list):
    spec["axis"] = tuple(spec["axis"])
  axis_shape = e.get("axis_shape")
  supers = [jnp.asarray(arrays[f"{name}_{part}"]) if e.get(f"has_{part}") else None
            for part in ("super_scale", "super_min")]
  return QArray(jnp.asarray(arrays[f"{name}_qvalue"]), jnp.asarray(arrays[f"{name}_scale"]), zp,
                QuantSpec(**spec), e["size"], e["axis"], np.dtype(jnp.dtype(e["dtype"])),
                None if axis_shape is None else tuple(axis_shape), *supers)


def save(path, tree, *, overwrite: bool = False) -> str:
  """Saves ``tree`` (arrays, QArrays, nested dicts/lists, NNX state) atomically.

  Args:
    path: Target directory; must not exist unless ``overwrite``.
    tree: The pytree to save.
    overwrite: Replace an existing checkpoint at ``path``.

  Returns:
    The absolute path written.
  """
  path = os.path.abspath(os.fspath(path))
  tree = _to_pure(tree)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_stored_node)[0]
  arrays, entries = {}, []
  for i, (keypath, leaf) in enumerate(leaves):
    keys = [_encode_key(k) for k in keypath]
    if isinstance(leaf, QArray):
      entries.append({"keys": keys, "kind": "qarray", **_put_qarray(arrays, f"l{i}", leaf)})
    elif isinstance(leaf, W8A8Weight):
      entry = {"keys": keys, "kind": "w8a8", **_put_qarray(arrays, f"l{i}", leaf.weight),
               "static": leaf.act_scale is not None}
      if leaf.act_scale is not None:
        arrays[f"l{i}_act_scale"] = jnp.asarray(leaf.act_scale)
      entries.append(entry)
    elif isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
      arrays[f"l{i}"] = jnp.asarray(leaf)
      entries.append({"keys": keys, "kind": "array"})
    elif leaf is None or isinstance(leaf, (bool, int, float, str)):
      entries.append({"keys": keys, "kind": "python", "value": leaf})
    else:
      raise TypeError(f"save: leaf at {keys} has unsupported type {type(leaf).__name__}; allowed: "
                      "jax/numpy arrays, QArray, jquant.ops.W8A8Weight and Python scalars.")
  with atomic_directory(path, overwrite=overwrite, fn="save") as tmp:
    if arrays:
      ocp.PyTreeCheckpointer().save(os.path.join(tmp, "arrays"), arrays)
    with open(os.path.join(tmp, _META), "w") as f:
      json.dump({"format": FORMAT, "version": VERSION, "leaves": entries}, f)
  return path


def _insert(root, keys, value):
  node = root
  for j, (kind, k) in enumerate(keys):
    last = j == len(keys) - 1
    if last:
      node[k] = value
    else:
      node = node.setdefault(k, {})
  return root


def _lists(node):
  """Dicts whose keys came from sequences (0..n-1 ints) become lists."""
  if isinstance(node, dict):
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
      return [node[i] for i in range(len(node))]
  return node


def load(path, target=None):
  """Loads a checkpoint written by `save`.

  Args:
    path: The checkpoint directory.
    target: Optional tree of the same structure; the result then takes its
      structure (tuples, NNX state types, ...). Without it, the result is
      nested dicts and lists.

  Returns:
    The tree, with QArrays restored bit for bit.
  """
  path = os.path.abspath(os.fspath(path))
  meta_path = os.path.join(path, _META)
  if not os.path.isfile(meta_path):
    raise ValueError(f"load: path={path!r} is not a jquant checkpoint (no {_META}); "
                     "allowed: a directory written by jquant.save (an interrupted save leaves none).")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"load: {meta_path!r} has format {meta.get('format')!r} version {meta.get('version')!r}; "
                     f"allowed: {FORMAT!r} version {VERSION}.")
  arrays = {}
  if os.path.isdir(os.path.join(path, "arrays")):
    ckpt = ocp.PyTreeCheckpointer()
    item_meta = ckpt.metadata(os.path.join(path, "arrays"))
    item_meta = getattr(item_meta, "item_metadata", item_meta)
    names = list(item_meta.keys()) if hasattr(item_meta, "keys") else list(item_meta.tree.keys())
    restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in names}
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      arrays = ckpt.restore(os.path.join(path, "arrays"), restore_args=restore_args)
  leaves = []
  for i, e in enumerate(meta["leaves"]):
    if e["kind"] == "qarray":
      leaves.append(_get_qarray(arrays, f"l{i}", e))
    elif e["kind"] == "w8a8":
      act_scale = jnp.asarray(arrays[f"l{i}_act_scale"]) if e["static"] else None
      leaves.append(W8A8Weight(_get_qarray(arrays, f"l{i}", e), act_scale))
    elif e["kind"] == "array":
      leaves.append(jnp.asarray(arrays[f"l{i}"]))
    else:
      leaves.append(e["value"])
  if target is not None:
    treedef = jax.tree_util.tree_structure(_to_pure(target), is_leaf=_is_stored_node)
    if treedef.num_leaves != len(leaves):
      raise ValueError(f"load: target has {treedef.num_leaves} leaves but the checkpoint holds {len(leaves)}.")
    restored = jax.tree_util.tree_unflatten(treedef, leaves)
    if hasattr(target, "to_pure_dict"):
      from flax import nnx
      state = jax.tree_util.tree_map(lambda x: x, target)
      nnx.replace_by_pure_dict(state, restored)
      return state
    return restored
  if len(meta["leaves"]) == 1 and not meta["leaves"][0]["keys"]:
    return leaves[0]
  root = {}
  for e, leaf in zip(meta["leaves"], leaves):
    _insert(root, [tuple(k) for k in e["keys"]], leaf)
  return _lists(root)
