"""Reading model and checkpoint files: one clear error for a truncated, corrupted or malformed file.

Every public loader (`jquant.load`, `jquant.gguf.load`, `jquant.models.from_gguf`,
`jquant.models.from_safetensors`) reads through these helpers, so a bad file
raises `FileFormatError` (a ``ValueError``) whose message is
``"<fn>: <path>: <what is wrong>; <what to do>"``, and never returns a partial
model.

Example:
    >>> from jquant import files
    >>> try:
    ...   files.read_gguf("/tmp/half-downloaded.gguf", "from_gguf")
    ... except files.FileFormatError as e:
    ...   print(e)     # from_gguf: /tmp/half-downloaded.gguf: not a readable GGUF file (...); ...
"""

from __future__ import annotations

import json
import os

import numpy as np

_REDO = "download or write it again"


class FileFormatError(ValueError):
  """A model or checkpoint file is truncated, corrupted or not in the format the loader reads.

  The message names the function, the file and what to do:
  ``"<fn>: <path>: <what is wrong>; <what to do>"``.
  """


def _short(e: BaseException, limit: int = 300) -> str:
  msg = f"{type(e).__name__}: {e}".strip()
  return msg if len(msg) <= limit else msg[:limit] + "..."


def read_json(path, fn: str, what: str = "JSON file"):
  """Parses the JSON file ``path``.

  Args:
    path: The file.
    fn: The public function reading it, for the message.
    what: What the file is, for the message (``"checkpoint metadata"``).

  Returns:
    The parsed object.

  Raises:
    FileFormatError: ``path`` is missing, unreadable or not valid UTF-8 JSON.

  Example:
    >>> read_json("/tmp/model/config.json", "from_safetensors", "model config")  # doctest: +SKIP
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileFormatError(f"{fn}: {path}: the {what} is missing; {_REDO}.") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise FileFormatError(f"{fn}: {path}: the {what} is truncated or corrupted ({_short(e)}); {_REDO}.") from e


def read_gguf(path, fn: str):
  """Opens a GGUF file with ``gguf.GGUFReader`` and checks that every tensor's data lies inside it.

  Args:
    path: A ``.gguf`` file (GGUF v2/v3, llama.cpp's format).
    fn: The public function reading it, for the message.

  Returns:
    The ``gguf.GGUFReader`` (tensors memory-mapped, nothing read yet).

  Raises:
    FileNotFoundError: ``path`` is not a file.
    FileFormatError: bad magic or version, a header that does not parse, or
      a tensor whose data runs past the end of the file (a truncated file).

  Example:
    >>> reader = read_gguf("/tmp/smollm2.gguf", "from_gguf")  # doctest: +SKIP
  """
  import gguf
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{fn}: path={path!r} is not a file.")
  size = os.path.getsize(path)

  class _Reader(gguf.GGUFReader):
    def _build_tensors(self, start_offs, fields):  # checks each tensor's extent before numpy reshapes it
      for field in fields:
        try:
          _, name, _, dims, raw_dtype, offset = field.parts
          qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
          block, type_size = gguf.GGML_QUANT_SIZES[qtype]
          n_bytes = int(np.prod(dims)) * type_size // block
          start = int(start_offs) + int(offset[0])
        except Exception:  # anything unexpected: left to the reader's own checks
          continue
        if start + n_bytes > size:
          raise FileFormatError(
              f"{fn}: {path}: tensor {bytes(name).decode('utf-8', 'replace')!r} ({qtype.name}, {n_bytes} bytes at "
              f"offset {start}) runs past the end of the file ({size} bytes); the file is truncated or its header "
              f"corrupted: {_REDO}.")
      return super()._build_tensors(start_offs, fields)

  try:
    reader = _Reader(path)
  except FileFormatError:
    raise
  except Exception as e:  # the reader's errors (bad magic, short reads, reshapes of cut tensors) all mean a bad file
    raise FileFormatError(f"{fn}: {path}: not a readable GGUF file ({size} bytes; {_short(e)}); it is truncated, "
                          f"corrupted or not GGUF: {_REDO}.") from e
  for t in reader.tensors:
    end = int(t.data_offset) + int(t.n_bytes)
    if end > size or np.asarray(t.data).nbytes != int(t.n_bytes):
      raise FileFormatError(f"{fn}: {path}: tensor {t.name!r} ({t.tensor_type.name}, {int(t.n_bytes)} bytes at "
                            f"offset {int(t.data_offset)}) runs past the end of the file ({size} bytes); the file is "
                            f"truncated: {_REDO}.")
  return reader


class TensorDict(dict):
  """The tensors of one file by name; a missing name raises `FileFormatError` naming the file."""

  def __init__(self, tensors, path: str, fn: str):
    super().__init__(tensors)
    self.path, self.fn = path, fn

  def __missing__(self, name):
    import difflib
    near = difflib.get_close_matches(str(name), list(self), n=3)
    raise FileFormatError(f"{self.fn}: {self.path}: no tensor {name!r} (nearest: {near}); the file is not the "
                          f"checkpoint this loader reads, or is incomplete: {_REDO}.")


def read_safetensors(path, fn: str, *, check_finite: bool = False) -> TensorDict:
  """Reads every tensor of a ``.safetensors`` file as NumPy arrays.

  Args:
    path: The file (Hugging Face safetensors format: 8-byte header length,
      JSON header, raw little-endian data).
    fn: The public function reading it, for the message.
    check_finite: Raise if a floating tensor holds NaN or inf
      (`jquant.utils.check_finite`, naming the tensor).

  Returns:
    A `TensorDict` ``{name: np.ndarray}``; looking up a missing name raises
    `FileFormatError` naming the file.

  Raises:
    FileNotFoundError: ``path`` is not a file.
    FileFormatError: a truncated file, a header that does not parse, data
      the header does not cover.
    ValueError: non-finite values (with ``check_finite``).

  Example:
    >>> w = read_safetensors("/tmp/model/model.safetensors", "from_safetensors")  # doctest: +SKIP
  """
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{fn}: path={path!r} is not a file.")
  try:
    tensors = load_file(path)
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise FileFormatError(f"{fn}: {path}: not a readable safetensors file ({os.path.getsize(path)} bytes; "
                          f"{_short(e)}); it is truncated, corrupted or not safetensors: {_REDO}.") from e
  if check_finite:
    from jquant.utils import check_finite as _check
    _check(tensors, fn, f"the tensors of {path}", f"The file holds NaN or inf weights: {_REDO}.")
  return TensorDict(tensors, path, fn)


__all__ = ["FileFormatError", "TensorDict", "read_json", "read_gguf", "read_safetensors"]
