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
