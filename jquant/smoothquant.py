"""SmoothQuant: move activation outliers into the weights, exactly, before W8A8.

For a Dense input ``x`` (K channels) and the kernels ``W`` that read it,
``x @ W == (x / s) @ (s[:, None] * W)`` for any positive ``s``. With

    s_j = max|x_j|^alpha / max|W_j,:|^(1 - alpha)

channels with outlier activations are divided down and their weight rows
scaled up, so one per-tensor int8 activation scale fits all channels better
(Xiao et al., 2023). The division by ``s`` is folded into whatever produced
``x``, so the smoothed float model computes the same function:

* ``attn_norm`` (RMSNorm scale) -> ``attn/q``, ``attn/k``, ``attn/v``;
* ``mlp_norm`` -> ``mlp/gate``, ``mlp/up``;
* ``mlp/down``'s input is ``act(gate) * up``, linear in ``up``'s output:
  divide ``up``'s output columns by ``s``;
* ``attn/o``'s input is ``softmax(q k^T) v``, linear in ``v``'s output:
  divide ``v``'s output columns by ``s`` (optional; with grouped-query
  attention one ``s`` is shared by the query heads that read a kv head).

Column scaling of ``up``/``v`` is free for per-output-channel int8 weights
(each column's scale absorbs it).

Example:
  >>> from jquant.calibrate import calibrate
  >>> from jquant.observers import MinMaxObserver
  >>> st = calibrate(m, m.params, windows, rules, observer=MinMaxObserver("channel"))
  >>> smoothed, s = smooth(m.params, st.amax(), alpha=0.5)
  >>> # m.apply(smoothed, tokens) == m.apply(m.params, tokens) up to float rounding
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jquant.utils import get_path as _get, set_path as _set

S_MIN, S_MAX = 1e-5, 1e5  # keeps dead channels (max 0) finite

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # a grid up to 1.0 scored better per layer, worse end to end


class Fold(NamedTuple):
  """One smoothing site of a block.

  Attributes:
    name: Site name, also the key of per-site alphas (``attn_norm``, ``mlp_norm``,
      ``mlp/up``, ``attn/v``).
    source: Path (in the block) of what ``1/s`` is folded into.
    source_kind: ``"norm"`` (divide the norm scale) or ``"columns"`` (divide
      a kernel's output columns).
    targets: Dense layers (in the block) whose input rows get ``* s``.
  """
  name: str
  source: str
  source_kind: str
  targets: tuple


LLAMA_FOLDS = (
    Fold("attn_norm", "attn_norm/scale", "norm", ("attn/q", "attn/k", "attn/v")),
    Fold("mlp_norm", "mlp_norm/scale", "norm", ("mlp/gate", "mlp/up")),
    Fold("mlp/up", "mlp/up/kernel", "columns", ("mlp/down",)),
    Fold("attn/v", "attn/v/kernel", "columns", ("attn/o",)),
)


def smoothing_factors(x_absmax, w_absmax, alpha: float) -> jax.Array:
  """``s = max|x|^alpha / max|w|^(1-alpha)``, clipped to [1e-5, 1e5]; 1 where a max is 0."""
  x = jnp.asarray(x_absmax, jnp.float32)
  w = jnp.asarray(w_absmax, jnp.float32)
  s = jnp.power(jnp.maximum(x, 1e-30), alpha) / jnp.power(jnp.maximum(w, 1e-30), 1.0 - alpha)
  s = jnp.clip(s, S_MIN, S_MAX)
  return jnp.where((x > 0) & (w > 0), s, 1.0)


def _gqa_groups(model) -> Optional[tuple]:
  """``(n_heads, n_kv_heads, head_dim)`` from ``model.config``, or None."""
  cfg = getattr(model, "config", None)
  def pick(*names):
    for n in names:
      v = getattr(cfg, n, None)
      if v is not None:
        return int(v)
    return None
  nh = pick("n_heads", "num_heads", "num_attention_heads")
  nkv = pick("n_kv_heads", "num_kv_heads", "num_key_value_heads") or nh
  hd = pick("head_dim")
  if nh is None:
    return None
  return nh, nkv, hd


def _tie(v, groups, kind: str):
  """Per-channel statistic of ``o``'s input (n_heads*hd) reduced to kv channels (n_kv*hd) by max.

  Query head ``h`` reads kv head ``h // (n_heads // n_kv)``.
  """
  nh, nkv, hd = groups
  return jnp.max(jnp.reshape(v, (nkv, nh // nkv, hd)), axis=1).reshape(-1)


def _untie(s_kv, groups):
  nh, nkv, hd = groups
  return jnp.repeat(jnp.reshape(s_kv, (nkv, 1, hd)), nh // nkv, axis=1).reshape(-1)


def site_factors(block_params, x_absmax_block: Mapping[str, jax.Array], fold: Fold, alpha: float,
                 groups=None) -> tuple:
  """Smoothing factors of one site: ``(s_for_targets (K,), s_for_source)``.

  Args:
    block_params: One block's parameters.
    x_absmax_block: ``{target layer ("attn/q"): per-channel max|x| (K,)}``.
    fold: The site.
    alpha: Migration strength in [0, 1].
    groups: ``(n_heads, n_kv_heads, head_dim)`` for the ``attn/v`` site.
  """
  xs = [jnp.asarray(x_absmax_block[t], jnp.float32) for t in fold.targets if t in x_absmax_block]
  if not xs:
    raise ValueError(f"smooth: no per-channel activation max for site {fold.name!r} (targets {fold.targets}).")
  x = jnp.max(jnp.stack(xs), axis=0)
  if x.ndim != 1:
    raise ValueError(f"smooth: site {fold.name!r} needs per-channel statistics (shape (K,)), got shape "
                     f"{tuple(x.shape)}; calibrate with MinMaxObserver(granularity='channel').")
  w = jnp.max(jnp.stack([jnp.max(jnp.abs(_get(block_params, t + "/kernel").astype(jnp.float32)), axis=1)
                         for t in fold.targets]), axis=0)
  if fold.name == "attn/v":
    if groups is None:
      raise ValueError("smooth: the attn/v -> attn/o site needs the head layout; pass model= to smooth.")
    s_kv = smoothing_factors(_tie(x, groups, "x"), _tie(w, groups, "w"), alpha)
    return _untie(s_kv, groups), s_kv
  s = smoothing_factors(x, w, alpha)
  return s, s


def apply_fold(block_params, fold: Fold, s_targets, s_source):
  """Folds ``1/s`` into the site's source and ``s`` into its targets' input rows."""
  bp = block_params
  src = _get(bp, fold.source)
  if fold.source_kind == "norm":
    bp = _set(bp, fold.source, (src.astype(jnp.float32) / s_source).astype(src.dtype))
  else:
    bp = _set(bp, fold.source, (src.astype(jnp.float32) / s_source[None, :]).astype(src.dtype))
  for t in fold.targets:
    k = _get(bp, t + "/kernel")
    bp = _set(bp, t + "/kernel", (k.astype(jnp.float32) * s_targets[:, None]).astype(k.dtype))
  return bp


def _block_names(params, model=None):
  if model is not None and hasattr(model, "block_names"):
    return list(model.block_names)
  return sorted((k for k in params if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k.split("_")[1]))


def _alpha_for(alpha, block: str, site: str) -> float:
  if isinstance(alpha, Mapping):
    for key in (f"{block}/{site}", site):
      if key in alpha:
        return float(alpha[key])
    raise ValueError(f"smooth: alpha has no entry for {block}/{site}; allowed keys: '<block>/<site>' or '<site>'.")
  return float(alpha)


def _default_sites(sites, model, folds):
  if sites is not None:
    return tuple(sites)
  # The attn/v site needs the head layout, which only the model knows.
  return tuple(f.name for f in folds if model is not None or f.name != "attn/v")


def smooth(params, act_absmax: Mapping[str, jax.Array], alpha: Union[float, Mapping[str, float]] = 0.5, *,
           model=None, sites: Optional[Sequence[str]] = None, folds: Sequence[Fold] = LLAMA_FOLDS):
  """Smooths a Llama-style parameter tree; the float function is unchanged.

  Args:
    params: Float parameters (``layers_<i>`` blocks, see `LLAMA_FOLDS`).
    act_absmax: ``{kernel path ("layers_0/attn/q/kernel"): per-channel max|x| (K,)}``,
      e.g. ``calibrate(..., observer=MinMaxObserver("channel")).amax()``.
    alpha: Migration strength, one float or ``{"<block>/<site>" or "<site>": float}``
      (from `search_alpha`).
    model: Needed for the ``attn/v`` site (head layout from ``model.config``).
    sites: Which sites to smooth (names of `Fold` s); default all of ``folds``
      (without ``attn/v`` when no model is given).
    folds: The block layout.

  Returns:
    ``(smoothed params, {"<block>/<site>": s})``.
  """
  by_name = {f.name: f for f in folds}
  sites = _default_sites(sites, model, folds)
  for s in sites:
    if s not in by_name:
      raise ValueError(f"smooth: site {s!r}; allowed: {tuple(by_name)}.")
  groups = _gqa_groups(model) if model is not None else None
  out = dict(params)
  factors = {}
  for b in _block_names(params, model):
    xb = {k[len(b) + 1:-len("/kernel")]: v for k, v in act_absmax.items() if k.startswith(b + "/")}
    bp = params[b]
    for site in sites:
      fold = by_name[site]
      a = _alpha_for(alpha, b, site)
      if not 0.0 <= a <= 1.0:
        raise ValueError(f"smooth: alpha={a!r} for {b}/{site}; allowed: a float in [0, 1].")
      st, ss = site_factors(bp, xb, fold, a, groups)
      bp = apply_fold(bp, fold, st, ss)
      factors[f"{b}/{site}"] = st
    out[b] = bp
  return out, factors


def _int8_static(x, amax):
  s = jnp.maximum(amax, 1e-8) / 127.0
  return jnp.clip(jnp.round(x / s), -127, 127) * s


def _int8_dynamic(x):
  s = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-8) / 127.0
  return jnp.clip(jnp.round(x / s), -127, 127) * s


def _int8_weight(w):
  s = jnp.maximum(jnp.max(jnp.abs(w), axis=0, keepdims=True), 1e-8) / 127.0
  return jnp.clip(jnp.round(w / s), -127, 127) * s


def site_error(x, kernels, s_targets, activations: str = "static") -> jax.Array:
  """Squared output error of W8A8 after smoothing one site, on captured inputs ``x``.

  Per-tensor static activation ranges come from ``max|x / s|`` of the sample.
  """
  xs = x.astype(jnp.float32) / s_targets
  xq = _int8_static(xs, jnp.max(jnp.abs(xs))) if activations == "static" else _int8_dynamic(xs)
  err = jnp.float32(0.0)
  for k in kernels:
    k = k.astype(jnp.float32)
    ref = x.astype(jnp.float32) @ k
    err = err + jnp.sum((xq @ _int8_weight(k * s_targets[:, None]) - ref) ** 2)
  return err


def search_alpha(model, params, windows, act_absmax: Mapping[str, jax.Array], *,
                 alphas: Sequence[float] = DEFAULT_ALPHAS, sites: Optional[Sequence[str]] = None,
                 activations: str = "static", skip_positions: int = 0, batch_size: int = 4,
                 folds: Sequence[Fold] = LLAMA_FOLDS, progress: bool = True) -> dict:
  """Per-site alpha with the least W8A8 output error on a few windows.

  Runs the float model block by block (smoothing is exact, so every block
  sees its float inputs) with `jquant.capture.capture_inputs`, and scores each
  alpha by `site_error` summed over the windows.

  Args:
    model: A jquant model with the block API.
    params: Float parameters (unsmoothed).
    windows: Int tokens (n, length); a handful is enough.
    act_absmax: Per-channel max|x| per kernel path (as for `smooth`).
    alphas: Candidates.
    sites: Sites to search (default: all of ``folds``).
    activations: ``"static"`` or ``"dynamic"`` activation quantization to score.
    skip_positions: Leave the first positions out of the error (attention sink).
    batch_size: Windows per step.

  Returns:
    ``{"<block>/<site>": best alpha}`` for `smooth`.
  """
  from jquant import capture
  from jquant.calibrate import _check_windows
  w = _check_windows(model, windows, "search_alpha")
  by_name = {f.name: f for f in folds}
  sites = _default_sites(sites, model, folds)
  for s in sites:
    if s not in by_name:
      raise ValueError(f"search_alpha: site {s!r}; allowed: {tuple(by_name)}.")
  if activations not in ("static", "dynamic"):
    raise ValueError(f"search_alpha: activations={activations!r}; allowed: ('static', 'dynamic').")
  groups = _gqa_groups(model)
  names = _block_names(params, model)
  alphas = tuple(float(a) for a in alphas)

  @jax.jit
  def score(bp, h, xb):
    out, inputs = capture.capture_inputs(model.block, bp, h)
    inputs = {k.removesuffix('/kernel'): v for k, v in inputs.items()}
    errs = {}
    for site in sites:
      fold = by_name[site]
      x = inputs[fold.targets[0]][:, skip_positions:]
      kernels = [_get(bp, t + "/kernel") for t in fold.targets]
      row = []
      for a in alphas:
        st, _ = site_factors(bp, xb, fold, a, groups)
        row.append(site_error(x, kernels, st, activations))
      errs[site] = jnp.stack(row)
    return out, errs

  totals = {}
  hs = [model.embed(params, jnp.asarray(w[i:i + batch_size])) for i in range(0, w.shape[0], batch_size)]
  for b in tqdm(names, desc="smoothquant alpha search", disable=not progress):
    xb = {k[len(b) + 1:-len("/kernel")]: v for k, v in act_absmax.items() if k.startswith(b + "/")}
    acc = None
    for i, h in enumerate(hs):
      hs[i], errs = score(params[b], h, xb)
      acc = errs if acc is None else jax.tree.map(jnp.add, acc, errs)
    for site, e in acc.items():
      totals[f"{b}/{site}"] = alphas[int(jnp.argmin(e))]
  return totals
