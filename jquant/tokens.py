"""Token-id checks shared by jquant's models, evaluation and calibration entry points.

An embedding lookup with an id outside ``[0, vocab_size)`` does not fail in
JAX: ``jnp.take`` fills out-of-range rows with NaN (so every logit becomes
NaN) and reads ``-1`` as the last row. These helpers turn that into a clear
error wherever concrete token arrays enter jquant. Traced tokens (inside
``jax.jit``) cannot be range-checked; their dtype still is.

Example:
    >>> import numpy as np
    >>> check_token_ids(np.array([[1, 2, 3]]), 256, fn="demo").shape
    (1, 3)
    >>> check_token_ids(np.array([[1, 2, 256, 3]]), 256, fn="demo")
    Traceback (most recent call last):
    ...
    ValueError: demo: tokens hold 1 id outside the vocabulary [0, 256): 256 at index (0, 2); allowed: ids in 0..255 (the model's vocab_size is 256). Check the tokenizer matches the model.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def vocab_size(model) -> Optional[int]:
  """The model's vocabulary size from ``model.config.vocab_size`` (jquant's models), else None."""
  v = getattr(getattr(model, "config", None), "vocab_size", None)
  return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None


def check_token_ids(tokens, vocab: Optional[int], *, fn: str, name: str = "tokens"):
  """Checks that ``tokens`` are integer ids in ``[0, vocab)``; returns them as an array.

  Args:
    tokens: Token ids (any shape; a nested list, NumPy or JAX array).
    vocab: The vocabulary size; None checks the dtype only.
    fn: The public function checking, for the message (``"Model.apply"``).
    name: The argument's name, for the message.

  Returns:
    ``tokens`` as a JAX array (NumPy and list inputs converted; a tracer is
    returned as is).

  Raises:
    ValueError: a non-integer (or boolean) dtype, naming it; or, for concrete
      arrays, ids outside ``[0, vocab)``: the message gives how many, the
      first bad id and its index, and the vocabulary size. Traced arrays
      (under ``jax.jit``) cannot be range-checked and pass.

  Example:
    >>> check_token_ids(np.array([[-1, 2]]), 8, fn="demo")
    Traceback (most recent call last):
    ...
    ValueError: demo: tokens hold 1 id outside the vocabulary [0, 8): -1 at index (0, 0); allowed: ids in 0..7 (the model's vocab_size is 8). Check the tokenizer matches the model.
  """
  if not isinstance(tokens, (jax.Array, np.ndarray)):
    tokens = np.asarray(tokens)
  dtype = np.dtype(tokens.dtype)
  if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
    raise ValueError(f"{fn}: {name} have dtype {dtype}; allowed: an integer dtype (int32, int64, uint16...) of "
                     f"token ids. Convert with .astype('int32') if the values are whole numbers.")
  if vocab is not None and not isinstance(tokens, jax.core.Tracer):
    t = np.asarray(tokens)
    bad = (t < 0) | (t >= vocab)
    if bad.any():
      n = int(bad.sum())
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{fn}: {name} hold {n} id{'s' if n > 1 else ''} outside the vocabulary [0, {vocab}): "
                       f"{int(t[idx])} at index {idx}; allowed: ids in 0..{vocab - 1} (the model's vocab_size is "
                       f"{vocab}). Check the tokenizer matches the model.")
  return tokens if isinstance(tokens, jax.Array) else jnp.asarray(tokens)


def check_calibration_tokens(model, calib: Any, *, fn: str) -> None:
  """Range-checks the token windows of ``calib`` when ``model`` exposes ``config.vocab_size``.

  Calibration passes trace the model, so the model's own check sees tracers;
  this checks the concrete data where it enters. Only the first positional
  input of each batch is read (the token ids of jquant's models); models
  without a vocabulary size are left alone.

  Args:
    model: Any model; checked only if ``model.config.vocab_size`` exists.
    calib: An array of windows ``(N, T)``, a tuple of arrays sharing ``N``
      (tokens first), or a list of batches (each a tuple of positional inputs
      or a single input), as `jquant.graph.batches` takes them.
    fn: The public function checking, for the message.

  Raises:
    ValueError: see `check_token_ids`; the message says which batch.

  Example:
    >>> check_calibration_tokens(model, windows, fn="gptq.quantize_model")  # doctest: +SKIP
  """
  vocab = vocab_size(model)
  if vocab is None:
    return
  if isinstance(calib, list):  # a list of batches (jquant.graph.batches)
    batches = [b[0] if isinstance(b, tuple) and b else b for b in calib]
    names = [f"calib[{i}] tokens" for i in range(len(batches))]
  elif isinstance(calib, tuple) and calib:  # a pytree of inputs sharing N: the first is the tokens
    batches, names = [calib[0]], ["calib[0] tokens"]
  else:
    batches, names = [calib], ["calib"]
  for b, name in zip(batches, names):
    if hasattr(b, "dtype") or isinstance(b, list):
      check_token_ids(b, vocab, fn=fn, name=name)


__all__ = ["check_token_ids", "check_calibration_tokens", "vocab_size"]
