"""Text corpora, token windows, perplexity and the per-layer error report."""

import math

import jax
import numpy as np
import pytest

import jquant
from jquant import data, eval as jeval


class CharTokenizer:
  """Bytes as tokens: a tokenizer with no dependencies, exact and fast."""

  def encode(self, text):
    return list(text.encode("utf-8"))


# ----------------------------------------------------------------------------- corpora
def test_wiki_markup_is_cleaned():
  raw = ("{{Infobox|name=x|{{nested}}}}'''Paris''' is the [[capital city|capital]] of [[France]].<ref name=a>"
         "cite</ref> See [http://example.org the site].\n[[File:P.jpg|thumb|A [[photo]] caption]]\n"
         "== History ==\n* Founded <!-- hidden --> early.\n{| class=wikitable\n|-\n| cell\n|}\n"
         "[[Category:Cities]]\n== References ==\nlots of refs")
  assert data.clean_wiki(raw) == "Paris is the capital of France. See the site.\nHistory\nFounded early."


def test_corpora_are_real_prose():
  wiki = data.documents("wikipedia")
  assert len(wiki) > 50 and wiki[0].startswith("Anarchism\n")
  body = "\n".join(wiki[:10])
  for marker in ("{{", "}}", "[[", "]]", "<ref", "'''", "|-"):
    assert marker not in body, marker
  assert len(data.documents("lee")) == 300
  assert "HAMLET" in data.shakespeare_text()
  with pytest.raises(ValueError, match="corpus='nope'"):
    data.documents("nope")


def test_windows_are_deterministic_disjoint_and_shaped(smollm2):
  tok = smollm2.tokenizer
  calib = data.calibration_windows(tok, 6, length=128)
  assert calib.shape == (6, 128) and calib.dtype == np.int32
  np.testing.assert_array_equal(calib, data.calibration_windows(tok, 6, length=128))
  assert not np.array_equal(calib, data.calibration_windows(tok, 6, length=128, seed=1))
  evalw = data.eval_windows(tok, 4, length=128)
  np.testing.assert_array_equal(evalw, data.eval_windows(tok, 4, length=128))
  calib_rows = {r.tobytes() for r in calib}
  assert not any(r.tobytes() in calib_rows for r in evalw)
  # Windows are consecutive slices of the corpus stream: decoding the first gives its opening text.
  assert tok.decode(evalw[0].tolist()).startswith("Anarchism\nAnarchism is a political philosophy")
  assert data.shakespeare_windows(tok, 2, length=64).shape == (2, 64)


def test_window_errors_are_clear():
  tok = CharTokenizer()
  with pytest.raises(ValueError, match="n=0"):
    data.eval_windows(tok, 0)
  with pytest.raises(ValueError, match="length=1"):
    data.eval_windows(tok, 2, length=1)
  total = data.available_windows(tok, "lee", 100_000)
  with pytest.raises(ValueError, match=f"only {total} windows of length=100000"):
    data.calibration_windows(tok, total + 1, length=100_000)
  with pytest.raises(ValueError, match="fewer than one window"):
    data.calibration_windows(tok, 1, length=10**8)


def test_bos_windows_put_the_token_before_length_minus_one_text_tokens():
  """Gemma's convention (bos=): window i is [bos] + the i-th run of length - 1 text tokens."""
  tok = CharTokenizer()
  plain = data.eval_windows(tok, 3, length=15)
  with_bos = data.eval_windows(tok, 3, length=16, bos=7)
  assert with_bos.shape == (3, 16) and with_bos.dtype == np.int32
  np.testing.assert_array_equal(with_bos[:, 0], 7)
  np.testing.assert_array_equal(with_bos[:, 1:], plain)
  drawn = data.calibration_windows(tok, 2, length=9, seed=3, bos=0)
  assert set(drawn[:, 0]) == {0} and drawn.shape == (2, 9)
  with pytest.raises(ValueError, match="bos=-1; allowed: None or a token id"):
    data.eval_windows(tok, 1, length=8, bos=-1)
  with pytest.raises(TypeError, match="tokenizer must have an encode"):
    data.eval_windows(None, 1)


def test_windows_cover_the_byte_stream_exactly():
  tok = CharTokenizer()
  w = data.calibration_windows(tok, 3, length=50, seed=None)
  stream = np.frombuffer(data.lee_text().encode("utf-8"), np.uint8)
  np.testing.assert_array_equal(w.reshape(-1), stream[:150])


# ----------------------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def toy(toy_llama):
  return toy_llama


def _np_ppl(logits, tokens):
  lg = np.asarray(logits, np.float64)[:, :-1]
  lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
  nll = lse - np.take_along_axis(lg, tokens[:, 1:, None], -1)[..., 0]
  return math.exp(nll.mean()), nll.size


def test_perplexity_matches_direct_computation_with_ragged_batches(toy):
  tokens = np.random.default_rng(0).integers(0, 97, (5, 12)).astype(np.int32)
  want, n = _np_ppl(jax.jit(toy.apply)(toy.params, tokens), tokens)
  for bs in (2, 5):  # 5 windows in batches of 2: the padded last batch must not count
    ppl, n_tokens = jeval.perplexity(toy, toy.params, tokens, batch_size=bs, progress=False)
    assert n_tokens == n == 5 * 11
    assert abs(ppl - want) / want < 1e-5
  nll = jeval.per_position_nll(toy, toy.params, tokens, batch_size=2)
  assert nll.shape == (11,) and abs(math.exp(nll.mean()) - want) / want < 1e-5
  with pytest.raises(ValueError, match="batch_size=0"):
    jeval.perplexity(toy, toy.params, tokens, batch_size=0)
  with pytest.raises(ValueError, match="windows"):
    jeval.perplexity(toy, toy.params, tokens[0], batch_size=2)


def test_layer_error_report_matches_direct_errors(toy):
  spec = jquant.QuantSpec(bits=3, granularity="group", group_size=16)
  q = jquant.quantize_params(toy.params, [jquant.Rule(r"layers_1/mlp/\w+/kernel", spec)])
  tokens = np.random.default_rng(1).integers(0, 97, (3, 12)).astype(np.int32)
  rep = jeval.layer_error_report(toy, toy.params, q, tokens, batch_size=2)
  assert [r.path for r in rep.rows] == ["layers_1/mlp/down", "layers_1/mlp/gate", "layers_1/mlp/up"]
  assert rep.n_tokens == 36 and rep.rows[0].kind == "W3 g16 sym"
  # Direct: the float model's input to layers_1/mlp/gate, through the float and dequantized kernels.
  _, xs = jquant.capture.capture_inputs(toy.apply, toy.params, tokens)
  x = np.asarray(xs["layers_1/mlp/gate/kernel"], np.float64)
  wf = np.asarray(toy.params["layers_1"]["mlp"]["gate"]["kernel"], np.float64)
  wq = np.asarray(jquant.dequantize(q["layers_1"]["mlp"]["gate"]["kernel"]), np.float64)
  want = np.linalg.norm(x @ wq - x @ wf) / np.linalg.norm(x @ wf)
  got = {r.path: r.rel_error for r in rep.rows}["layers_1/mlp/gate"]
  assert abs(got - want) / want < 1e-4
  text = str(rep)
  assert "layers_1/mlp/gate" in text and "W3 g16 sym" in text and "attn" not in text.split("\n", 2)[2]
  assert rep.worst(1)[0].rel_error == max(r.rel_error for r in rep.rows)


def test_per_position_error_is_zero_for_identical_params(toy):
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12)
  e = jeval.per_position_error(toy, toy.params, toy.params, tokens, batch_size=2)
  assert e.shape == (12,) and np.all(e == 0)


def test_demo_rtn_rows_quantize_every_block_kernel(toy):
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
  import demo_rtn
  rows = demo_rtn.demo_rows(toy, toy.params, None, None)
  assert [r["method"] for r in rows] == [n for n, _ in demo_rtn.rtn_specs()]
  for r, (_, spec) in zip(rows, demo_rtn.rtn_specs()):
    leaves = jax.tree_util.tree_leaves(r["params"], is_leaf=jquant.is_qarray)
    qs = [x for x in leaves if jquant.is_qarray(x)]
    assert len(qs) == 7 * toy.config.n_layers and all(x.spec == spec for x in qs)  # q k v o gate up down
    assert not jquant.is_qarray(r["params"]["embed"]["embedding"])


def test_eval_rejects_token_ids_outside_the_vocabulary(toy):
  """An id >= vocab_size gave NaN logits and -1 read the last row, under jit, with no error."""
  tokens = np.random.default_rng(0).integers(0, 97, (3, 12)).astype(np.int32)
  bad = tokens.copy()
  bad[1, 4] = 97
  neg = tokens.copy()
  neg[2, 0] = -1
  msg = r"windows hold 1 id outside the vocabulary \[0, 97\): {} at index \({}\); allowed: ids in 0..96"
  with pytest.raises(ValueError, match=r"eval\.perplexity: " + msg.format(97, "1, 4")):
    jeval.perplexity(toy, toy.params, bad, progress=False)
  with pytest.raises(ValueError, match=r"eval\.per_position_nll: " + msg.format(-1, "2, 0")):
    jeval.per_position_nll(toy, toy.params, neg)
  with pytest.raises(ValueError, match=r"eval\.per_position_error: " + msg.format(97, "1, 4")):
    jeval.per_position_error(toy, toy.params, toy.params, bad)
  with pytest.raises(ValueError, match=r"eval\.layer_error_report: " + msg.format(97, "1, 4")):
    jeval.layer_error_report(toy, toy.params, toy.params, bad)
  with pytest.raises(ValueError, match=r"eval\.perplexity: windows must be an integer array .* dtype float32"):
    jeval.perplexity(toy, toy.params, tokens.astype(np.float32), progress=False)
