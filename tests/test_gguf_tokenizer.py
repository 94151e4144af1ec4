"""jquant.gguf.tokenizer: SentencePiece BPE (Gemma, Llama 2) and byte-level BPE pre-tokenizers (Llama 3's regex)."""

import os
import sys

import pytest

from jquant.files import FileFormatError
from jquant.gguf import tokenizer as T


class _Field:
  def __init__(self, v):
    self.v = v

  def contents(self):
    return self.v


class _Reader:
  """What gguf_tokenizer reads of a gguf.GGUFReader: ``fields[name].contents()``."""

  def __init__(self, fields):
    self.fields = {k: _Field(v) for k, v in fields.items()}
    self.tensors = []


# ----------------------------------------------------------------------------- SentencePiece BPE
def _toy_vocab():
  pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "\n\n", "  "]
  types = [T.CONTROL, T.CONTROL, T.CONTROL, T.CONTROL, T.USER_DEFINED, T.USER_DEFINED, T.USER_DEFINED]
  pieces += [f"<0x{i:02X}>" for i in range(256)]
  types += [T.BYTE] * 256
  normal = ["▁t", "he", "▁the", "in", "▁a", "at", "▁c", "▁cat", "▁in", "▁hat", "ha", "▁h", "▁th",
            "t", "h", "e", "i", "n", "a", "c", "▁", "s", "."]
  pieces += normal
  types += [T.NORMAL] * len(normal)
  scores = [-1000.0] * (len(pieces) - len(normal)) + [-float(i) for i in range(len(normal))]
  return pieces, scores, types


def _spm_reader(**over):
  pieces, scores, types = _toy_vocab()
  fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_space_prefix": False}
  fields.update(over)
  return _Reader(fields)


TEXTS = ["the cat in the hat.", "a hat\n\nthe  cat", "thin chat ünï 🙂", "   the", "<bos>the"]


def test_merges_follow_piece_scores():
  pieces, scores, types = _toy_vocab()
  merges = T.sentencepiece_merges(pieces, scores, types)
  # Highest-scoring joined piece first; every joined piece is a normal piece made of two vocabulary pieces.
  assert merges[0] == ("▁", "t")
  assert ("▁th", "e") in merges and ("▁t", "he") in merges
  assert merges.index(("▁t", "he")) < merges.index(("▁c", "at"))
  # Byte, control and user-defined pieces are never merge results.
  assert not any(a + b in ("\n\n", "<bos>") for a, b in merges)


def test_sentencepiece_tokenizer_encodes_by_score_and_round_trips():
  tok = T.gguf_tokenizer(_spm_reader())
  enc = tok.encode("the cat")
  assert [tok.id_to_token(i) for i in enc.ids] == ["t", "he", "▁cat"]  # no dummy prefix (Gemma)
  assert tok.encode("a\n\nb").ids[1] == 5  # user-defined "\n\n" matched whole
  assert tok.id_to_token(tok.encode("ü").ids[0]) == "<0xC3>"  # byte fallback
  assert tok.encode("<bos>the").ids[0] == 2  # control pieces are special tokens
  for s in TEXTS[:-1]:
    assert tok.decode(tok.encode(s).ids) == s
  # Llama 2 files ask for the dummy prefix: "the" becomes "▁the", and decoding drops it again.
  tok2 = T.gguf_tokenizer(_spm_reader(**{"tokenizer.ggml.add_space_prefix": True}))
  assert [tok2.id_to_token(i) for i in tok2.encode("the cat").ids] == ["▁the", "▁cat"]
  assert tok2.decode(tok2.encode("the cat").ids) == "the cat"


def test_bos_is_prepended_when_the_file_asks_for_it():
  """Gemma's files set tokenizer.ggml.add_bos_token: without <bos> its perplexity is several times higher, so
  encode() adds it (llama.cpp's rule); add_special_tokens=False (jquant.data's windows) and decode leave it out."""
  tok = T.gguf_tokenizer(_spm_reader(**{"tokenizer.ggml.add_bos_token": True}))
  assert tok.encode("the cat").tokens == ["<bos>", "t", "he", "▁cat"]
  assert tok.encode("the cat", add_special_tokens=False).tokens == ["t", "he", "▁cat"]
  assert tok.decode(tok.encode("the cat").ids) == "the cat"
  assert T.gguf_tokenizer(_spm_reader()).encode("the cat").tokens == ["t", "he", "▁cat"]
  with pytest.raises(FileFormatError, match="add_bos_token is set but bos_token_id=999"):
    T.gguf_tokenizer(_spm_reader(**{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 999}))


def test_files_without_a_tokenizer_and_non_readers_are_named():
  fields = {k: v.contents() for k, v in _spm_reader().fields.items() if k != "tokenizer.ggml.model"}
  with pytest.raises(NotImplementedError, match="the file has no tokenizer .*pass tokenizer=False"):
    T.gguf_tokenizer(_Reader(fields))
  with pytest.raises(TypeError, match="reader must be a .gguf path or a gguf.GGUFReader; got int"):
    T.gguf_tokenizer(123)


def test_sentencepiece_tokenizer_matches_the_sentencepiece_library():
  pytest.importorskip("sentencepiece")  # in the experiments venv; the checks above hold without it
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
  import gemma3_gguf  # noqa: E402
  tok, sp = T.gguf_tokenizer(_spm_reader()), gemma3_gguf.sentencepiece_processor(_spm_reader())
  for s in TEXTS[:-1]:
    assert tok.encode(s).ids == sp.encode(s), s


@pytest.mark.parametrize("field, value, match", [
    ("tokenizer.ggml.scores", [0.0] * 3, "tokenizer.ggml.scores has 3 entries for 286 SentencePiece pieces"),
    ("tokenizer.ggml.token_type", None, "tokenizer.ggml.token_type has None entries"),
    ("tokenizer.ggml.tokens", [], "tokenizer.ggml.tokens is list of 0 tokens"),
])
def test_corrupted_sentencepiece_vocabularies_are_file_format_errors(field, value, match):
  with pytest.raises(FileFormatError, match=match + ".*pass tokenizer=False"):
    T.gguf_tokenizer(_spm_reader(**{field: value}))


def test_unsupported_tokenizer_models_are_named():
  with pytest.raises(NotImplementedError, match=r"tokenizer.ggml.model='rwkv'; supported: \('gpt2', 'llama'\)"):
    T.gguf_tokenizer(_spm_reader(**{"tokenizer.ggml.model": "rwkv"}))


# ----------------------------------------------------------------------------- byte-level BPE pre-tokenizers
def _bytes_to_unicode():
  """GPT-2's byte -> printable character table (what ByteLevel uses), written out independently."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _bpe_reader(pre):
  tokens = list(_bytes_to_unicode().values())
  return _Reader({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
                  "tokenizer.ggml.token_type": [T.NORMAL] * len(tokens), "tokenizer.ggml.pre": pre})


def _words(tok, text):
  return [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


def test_llama3_pre_tokenizer_splits_numbers_in_threes_and_contractions():
  tok = T.gguf_tokenizer(_bpe_reader("llama-bpe"))
  # Llama 3's regex: letters with one leading non-letter, digits in runs of at most 3, "'t" alone, newline runs.
  assert _words(tok, "Hello world 12345 don't\n\n") == ["Hello", "Ġworld", "Ġ", "123", "45", "Ġdon", "'t", "ĊĊ"]
  assert _words(tok, "I'M ok") == ["I", "'M", "Ġok"]  # contractions case-insensitive
  text = "Llama 3: 2024-07-23, ünïcode!\n"
  assert tok.decode(tok.encode(text).ids) == text


def test_gpt2_and_digit_split_pre_tokenizers_differ_where_they_should():
  plain, digits = T.gguf_tokenizer(_bpe_reader("gpt2")), T.gguf_tokenizer(_bpe_reader("smollm"))
  assert _words(plain, "x 12345") == ["x", "Ġ12345"]
  assert _words(digits, "x 12345") == ["x", "Ġ", "1", "2", "3", "4", "5"]


def test_unknown_pre_tokenizer_lists_the_supported_ones():
  with pytest.raises(NotImplementedError, match="tokenizer.ggml.pre='qwen2' is not supported; supported: .*llama-bpe"):
    T.gguf_tokenizer(_bpe_reader("qwen2"))
