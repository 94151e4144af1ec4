"""A GGUF file's tokenizer (``tokenizer.ggml.*``) as a ``tokenizers.Tokenizer``.

Two kinds of vocabulary, as llama.cpp reads them (``llama-vocab.cpp``):

* ``tokenizer.ggml.model = "gpt2"``: byte-level BPE with merges. The
  pre-tokenizer comes from ``tokenizer.ggml.pre``: GPT-2's regex
  (``default``, ``gpt2``), digits split one by one first (``smollm``,
  ``starcoder``, ...), or Llama 3's regex (``llama-bpe``: letters, numbers in
  runs of at most three digits, punctuation, newlines).
* ``tokenizer.ggml.model = "llama"``: SentencePiece BPE (Llama 2, Gemma) from
  pieces and scores, with byte fallback (``<0x0A>`` pieces) and spaces as
  ``▁``; a dummy space prefix when ``tokenizer.ggml.add_space_prefix``. The
  BPE merges are derived from the scores (`sentencepiece_merges`), the rule of
  Hugging Face's ``SentencePieceExtractor``.

Control pieces (``<bos>``, ``<start_of_turn>``) are special tokens matched
whole (so ``"<eos>"`` inside text becomes that token, and ``decode`` drops
special tokens unless ``skip_special_tokens=False``); user-defined pieces are
matched whole. ``encode`` prepends the BOS token when the file asks for it
(``tokenizer.ggml.add_bos_token``: Gemma yes, SmolLM2 no), as llama.cpp does;
``encode(text, add_special_tokens=False)`` never does (`jquant.data` builds its
windows that way).

Example:
    >>> import jquant
    >>> tok = jquant.gguf.tokenizer.gguf_tokenizer(jquant.models.default_gguf_path())
    >>> tok.decode(tok.encode("Hello world").ids)
    'Hello world'
"""

from __future__ import annotations

import importlib
import os

from jquant.files import FileFormatError, read_gguf

# llama.cpp pre-tokenizers that split every digit before GPT-2's byte-level regex.
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
PLAIN_PRE = ("default", "gpt2", "gpt-2", "")
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
# Llama 3's pre-tokenizer regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3, Hugging Face's tokenizer.json).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KINDS = ("gpt2", "llama")

# Piece types as llama.cpp writes them (tokenizer.ggml.token_type; SentencePiece's ModelProto types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _tokenizers():
  try:
    return importlib.import_module("tokenizers")
  except ImportError:
    raise ImportError("the GGUF tokenizer needs the 'tokenizers' package: pip install tokenizers") from None


def _field(reader, name, default=None):
  from jquant.gguf.reader import _field as field  # one metadata accessor (the reader imports this module lazily)
  return field(reader, name, default)


def _check_tokens(tokens):
  if not isinstance(tokens, list) or not tokens:
    raise FileFormatError(f"gguf_tokenizer: tokenizer.ggml.tokens is {type(tokens).__name__} of "
                          f"{len(tokens) if tokens else 0} tokens; the file's tokenizer is missing or corrupted: "
                          "pass tokenizer=False (jquant.gguf.load, jquant.models.from_gguf) or write the file again.")


def _check_merges(tokens, merges):
  """Raises FileFormatError if a merge names a token the vocabulary lacks (the BPE builder would panic)."""
  vocab = set(tokens)
  for i, m in enumerate(merges):
    if len(m) != 2 or m[0] not in vocab or m[1] not in vocab or m[0] + m[1] not in vocab:
      raise FileFormatError(f"gguf_tokenizer: tokenizer.ggml.merges[{i}]={' '.join(m)!r} names tokens that "
                            "tokenizer.ggml.tokens lacks; the file's tokenizer is corrupted: pass tokenizer=False "
                            "(jquant.gguf.load, jquant.models.from_gguf) or write the file again.")


def _special(tk, tok, tokens, types, user_special: bool):
  """Control pieces as special tokens, user-defined pieces as added (or special) tokens: matched whole."""
  user = [tk.AddedToken(t, special=user_special, normalized=False)
          for t, ty in zip(tokens, types) if int(ty) == USER_DEFINED]
  if user:
    tok.add_tokens(user)
  control = [tk.AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if int(ty) == CONTROL]
  if control:
    tok.add_special_tokens(control)


def gguf_tokenizer(reader):
  """A ``tokenizers.Tokenizer`` from a GGUF file's ``tokenizer.ggml.*`` fields.

  Args:
    reader: A ``gguf.GGUFReader`` or a path to a ``.gguf`` file.

  Returns:
    A ``tokenizers.Tokenizer`` whose ids are the file's token ids; ``encode``
    prepends BOS if ``tokenizer.ggml.add_bos_token`` is set.

  Raises:
    ImportError: ``tokenizers`` is missing.
    TypeError: ``reader`` is neither a path nor a ``gguf.GGUFReader``.
    NotImplementedError: no tokenizer in the file, a ``tokenizer.ggml.model`` other than `KINDS`, or a
      ``tokenizer.ggml.pre`` jquant does not model (both named, with what is
      supported).
    jquant.files.FileFormatError: a missing or inconsistent vocabulary
      (merges naming absent tokens, scores or types of the wrong length).

  Example:
    >>> tok = gguf_tokenizer("gemma-3-270m-q4_k_m.gguf")             # doctest: +SKIP
    >>> tok.encode("Hello world").tokens                              # doctest: +SKIP
    ['<bos>', 'Hello', '▁world']
  """
  tk = _tokenizers()
  if isinstance(reader, (str, os.PathLike)):
    reader = read_gguf(reader, "gguf_tokenizer")
  if not hasattr(reader, "fields"):
    raise TypeError(f"gguf_tokenizer: reader must be a .gguf path or a gguf.GGUFReader; got "
                    f"{type(reader).__name__}.")
  kind = _field(reader, "tokenizer.ggml.model")
  if kind is None:
    raise NotImplementedError("gguf_tokenizer: the file has no tokenizer (no tokenizer.ggml.model; e.g. exported "
                              "with like=<a Model or LlamaConfig>); pass tokenizer=False, or export with like=<the "
                              "source .gguf> to carry its tokenizer.")
  if kind == "gpt2":
    tok = _byte_level_bpe(tk, reader)
  elif kind == "llama":
    tok = _sentencepiece_bpe(tk, reader)
  else:
    raise NotImplementedError(
        f"gguf_tokenizer: tokenizer.ggml.model={kind!r}; supported: {KINDS} (byte-level BPE, SentencePiece BPE).")
  _add_bos(tk, tok, reader)
  return tok


def _add_bos(tk, tok, reader):
  """``encode`` prepends BOS when ``tokenizer.ggml.add_bos_token`` says so (llama.cpp's rule)."""
  if not _field(reader, "tokenizer.ggml.add_bos_token", False):
    return
  bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  if bos_id is None or not 0 <= int(bos_id) < len(tokens):
    raise FileFormatError(f"gguf_tokenizer: tokenizer.ggml.add_bos_token is set but bos_token_id={bos_id!r} is not "
                          f"a token id in 0..{len(tokens) - 1}; the file's tokenizer is corrupted: pass "
                          "tokenizer=False (jquant.gguf.load, jquant.models.from_gguf) or write the file again.")
  bos = tokens[int(bos_id)]
  tok.post_processor = tk.processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
                                                        special_tokens=[(bos, int(bos_id))])


def _byte_level_bpe(tk, reader):
  tokens = _field(reader, "tokenizer.ggml.tokens")
  _check_tokens(tokens)
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
  _check_merges(tokens, merges)
  types = _field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
  vocab = {t: i for i, t in enumerate(tokens)}
  unk = _field(reader, "tokenizer.ggml.unknown_token_id")
  model = tk.models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else None,
                        fuse_unk=False, byte_fallback=False)
  tok = tk.Tokenizer(model)
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  if pre in DIGIT_SPLIT_PRE:
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Digits(individual_digits=True),
         tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  elif pre in PLAIN_PRE:
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  elif pre in LLAMA3_PRE:
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Split(tk.Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
         tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    raise NotImplementedError(f"gguf_tokenizer: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                              f"{sorted(DIGIT_SPLIT_PRE + PLAIN_PRE + LLAMA3_PRE)}.")
  tok.decoder = tk.decoders.ByteLevel()
  _special(tk, tok, tokens, types, user_special=True)
  return tok


def sentencepiece_merges(pieces, scores, types) -> list:
  """BPE merges equivalent to SentencePiece's BPE encoding with these pieces and scores.

  SentencePiece (BPE model) repeatedly joins the adjacent pair whose
  concatenation is a normal piece with the highest score. As a merge list
  (what ``tokenizers.models.BPE`` applies, lowest rank first): every split
  ``(left, right)`` of a normal piece into two vocabulary pieces, ranked by
  the joined piece's score, highest first, then by piece id and split ids
  (the rule of Hugging Face's ``SentencePieceExtractor``).

  Args:
    pieces: The vocabulary (list of str).
    scores: One float per piece.
    types: One piece type per piece (`NORMAL` pieces are merge results).

  Returns:
    List of ``(left, right)`` piece pairs, highest priority first.

  Example:
    >>> sentencepiece_merges(["a", "b", "ab", "abb"], [0, 0, -1, -2], [1, 1, 1, 1])
    [('a', 'b'), ('ab', 'b')]
  """
  vocab = {p: i for i, p in enumerate(pieces)}
  found = []
  for i, (piece, score, ty) in enumerate(zip(pieces, scores, types)):
    if int(ty) != NORMAL or len(piece) < 2:
      continue
    local = [(vocab[piece[:j]], vocab[piece[j:]]) for j in range(1, len(piece))
             if piece[:j] in vocab and piece[j:] in vocab]
    for left, right in sorted(local):
      found.append((-float(score), i, left, right))
  found.sort()
  return [(pieces[left], pieces[right]) for _, _, left, right in found]


def _sentencepiece_bpe(tk, reader):
  pieces = _field(reader, "tokenizer.ggml.tokens")
  _check_tokens(pieces)
  scores = _field(reader, "tokenizer.ggml.scores")
  types = _field(reader, "tokenizer.ggml.token_type")
  for name, v in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
    if v is None or len(v) != len(pieces):
      raise FileFormatError(f"gguf_tokenizer: {name} has {None if v is None else len(v)} entries for "
                            f"{len(pieces)} SentencePiece pieces; the file's tokenizer is corrupted: pass "
                            "tokenizer=False (jquant.gguf.load, jquant.models.from_gguf) or write the file again.")
  types = [int(x) for x in types]
  unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
  unk = pieces[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(pieces) else None
  vocab = {p: i for i, p in enumerate(pieces)}
  model = tk.models.BPE(vocab, sentencepiece_merges(pieces, scores, types), unk_token=unk, fuse_unk=True,
                        byte_fallback=True)
  tok = tk.Tokenizer(model)
  prefix = [tk.normalizers.Prepend("▁")] if _field(reader, "tokenizer.ggml.add_space_prefix", True) else []
  tok.normalizer = tk.normalizers.Sequence(prefix + [tk.normalizers.Replace(" ", "▁")])
  decoders = [tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
  if prefix:
    decoders.append(tk.decoders.Strip(" ", 1, 0))
  tok.decoder = tk.decoders.Sequence(decoders)
  _special(tk, tok, pieces, types, user_special=False)
  return tok


__all__ = ["gguf_tokenizer", "sentencepiece_merges", "KINDS", "DIGIT_SPLIT_PRE", "PLAIN_PRE", "LLAMA3_PRE",
           "LLAMA3_REGEX"]
