"""Atomic Orbax checkpoints of trees holding `QArray` s (and W8A8 weights): `save` and `load`.

A checkpoint is a directory with ``jquant.json`` (format marker, tree layout,
each QArray's spec and metadata, each array's shape, dtype and CRC-32) and
``arrays/`` (an Orbax PyTree checkpoint of every payload, scale, zero point and
array leaf). `save` writes everything into a temporary sibling directory and
renames it into place as its last step, so an interrupted save never leaves a
directory that `load` accepts. `load` restores onto a target's shardings
(each device reads its own shards), and raises `jquant.files.FileFormatError`
naming the file for a truncated or corrupted checkpoint, never returning part
of one.

Example:
    >>> jquant.save("/tmp/ckpt", qparams)
    >>> restored = jquant.load("/tmp/ckpt")        # bit-exact, QArrays included
    >>> sharded = jquant.load("/tmp/ckpt", target=sharded_qparams)   # on the target's shardings
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jquant.files import FileFormatError, read_json
from jquant.ops import W8A8Weight
from jquant.qarray import QArray
from jquant.spec import QuantSpec

FORMAT = "jquant-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_META = "jquant.json"
_ARRAYS = "arrays"
_QPARTS = ("qvalue", "scale", "zero_point", "super_scale", "super_min")
_REDO = "save it again, or restore a backup copy"


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


def _path(keys) -> str:
  return "/".join(str(k) for _, k in keys) or "<root>"


def _to_pure(tree):
  """NNX states become plain nested dicts (restore with nnx.replace_by_pure_dict)."""
  to_pure = getattr(tree, "to_pure_dict", None)
  return to_pure() if callable(to_pure) else tree


@contextlib.contextmanager
def atomic_directory(path, *, overwrite: bool = False, fn: str = "save"):
  """Yields a temporary sibling directory that replaces ``path`` in one rename on success.

  Whatever the body writes appears at ``path`` all at once, or (on any error,
  interrupt included) not at all: a reader never sees a half-written directory,
  and an existing ``path`` is left as it was.

  Args:
    path: Absolute target directory.
    overwrite: Replace an existing ``path``; otherwise it must not exist.
    fn: The calling function's name, for the error.

  Raises:
    FileExistsError: ``path`` exists and not ``overwrite``.

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
      try:
        os.rename(tmp, path)
      except BaseException:
        os.rename(old, path)  # put the previous checkpoint back
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)  # the commit point: atomic on one filesystem
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _is_stored_node(x) -> bool:
  # Nodes stored as one entry, so that `load` rebuilds them without a target.
  return isinstance(x, (QArray, W8A8Weight))


# ----------------------------------------------------------------------------- JSON values
def _jsonable(x, where: str):
  """``x`` as JSON values (numpy scalars and dtypes as Python ones), or TypeError naming ``where``."""
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  if isinstance(x, np.generic) and not isinstance(x, (np.str_, np.bytes_, np.void)):
    return x.item()
  if isinstance(x, (list, tuple)):
    return [_jsonable(v, where) for v in x]
  if isinstance(x, dict) and all(isinstance(k, str) for k in x):
    return {k: _jsonable(v, f"{where}.{k}") for k, v in x.items()}
  if isinstance(x, np.dtype) or (isinstance(x, type) and issubclass(x, np.generic)):
    return np.dtype(x).name
  raise TypeError(f"save: {where} = {x!r} ({type(x).__name__}) cannot be stored in {_META}; allowed: None, "
                  "bool, int, float, str, NumPy scalars and dtypes, and lists/dicts of them.")


def _numeric(dtype) -> bool:
  """Numbers Orbax stores: bool, ints, floats, complex, and ml_dtypes' (bfloat16, int4, float8...)."""
  return dtype.kind in "biufc" or (dtype.kind == "V" and dtype.fields is None and dtype.type is not np.void)


def _crc(a) -> int:
  return zlib.crc32(np.ascontiguousarray(np.asarray(a)).tobytes())


def _array_info(a) -> dict:
  info = {"shape": [int(d) for d in a.shape], "dtype": np.dtype(a.dtype).name}
  if not isinstance(a, jax.Array) or a.is_fully_addressable:  # multi-host arrays: no checksum
    info["crc32"] = _crc(a)
  return info


# ----------------------------------------------------------------------------- save
class _Writer:
  """Collects the arrays to store and the JSON entry of every leaf."""

  def __init__(self):
    self.arrays, self.infos, self.entries = {}, {}, []

  def put(self, name: str, a):
    self.infos[name] = _array_info(a)
    if a.size:
      self.arrays[name] = a
    else:  # Orbax refuses zero-size arrays: shape and dtype in jquant.json suffice
      self.infos[name]["empty"] = True

  def put_qarray(self, name: str, q: QArray, where: str) -> dict:
    for part in _QPARTS:
      if getattr(q, part) is not None:
        self.put(f"{name}_{part}", getattr(q, part))
    spec = {f.name: getattr(q.spec, f.name) for f in dataclasses.fields(q.spec)}
    return {"spec": _jsonable(spec, f"leaf {where}: QArray spec"), "size": _jsonable(q.size, f"{where}.size"),
            "axis": _jsonable(q.axis, f"{where}.axis"), "dtype": np.dtype(q.dtype).name,
            "has_zero_point": q.zero_point is not None,
            "axis_shape": _jsonable(q.axis_shape, f"{where}.axis_shape"),
            **{f"has_{p}": True for p in ("super_scale", "super_min") if getattr(q, p) is not None}}

  def leaf(self, keys, leaf) -> int:
    """Stores one leaf; returns its index."""
    i, where = len(self.entries), _path(keys)
    name = f"l{i}"
    if isinstance(leaf, QArray):
      entry = {"kind": "qarray", **self.put_qarray(name, leaf, where)}
    elif isinstance(leaf, W8A8Weight):
      entry = {"kind": "w8a8", **self.put_qarray(name, leaf.weight, where), "static": leaf.act_scale is not None}
      if leaf.act_scale is not None:
        self.put(f"{name}_act_scale", jnp.asarray(leaf.act_scale))
    elif isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      self.put(name, jax.random.key_data(leaf))
      entry = {"kind": "prng_key", "impl": str(jax.random.key_impl(leaf))}
    elif isinstance(leaf, jax.Array):
      self.put(name, leaf)
      entry = {"kind": "array"}
    elif isinstance(leaf, np.ndarray) and _numeric(leaf.dtype):
      self.put(name, leaf)
      entry = {"kind": "numpy"}
    elif isinstance(leaf, np.generic) and _numeric(leaf.dtype):
      self.put(name, np.asarray(leaf))
      entry = {"kind": "numpy_scalar"}
    elif isinstance(leaf, (bool, int, float, str)):
      entry = {"kind": "python", "value": leaf}
    else:
      raise TypeError(f"save: leaf {where} has unsupported type {type(leaf).__name__}; allowed: jax/numpy "
                      "numeric arrays and scalars, QArray, jquant.ops.W8A8Weight, and Python bool/int/float/str "
                      "(convert it, or drop it from the tree).")
    self.entries.append({"keys": keys, **entry})
    return i

  def layout(self, node, keys):
    """The JSON layout of ``node``: containers with their keys, leaves as indices into ``entries``."""
    where = _path(keys)
    if node is None:
      return {"t": "none"}
    if _is_stored_node(node) or isinstance(node, (np.ndarray, np.generic, bool, int, float, str)):
      return {"t": "leaf", "i": self.leaf(keys, node)}
    if isinstance(node, jax.Array):
      return {"t": "leaf", "i": self.leaf(keys, node)}
    if type(node) in (list, tuple):
      return {"t": type(node).__name__,
              "v": [self.layout(v, keys + [["seq", j]]) for j, v in enumerate(node)]}
    if type(node) is dict:
      bad = [k for k in node if type(k) not in (str, int)]
      if bad:
        raise TypeError(f"save: the dict at {where} has key {bad[0]!r} ({type(bad[0]).__name__}); allowed: "
                        "str and int keys.")
      return {"t": "dict", "k": [["s" if isinstance(k, str) else "i", k] for k in node],
              "v": [self.layout(v, keys + [["dict", k]]) for k, v in node.items()]}
    children, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0][1] is node:
      raise TypeError(f"save: leaf {where} has unsupported type {type(node).__name__}; allowed: jax/numpy "
                      "numeric arrays and scalars, QArray, jquant.ops.W8A8Weight, and Python bool/int/float/str "
                      "(convert it, or drop it from the tree).")
    # Any other pytree node (NamedTuple, dataclass, FrozenDict, OrderedDict...): a dict of its children.
    ks = [_encode_key(kp[0]) for kp, _ in children]
    return {"t": "dict", "k": [["s" if isinstance(k, str) else "i", k] for _, k in ks],
            "v": [self.layout(v, keys + [k]) for k, (_, v) in zip(ks, children)]}


def save(path, tree, *, overwrite: bool = False) -> str:
  """Saves ``tree`` (arrays, QArrays, nested dicts/lists/tuples, NNX state) atomically.

  Every value is kept bit for bit: jax arrays (each shard written by its
  device, any dtype: bfloat16, float16, int4...), NumPy arrays and scalars
  (float64 included), `QArray` and `jquant.ops.W8A8Weight` leaves with their
  specs, PRNG key arrays, and Python bool/int/float/str leaves (NaN and inf
  included: nothing is refused for its value). Dicts (str or int keys), lists,
  tuples, None and empty containers keep their structure; an ``nnx.State`` is
  saved as its pure dict.

  Args:
    path: Target directory; must not exist unless ``overwrite``.
    tree: The pytree to save.
    overwrite: Replace an existing checkpoint at ``path`` (atomically: on any
      error the previous one is left intact).

  Returns:
    The absolute path written.

  Raises:
    TypeError: a leaf or value that cannot be stored (an object array, a
      custom class, a dict key that is not str/int); the message names its
      path.
    FileExistsError: ``path`` exists and not ``overwrite``.

  Example:
    >>> jquant.save("/tmp/ckpt", {"w": jquant.quantize(w, jquant.QuantSpec(bits=4)), "step": 3})
    '/tmp/ckpt'
  """
  path = os.path.abspath(os.fspath(path))
  w = _Writer()
  layout = w.layout(_to_pure(tree), [])
  meta = {"format": FORMAT, "version": VERSION, "tree": layout, "leaves": w.entries, "arrays": w.infos}
  text = json.dumps(meta)  # before any file is written: a value JSON cannot hold fails here
  with atomic_directory(path, overwrite=overwrite, fn="save") as tmp:
    if w.arrays:
      ocp.PyTreeCheckpointer().save(os.path.join(tmp, _ARRAYS), w.arrays)
    with open(os.path.join(tmp, _META), "w") as f:
      f.write(text)
  return path


# ----------------------------------------------------------------------------- load
def _sharding_of(x):
  s = getattr(x, "sharding", None)
  return s if isinstance(s, jax.sharding.Sharding) else None


def _match_target(path, entries, target):
  """Pairs the target's leaves with the checkpoint's by leaf path.

  Returns:
    (entry index of each target leaf in the target's flattening order,
    {entry index: target leaf}, the target's treedef).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(_to_pure(target), is_leaf=_is_stored_node)
  by_path = {tuple(str(k) for _, k in e["keys"]): i for i, e in enumerate(entries)}
  order = []
  for kp, _ in flat:
    key = tuple(str(_encode_key(k)[1]) for k in kp)
    if key not in by_path:
      raise ValueError(f"load: target leaf {'/'.join(key) or '<root>'} is not in the checkpoint {path} (it holds "
                       f"{len(entries)} leaves, e.g. {[_path(e['keys']) for e in entries[:4]]}); pass a target of "
                       "the saved structure (or no target).")
    order.append(by_path[key])
  if len(set(order)) != len(entries):
    left = [_path(e["keys"]) for i, e in enumerate(entries) if i not in set(order)]
    raise ValueError(f"load: the checkpoint {path} holds leaves the target lacks: {left[:6]}; pass a target of the "
                     "saved structure (or no target).")
  return order, {i: leaf for i, (_, leaf) in zip(order, flat)}, treedef


def _usable(s, shape, where):
  """``s`` if it can place an array of ``shape`` on concrete devices, else ValueError naming the target leaf."""
  try:
    s.devices_indices_map(tuple(shape))
  except Exception as e:
    raise ValueError(f"load: target leaf {where} has sharding {s} that cannot place the saved array of shape "
                     f"{tuple(shape)} ({type(e).__name__}: {e}); give target leaves concrete shardings (arrays, or "
                     "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)) over a concrete "
                     "jax.sharding.Mesh).") from None
  return s


def _shardings_from_target(entries, infos, target_by_entry):
  """``{array name: sharding}`` for the arrays the target places, read from its leaves."""
  from jquant.tree import sharding_like
  out = {}

  def place(name, like, where):
    s = _sharding_of(like)
    if s is None or name not in infos:
      return
    shape = tuple(infos[name]["shape"])
    if tuple(getattr(like, "shape", ())) != shape:
      s = sharding_like(shape, s)
    if s is not None:
      out[name] = _usable(s, shape, where)

  for i, e in enumerate(entries):
    t, where = target_by_entry[i], _path(e["keys"])
    if e["kind"] in ("array", "numpy", "numpy_scalar"):
      s = _sharding_of(t)
      if s is not None:
        want, got = tuple(infos[f"l{i}"]["shape"]), tuple(getattr(t, "shape", ()))
        if want != got:
          raise ValueError(f"load: target leaf {where} has shape {got} but the checkpoint holds {want}; pass a "
                           "target whose leaves have the saved shapes (or no target).")
        out[f"l{i}"] = _usable(s, want, where)
    elif e["kind"] in ("qarray", "w8a8"):
      tq = t.weight if isinstance(t, W8A8Weight) else t
      for part in _QPARTS:
        like = tq  # a float target leaf lays out every part (as quantize_params does)
        if isinstance(tq, QArray):  # a QArray target: each part like its own (or, if it has none, the payload)
          like = getattr(tq, part) if getattr(tq, part) is not None else tq.qvalue
        place(f"l{i}_{part}", like, f"{where}.{part}")
      if e["kind"] == "w8a8" and isinstance(t, W8A8Weight):
        place(f"l{i}_act_scale", t.act_scale if t.act_scale is not None else tq.scale, f"{where}.act_scale")
  return out


def _restore_arrays(path, names, infos, shardings, fn="load"):
  """Restores ``names`` from ``path/arrays``: sharded ones as jax.Array on their sharding, others as NumPy."""
  arrays_dir = os.path.join(path, _ARRAYS)
  if not names:
    return {}
  if not os.path.isdir(arrays_dir):
    raise FileFormatError(f"{fn}: {path}: the array directory {_ARRAYS}/ is missing; the checkpoint is incomplete: "
                          f"{_REDO}.")
  ckpt = ocp.PyTreeCheckpointer()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      item_meta = ckpt.metadata(arrays_dir)
      item_meta = getattr(item_meta, "item_metadata", item_meta)
      stored = set(item_meta.keys()) if hasattr(item_meta, "keys") else set(item_meta.tree.keys())
      missing = sorted(set(names) - stored)
      if missing:
        raise FileFormatError(f"{fn}: {arrays_dir}: arrays {missing[:4]} listed in {_META} are not stored; the "
                              f"checkpoint is incomplete: {_REDO}.")
      restore_args = {}
      for k in stored:
        s = shardings.get(k)
        if s is not None:
          restore_args[k] = ocp.ArrayRestoreArgs(sharding=s, global_shape=tuple(infos[k]["shape"])
                                                 if k in infos else None)
        else:
          restore_args[k] = ocp.RestoreArgs(restore_type=np.ndarray)
      arrays = ckpt.restore(arrays_dir, restore_args=restore_args)
  except FileFormatError:
    raise
  except Exception as e:  # tensorstore/orbax read errors: a truncated, missing or corrupted data file
    msg = f"{type(e).__name__}: {e}"
    msg = msg if len(msg) < 400 else msg[:400] + "..."
    raise FileFormatError(f"{fn}: {arrays_dir}: the array data cannot be read ({msg}); the checkpoint is truncated "
                          f"or corrupted: {_REDO}.") from e
  return arrays


def _verify(arrays, infos, entries, arrays_dir, fn="load"):
  """Checks every restored array's shape, dtype and CRC-32 against ``jquant.json``."""
  owner = {}
  for i, e in enumerate(entries):
    owner[f"l{i}"] = _path(e["keys"])
  for name, info in infos.items():
    a = arrays[name]
    where = owner.get(name.split("_")[0], name)
    got = (tuple(a.shape), np.dtype(a.dtype).name)
    if got != (tuple(info["shape"]), info["dtype"]):
      raise FileFormatError(f"{fn}: {arrays_dir}: array {name} (leaf {where}) reads as shape {got[0]} {got[1]}, "
                            f"but {_META} says {tuple(info['shape'])} {info['dtype']}; the checkpoint is corrupted: "
                            f"{_REDO}.")
    if "crc32" in info and (not isinstance(a, jax.Array) or a.is_fully_addressable):
      if _crc(a) != info["crc32"]:
        raise FileFormatError(f"{fn}: {arrays_dir}: array {name} (leaf {where}) fails its CRC-32 check; the data "
                              f"file is corrupted: {_REDO}.")


def _as_jax(a):
  return a if isinstance(a, jax.Array) else jnp.asarray(a)


def _get_qarray(arrays: dict, name: str, e: dict) -> QArray:
  spec = {k: tuple(v) if isinstance(v, list) else v for k, v in e["spec"].items()}
  axis_shape = e.get("axis_shape")
  parts = {p: _as_jax(arrays[f"{name}_{p}"]) if p in ("qvalue", "scale") or e.get(f"has_{p}") else None
           for p in _QPARTS}
  return QArray(parts["qvalue"], parts["scale"], parts["zero_point"], QuantSpec(**spec), e["size"], e["axis"],
                np.dtype(jnp.dtype(e["dtype"])), None if axis_shape is None else tuple(axis_shape),
                parts["super_scale"], parts["super_min"])


def _leaf(arrays, i, e):
  name = f"l{i}"
  kind = e["kind"]
  if kind == "qarray":
    return _get_qarray(arrays, name, e)
  if kind == "w8a8":
    act_scale = _as_jax(arrays[f"{name}_act_scale"]) if e["static"] else None
    return W8A8Weight(_get_qarray(arrays, name, e), act_scale)
  if kind == "array":
    return _as_jax(arrays[name])
  if kind == "prng_key":
    return jax.random.wrap_key_data(_as_jax(arrays[name]), impl=e["impl"])
  if kind == "numpy":
    return arrays[name]
  if kind == "numpy_scalar":
    a = arrays[name]
    return np.asarray(a)[()] if not isinstance(a, jax.Array) else a
  if kind == "python":
    return e["value"]
  raise KeyError(f"unknown leaf kind {kind!r}")


def _build(node, leaves):
  t = node["t"]
  if t == "leaf":
    return leaves[node["i"]]
  if t == "none":
    return None
  if t in ("list", "tuple"):
    items = [_build(v, leaves) for v in node["v"]]
    return items if t == "list" else tuple(items)
  if t == "dict":
    if len(node["k"]) != len(node["v"]):
      raise ValueError("dict keys and values differ in number")
    return {k: _build(v, leaves) for (_, k), v in zip(node["k"], node["v"])}
  raise KeyError(f"unknown node type {t!r}")


def _insert(root, keys, value):
  node = root
  for j, (kind, k) in enumerate(keys):
    if j == len(keys) - 1:
      node[k] = value
    else:
      node = node.setdefault(k, {})
  return root


def _lists(node):
  """Dicts whose keys came from sequences (0..n-1 ints) become lists (version-1 checkpoints)."""
  if isinstance(node, dict):
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
      return [node[i] for i in range(len(node))]
  return node


def _read_meta(path, fn="load"):
  meta_path = os.path.join(path, _META)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{fn}: path={path!r} is not a directory; pass a directory written by jquant.save.")
  if not os.path.isfile(meta_path):
    raise FileFormatError(f"{fn}: {path}: not a jquant checkpoint (no {_META}: not written by jquant.save, or "
                          f"the metadata file was deleted); {_REDO}.")
  meta = read_json(meta_path, fn, "checkpoint metadata")
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise FileFormatError(f"{fn}: {meta_path}: not jquant checkpoint metadata (format "
                          f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}); "
                          f"{_REDO}.")
  if meta.get("version") not in READABLE_VERSIONS:
    raise FileFormatError(f"{fn}: {meta_path}: checkpoint version {meta.get('version')!r}; this jquant reads "
                          f"versions {READABLE_VERSIONS}: upgrade jquant, or save the tree again with this one.")
  leaves = meta.get("leaves")
  if not isinstance(leaves, list) or not all(
      isinstance(e, dict) and isinstance(e.get("keys"), list) and isinstance(e.get("kind"), str)
      and all(isinstance(k, list) and len(k) == 2 for k in e["keys"]) for e in leaves):
    raise FileFormatError(f"{fn}: {meta_path}: the metadata's leaf list is missing or malformed; it is corrupted: "
                          f"{_REDO}.")
  return meta


def load(path, target=None):
  """Loads a checkpoint written by `save`, bit for bit.

  Without ``target``, the tree comes back as saved: dicts (str/int keys),
  lists, tuples, None and empty containers as they were (other pytree nodes,
  e.g. NamedTuples or dataclasses, as dicts of their fields; an ``nnx.State``
  as its pure dict), and each leaf with its type and dtype:

  * jax arrays, `QArray` parts and `W8A8Weight` parts: ``jax.Array`` s on
    JAX's default device (``jax.devices()[0]``, or the device
    ``jax.default_device`` selects), uncommitted, whatever device or sharding
    they were saved from;
  * NumPy arrays and scalars: ``np.ndarray`` / ``np.generic`` in host memory,
    same dtype (float64 included);
  * PRNG key arrays: key arrays of the same implementation;
  * Python bool/int/float/str: the same values.

  With ``target`` (a tree of the saved structure, e.g. the freshly
  initialised, sharded model), the result takes its structure (tuples,
  NamedTuples, NNX state...) and every array is read directly onto the
  shardings the target gives (each device reads its own shards; nothing is
  gathered on one device):

  * a ``jax.Array`` or ``jax.ShapeDtypeStruct`` (with ``sharding``) leaf: the
    saved array restored on its sharding (shapes must match);
  * a `QArray` (or `W8A8Weight`) leaf: each payload, scale, zero point (and
    super-scale) array on the sharding of the target's matching part;
  * a float array leaf where a `QArray` was saved (the float model as target
    of a quantized checkpoint): every part laid out like the float weight,
    as `jquant.quantize_params` lays it out (`jquant.tree.shard_like`);
  * leaves without a sharding (NumPy arrays, Python scalars): as without a
    target. Values and dtypes always come from the checkpoint.

  Args:
    path: The checkpoint directory.
    target: Optional tree of the same structure (same leaf paths) whose
      leaves give shardings; may be abstract (``jax.eval_shape`` output
      carrying shardings).

  Returns:
    The tree.

  Raises:
    FileNotFoundError: ``path`` is not a directory.
    jquant.files.FileFormatError: (a ValueError) not a jquant checkpoint,
      missing or garbled ``jquant.json``, missing, truncated or corrupted
      array data (shape, dtype and CRC-32 of every array are checked; for
      the CRC each array is read back to host memory once, one at a time);
      the message names the file. No partial tree is ever returned.
    ValueError: a ``target`` whose leaf paths or shapes differ from the
      checkpoint's.

  Example:
    >>> mesh = jax.make_mesh((8,), ("x",))
    >>> like = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("x"))), params)
    >>> restored = jquant.load("/tmp/ckpt", target=like)   # every leaf on like's sharding
  """
  path = os.path.abspath(os.fspath(path))
  meta = _read_meta(path)
  meta_path = os.path.join(path, _META)
  entries = meta["leaves"]
  try:
    if meta["version"] == 1:
      infos, names = {}, _v1_names(entries)
    else:
      infos = meta["arrays"]
      names = list(infos)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise FileFormatError(f"load: {meta_path}: the metadata is malformed ({type(e).__name__}: {e}); {_REDO}.") from e

  order = treedef = None
  if target is not None:
    order, target_by_entry, treedef = _match_target(path, entries, target)
    shardings = _shardings_from_target(entries, infos, target_by_entry) if infos else {}
  else:
    shardings = {}

  empty = {k for k, v in infos.items() if isinstance(v, dict) and v.get("empty")}
  arrays = _restore_arrays(path, [k for k in names if k not in empty], infos, shardings)
  for k in empty:
    a = np.zeros(tuple(infos[k]["shape"]), jnp.dtype(infos[k]["dtype"]))
    arrays[k] = jax.device_put(a, shardings[k]) if k in shardings else a
  _verify(arrays, infos, entries, os.path.join(path, _ARRAYS))
  try:
    leaves = [_leaf(arrays, i, e) for i, e in enumerate(entries)]
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise FileFormatError(f"load: {meta_path}: the metadata does not match the stored arrays ({type(e).__name__}: "
                          f"{e}); the checkpoint is corrupted: {_REDO}.") from e
  if order is not None:
    leaves = [_place_unsharded(leaves[i], target_by_entry[i]) for i in order]
    restored = jax.tree_util.tree_unflatten(treedef, leaves)
    if hasattr(target, "to_pure_dict"):
      from flax import nnx
      state = jax.tree_util.tree_map(lambda x: x, target)
      nnx.replace_by_pure_dict(state, restored)
      return state
    return restored
  try:
    if meta["version"] == 1:
      if len(entries) == 1 and not entries[0]["keys"]:
        return leaves[0]
      root = {}
      for e, leaf in zip(entries, leaves):
        _insert(root, [tuple(k) for k in e["keys"]], leaf)
      return _lists(root)
    return _build(meta["tree"], leaves)
  except (KeyError, TypeError, ValueError, IndexError) as e:
    raise FileFormatError(f"load: {meta_path}: the tree layout is malformed ({type(e).__name__}: {e}); "
                          f"{_REDO}.") from e


def _place_unsharded(leaf, like):
  """PRNG keys (restored from their key data) go onto the target leaf's sharding afterwards; QArrays restored
  for a float target leaf are laid out as `jquant.quantize_params` would (`jquant.sharding.qarray_shardings`)."""
  s = _sharding_of(like)
  if s is not None and isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.device_put(leaf, s)
  if isinstance(leaf, QArray) and not isinstance(like, QArray) and isinstance(s, jax.sharding.NamedSharding):
    from jquant.tree import shard_like  # a float target: as quantize_params lays it out (moves only what differs)
    return shard_like(leaf, s)
  return leaf


def _v1_names(entries):
  names = []
  for i, e in enumerate(entries):
    if e["kind"] in ("qarray", "w8a8"):
      names += [f"l{i}_qvalue", f"l{i}_scale"]
      names += [f"l{i}_{p}" for p in ("zero_point", "super_scale", "super_min") if e.get(f"has_{p}")]
      if e["kind"] == "w8a8" and e["static"]:
        names.append(f"l{i}_act_scale")
    elif e["kind"] == "array":
      names.append(f"l{i}")
  return names


__all__ = ["save", "load", "atomic_directory", "FileFormatError", "FORMAT", "VERSION"]
