"""The JSON cache the sweeps share: results are kept per run name and reused while the settings match."""

import json
import os


def open_cache(path: str, settings: dict, fresh: bool = False):
  """``(cache, runs, save)``: the cache dict, its ``runs`` dict, and a function writing it to ``path``.

  A cache written with other ``settings`` (or ``fresh=True``) starts empty.
  """
  cache = {}
  if os.path.exists(path) and not fresh:
    with open(path) as f:
      cache = json.load(f)
    if cache.get("settings") != settings:
      cache = {}
  cache["settings"] = settings
  runs = cache.setdefault("runs", {})

  def save():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(cache, f, indent=1)

  return cache, runs, save


def corpus_evaluator(model, n_windows: int, length: int, batch_size: int, keys=("wikipedia", "shakespeare")):
  """The sweeps' evaluation data: ``n_windows`` Wikipedia and Shakespeare windows, and ``evaluate(params)``.

  Returns:
    ``(windows, evaluate)``: ``{key: int32 (n_windows, length)}`` and a function giving ``{key: perplexity}``
    of ``model`` with ``params`` on each corpus (`jquant.eval.perplexity`).
  """
  from jquant import data, eval as jeval
  makers = (data.eval_windows, data.shakespeare_windows)
  windows = {k: make(model.tokenizer, n_windows, length=length) for k, make in zip(keys, makers)}

  def evaluate(params):
    return {k: jeval.perplexity(model, params, w, batch_size=batch_size, progress=False)[0]
            for k, w in windows.items()}

  return windows, evaluate
