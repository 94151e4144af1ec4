"""Evaluation: perplexity, per-layer error report, per-position error.

Example:
    >>> import jquant
    >>> m = jquant.models.from_gguf()
    >>> evalw = jquant.data.eval_windows(m.tokenizer, 8)
    >>> ppl, n_tokens = jquant.eval.perplexity(m, m.params, evalw, batch_size=4)
    >>> rules = [jquant.Rule(r"layers_\\d+/(attn|mlp)/\\w+/kernel",
    ...                      jquant.QuantSpec(bits=4, granularity="group", group_size=64))]
    >>> q = jquant.quantize_params(m.params, rules)
    >>> calib = jquant.data.calibration_windows(m.tokenizer, 4)
    >>> print(jquant.eval.layer_error_report(m, m.params, q, calib))   # one row per quantized Dense
"""

from __future__ import annotations

import dataclasses
import math
import re
import jax
import jax.numpy as jnp
import numpy as np

from jquant.capture import capture_inputs
from jquant.ops import qdot
from jquant.qarray import QArray
from jquant.tokens import check_token_ids, vocab_size


def _check_windows(windows, model, fn: str, name="windows"):
  """Integer windows (n >= 1, length >= 2) with ids inside the model's vocabulary (where its config has one)."""
  w = np.asarray(windows)
  if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 2 or not np.issubdtype(w.dtype, np.integer):
    raise ValueError(f"{fn}: {name} must be an integer array (n >= 1, length >= 2); got shape {w.shape}, "
                     f"dtype {w.dtype}.")
  check_token_ids(w, vocab_size(model), fn=fn, name=name)
  return w.astype(np.int32)


def _check_batch(batch_size):
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}; allowed: a positive int.")


def _batches(windows, batch_size, progress, desc):
  """Fixed-size batches (the last padded with copies of row 0) and their real-row counts."""
  n = len(windows)
  starts = range(0, n, batch_size)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc=desc, unit="batch", total=math.ceil(n / batch_size))
  for s in starts:
    b = windows[s:s + batch_size]
    real = len(b)
    if real < batch_size:  # keep one compiled shape
      b = np.concatenate([b, np.repeat(b[:1], batch_size - real, axis=0)])
    yield b, real


def _token_nll(logits, tokens):
  """Negative log-likelihood (B, T-1) of tokens[:, 1:] under logits[:, :-1], float32."""
  lg = logits[:, :-1].astype(jnp.float32)
  tgt = tokens[:, 1:]
  picked = jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(lg, axis=-1) - picked


def perplexity(model, params, windows, batch_size: int = 8, *, progress: bool = True) -> tuple[float, int]:
  """Perplexity of ``model`` with ``params`` on token windows (next-token prediction).

  Every position but the first is predicted from the ones before it inside its
  window; the negative log-likelihoods are summed in float64 on the host.

  Args:
    model: A decoder (`jquant.models.Model`): ``model.apply(params, tokens)``.
    params: Float or quantized parameter tree (QArrays stay packed).
    windows: int array (n, length), e.g. `jquant.data.eval_windows`.
    batch_size: Windows per compiled forward (the last batch is padded).
    progress: Show a tqdm bar.

  Returns:
    ``(ppl, n_tokens)`` with ``n_tokens = n * (length - 1)`` predicted tokens.

  Raises:
    ValueError: windows that are not an integer (n >= 1, length >= 2) array,
      or ids outside ``[0, model.config.vocab_size)`` (the message names the
      first bad id and its index), checked before anything is jitted; a bad
      ``batch_size``. The same holds for `per_position_nll`,
      `per_position_error` and `layer_error_report`.
  """
  w = _check_windows(windows, model, "eval.perplexity")
  _check_batch(batch_size)
  batch_size = min(batch_size, len(w))

  @jax.jit
  def nll_rows(p, tokens):
    return jnp.sum(_token_nll(model.apply(p, tokens), tokens), axis=-1)

  total = 0.0
  for b, real in _batches(w, batch_size, progress, "perplexity"):
    total += float(np.sum(np.asarray(nll_rows(params, b), np.float64)[:real]))
  n_tokens = int(w.shape[0] * (w.shape[1] - 1))
  return float(math.exp(total / n_tokens)), n_tokens


def per_position_nll(model, params, windows, batch_size: int = 8, *, progress: bool = False) -> np.ndarray:
  """Mean NLL of each predicted position (length-1,): index i predicts token i+1.

  Early positions have little context, so their loss is high; comparing curves
  of float and quantized params shows where in the window damage concentrates.
  Windows are checked as in `perplexity` (integer ids inside the vocabulary).
  """
  w = _check_windows(windows, model, "eval.per_position_nll")
  _check_batch(batch_size)
  batch_size = min(batch_size, len(w))
  f = jax.jit(lambda p, t: _token_nll(model.apply(p, t), t))
  acc = np.zeros(w.shape[1] - 1)
  for b, real in _batches(w, batch_size, progress, "per-position nll"):
    acc += np.asarray(f(params, b), np.float64)[:real].sum(0)
  return acc / len(w)


def per_position_error(model, float_params, quant_params, windows, batch_size: int = 8, *,
                       progress: bool = False) -> np.ndarray:
  """Relative logit error of ``quant_params`` against ``float_params`` per position (length,).

  ``||logits_q - logits_f|| / ||logits_f||`` over vocabulary and windows, for
  each position. Position 0 is usually an outlier: it is the attention sink,
  whose activations are the largest in the model. Windows are checked as in
  `perplexity` (integer ids inside the vocabulary).
  """
  w = _check_windows(windows, model, "eval.per_position_error")
  _check_batch(batch_size)
  batch_size = min(batch_size, len(w))

  @jax.jit
  def sq(pf, pq, t):
    lf, lq = model.apply(pf, t), model.apply(pq, t)
    return jnp.sum(jnp.square(lq - lf), axis=-1), jnp.sum(jnp.square(lf), axis=-1)

  num = np.zeros(w.shape[1])
  den = np.zeros(w.shape[1])
  for b, real in _batches(w, batch_size, progress, "per-position error"):
    e, r = sq(float_params, quant_params, b)
    num += np.asarray(e, np.float64)[:real].sum(0)
    den += np.asarray(r, np.float64)[:real].sum(0)
  return np.sqrt(num / den)


# ----------------------------------------------------------------------------- per-layer report
def _get(tree, path: str):
  node = tree
  for part in path.split("/"):
    node = node[part]
  return node


def _dense_paths(params) -> list[str]:
  """Paths ``a/b/c`` of every Dense (a dict holding a ``kernel``) in model order."""
  out = []

  def walk(node, prefix):
    if isinstance(node, dict):
      if "kernel" in node:
        out.append(prefix)
      for k, v in node.items():
        if k != "kernel":
          walk(v, f"{prefix}/{k}" if prefix else k)

  walk(params, "")

  def key(p):
    return [(0, int(s)) if s.isdigit() else (1, s) for s in re.split(r"(\d+)", p)]

  return sorted(out, key=key)


def _describe(w) -> str:
  if isinstance(w, QArray):
    s = w.spec
    g = {"tensor": "tensor", "channel": "channel", "group": f"g{s.group_size}"}[s.granularity]
    return f"W{s.bits} {g} {'sym' if s.symmetric else 'asym'}"
  if hasattr(type(w), "__qdot__"):
    return type(w).__name__
  return "float (changed)"


@dataclasses.dataclass(frozen=True)
class LayerErrorRow:
  """One quantized Dense layer: relative output error on calibration activations."""

  path: str
  kind: str
  rel_error: float
  snr_db: float


@dataclasses.dataclass(frozen=True)
class LayerErrorReport:
  """Rows of `layer_error_report`; ``print(report)`` shows a table.

  Attributes:
    rows: One `LayerErrorRow` per quantized Dense, in model order.
    n_tokens: Calibration tokens the errors were measured on.
  """

  rows: tuple
  n_tokens: int

  def worst(self, k: int = 5) -> list[LayerErrorRow]:
    """The ``k`` rows with the largest relative error."""
    return sorted(self.rows, key=lambda r: -r.rel_error)[:k]

  def by_kind(self) -> dict[str, float]:
    """Mean relative error per layer role (``attn/q``, ``mlp/down``, ...)."""
    groups: dict[str, list[float]] = {}
    for r in self.rows:
      role = "/".join(r.path.split("/")[-2:])
      groups.setdefault(role, []).append(r.rel_error)
    return {k: float(np.mean(v)) for k, v in groups.items()}

  def __str__(self):
    if not self.rows:
      return "layer error report: no quantized Dense layer found."
    w = max(len(r.path) for r in self.rows)
    lines = [f"Relative output error ||x W_q - x W|| / ||x W|| on {self.n_tokens} calibration tokens",
             f"{'layer':<{w}}  {'quantized as':<18} {'rel err':>9} {'SNR dB':>7}"]
    lines += [f"{r.path:<{w}}  {r.kind:<18} {r.rel_error:>9.3%} {r.snr_db:>7.1f}" for r in self.rows]
    lines.append("mean by role: " + ", ".join(f"{k} {v:.2%}" for k, v in self.by_kind().items()))
    return "\n".join(lines)


def layer_error_report(model, float_params, quant_params, windows, batch_size: int = 4, *,
                       progress: bool = False) -> LayerErrorReport:
  """Relative output error of each quantized Dense layer on calibration activations.

  The float model runs on ``windows``; `jquant.capture.capture_inputs` records
  each Dense input ``x``, and each layer's error is
  ``||qdot(x, W_q) - x @ W|| / ||x @ W||`` summed over all tokens. Using the
  float activations isolates every layer's own error from upstream damage.

  Args:
    model: A model with ``apply(params, tokens)`` (decoder or BERT).
    float_params: The reference float tree.
    quant_params: The same tree with some kernels quantized (QArrays,
      ``__qdot__`` wrappers, or changed float arrays).
    windows: int tokens (n, length), e.g. `jquant.data.calibration_windows`.
    batch_size: Windows per compiled forward.
    progress: Show a tqdm bar.

  Returns:
    A `LayerErrorReport` (print it for a table).

  Raises:
    ValueError: bad windows (see `perplexity`) or ``batch_size``.
  """
  w = _check_windows(windows, model, "eval.layer_error_report")
  _check_batch(batch_size)
  batch_size = min(batch_size, len(w))
  paths = []
  for p in _dense_paths(float_params):
    fk, qk = _get(float_params, p)["kernel"], _get(quant_params, p)["kernel"]
    if isinstance(qk, QArray) or hasattr(type(qk), "__qdot__") or qk is not fk:
      paths.append(p)

  @jax.jit
  def sums(pf, pq, tokens):
    _, xs = capture_inputs(model.apply, pf, tokens)
    xs = {k.removesuffix('/kernel'): v for k, v in xs.items()}
    out = {}
    for p in paths:
      x = xs[p]
      ref = qdot(x, _get(pf, p)["kernel"]).astype(jnp.float32)
      got = qdot(x, _get(pq, p)["kernel"]).astype(jnp.float32)
      out[p] = (jnp.sum(jnp.square(got - ref)), jnp.sum(jnp.square(ref)))
    return out

  num = {p: 0.0 for p in paths}
  den = {p: 0.0 for p in paths}
  if paths:
    for b, real in _batches(w, batch_size, progress, "layer errors"):
      if real < len(b):  # a padded batch: measure only real rows
        b = b[:real]
      for p, (e, r) in sums(float_params, quant_params, b).items():
        num[p] += float(e)
        den[p] += float(r)
  rows = []
  for p in paths:
    rel = math.sqrt(num[p] / den[p]) if den[p] > 0 else float("nan")
    rows.append(LayerErrorRow(p, _describe(_get(quant_params, p)["kernel"]), rel,
                              -20 * math.log10(rel) if rel > 0 else float("inf")))
  return LayerErrorReport(tuple(rows), int(w.shape[0] * w.shape[1]))

