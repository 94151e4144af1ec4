"""AWQ over a whole model: groups of layers per architecture, search, folding.

`scale_model` walks the blocks in order. For each block it records the input
of every Dense layer on the calibration windows (`jquant.capture`), and for
each *group* of layers that share an input it

1. computes the mean ``|x|`` per input channel (float32, over all windows),
2. searches the AWQ scales by the error of the real sub-block output (the
   attention sub-block for q/k/v, the MLP sub-block for gate/up, the layer
   itself for o and down) with the group's weights scaled and fake-quantized
   by the rule's spec, on the first ``score_windows`` windows,
3. folds the inverse scales into the preceding norm (weight and bias) or
   linear layer, exactly,

and then searches a clipping range per quantization group for every kernel
but q and k (`jquant.awq.core.search_clip`) and clamps the kernel to it.

Llama groups: ``attn_norm -> q,k,v``; ``v -> o`` only when v's outputs are
o's inputs (not under grouped-query attention); ``mlp_norm -> gate,up``;
``up -> down``. BERT (post-LayerNorm) groups: ``v -> o`` only: its LayerNorm
outputs also feed the residual stream, and the MLP's GELU is not
scale-equivariant, so no other fold is exact (clipping still applies to every
kernel but q and k).

Like the reference implementation, the next block's inputs are the *float*
block's outputs (``propagate="float"``); ``propagate="quantized"`` feeds the
output of the scaled, clipped, quantized block instead.

`quantize_model` = `scale_model` + `jquant.quantize_params`. AWQ then GPTQ:
``jquant.gptq.quantize_model(m, scale_model(...).params, ...)``.

Example:
    >>> import jax, jquant
    >>> m = jquant.models.llama_init(jquant.models.LlamaConfig(), jax.random.key(0))
    >>> calib = jax.random.randint(jax.random.key(1), (4, 32), 0, m.config.vocab_size)
    >>> spec = jquant.QuantSpec(bits=4, granularity="group", group_size=32)
    >>> rules = [jquant.Rule(r"(attn|mlp)/\\w+/kernel$", spec)]
    >>> qparams = jquant.awq.quantize_model(m, m.params, calib, rules, progress=False)
    >>> logits = m.apply(qparams, calib)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jquant.awq import core
from jquant.capture import capture_inputs
from jquant.spec import QuantSpec, Rule, first_match
from jquant.tree import dequantize_params, quantize_params
from jquant.utils import get_path as _get, set_path as _set

PROPAGATE = ("float", "quantized")


@dataclasses.dataclass(frozen=True)
class AWQConfig:
  """Knobs of the AWQ model pass.

  Attributes:
    n_grid: Exponents ``alpha`` searched per variant (``i / n_grid``).
    variant: ``"act"`` (``s = mean|x|^alpha``), ``"act_over_weight"``
      (``/ w_mean^(1-alpha)``) or ``"both"`` (twice the candidates).
    clip: Search a clipping range per quantization group (not for q and k).
    clip_grid: Shrink steps of the clipping search per unit of range.
    max_shrink: Largest fraction of the range the clipping search cuts.
    clip_tokens: Calibration tokens the clipping search is scored on.
    skip_positions: Leave the first positions of every window out of the
      statistics, the scores and the clipping tokens (attention sinks).
    score_windows: Windows the scale search is scored on (None: all). The
      statistics always use every window.
    batch_size: Windows per forward when recording inputs.
    propagate: ``"float"``: block i+1 sees the float block i's output (the
      reference's convention); ``"quantized"``: the quantized block's.
  """

  n_grid: int = 20
  variant: str = "act"
  clip: bool = True
  clip_grid: int = 20
  max_shrink: float = 0.5
  clip_tokens: int = 512
  skip_positions: int = 0
  score_windows: Optional[int] = None
  batch_size: int = 8
  propagate: str = "float"

  def __post_init__(self):
    if self.variant not in core.VARIANTS:
      raise ValueError(f"AWQConfig: variant={self.variant!r}; allowed: {core.VARIANTS}.")
    if self.propagate not in PROPAGATE:
      raise ValueError(f"AWQConfig: propagate={self.propagate!r}; allowed: {PROPAGATE}.")
    for name in ("n_grid", "clip_grid", "clip_tokens", "batch_size"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"AWQConfig: {name}={v!r}; allowed: a positive int.")
    if not isinstance(self.skip_positions, int) or self.skip_positions < 0:
      raise ValueError(f"AWQConfig: skip_positions={self.skip_positions!r}; allowed: an int >= 0.")
    if self.score_windows is not None and (not isinstance(self.score_windows, int) or self.score_windows < 1):
      raise ValueError(f"AWQConfig: score_windows={self.score_windows!r}; allowed: None or a positive int.")
    if not 0.0 <= self.max_shrink < 1.0:
      raise ValueError(f"AWQConfig: max_shrink={self.max_shrink!r}; allowed: a float in [0, 1).")


class Group(NamedTuple):
  """Layers sharing one input, and where their inverse scale is folded.

  Attributes:
    name: Short name (``"attn_in"``, ``"attn_out"``, ``"mlp_in"``, ``"mlp_out"``).
    prev: Path (inside a block) of the norm module or linear layer whose
      outputs are divided by the scales.
    prev_kind: ``"norm"`` or ``"linear"``.
    linears: Paths of the Dense layers whose input rows are multiplied.
    inspect: Whose output scores a candidate: a sub-block name the
      architecture knows (``"attn"``, ``"mlp"``) or ``"linear"`` (the single
      layer of the group).
  """

  name: str
  prev: str
  prev_kind: str
  linears: tuple
  inspect: str


class LlamaArch(NamedTuple):
  """Groups and sub-blocks of `jquant.models.llama` blocks."""

  config: Any

  def groups(self, bp) -> list[Group]:
    out = [Group("attn_in", "attn_norm", "norm", ("attn/q", "attn/k", "attn/v"), "attn")]
    v_out = _kernel(bp, "attn/v").shape[1]
    if v_out == _kernel(bp, "attn/o").shape[0]:  # no GQA: o's input channels are v's outputs
      out.append(Group("attn_out", "attn/v", "linear", ("attn/o",), "linear"))
    out.append(Group("mlp_in", "mlp_norm", "norm", ("mlp/gate", "mlp/up"), "mlp"))
    out.append(Group("mlp_out", "mlp/up", "linear", ("mlp/down",), "linear"))
    return out

  def embed(self, model, params, tokens):
    return model.embed(params, tokens)

  def block(self, bp, h):
    from jquant.models import llama
    return llama.Block(self.config).apply({"params": bp}, h)

  def subblock(self, name, bp, x):
    from jquant.models import llama
    if name == "attn":
      return llama.Attention(self.config).apply({"params": bp["attn"]}, x)
    if name == "mlp":
      return llama.MLP(self.config).apply({"params": bp["mlp"]}, x)
    raise ValueError(f"LlamaArch.subblock: name={name!r}; allowed: 'attn', 'mlp'.")


class BertArch(NamedTuple):
  """Groups of post-LayerNorm BERT blocks (`jquant.models.bert`): only ``v -> o`` folds exactly.

  A post-norm block's LayerNorm output is both the next layers' input and the
  residual stream, so dividing it by scales would change the residual; the
  MLP's GELU is not scale-equivariant, so ``up -> down`` has no exact fold.
  Windows are taken as unpadded (mask of ones).
  """

  config: Any

  def groups(self, bp) -> list[Group]:
    if _kernel(bp, "attn/v").shape[1] != _kernel(bp, "attn/o").shape[0]:
      return []
    return [Group("attn_out", "attn/v", "linear", ("attn/o",), "linear")]

  def embed(self, model, params, tokens):
    from jquant.models import bert
    return bert._Embeddings(self.config).apply({"params": params["embed"]}, tokens, jnp.zeros_like(tokens))

  def block(self, bp, h):
    from jquant.models import bert
    return bert.BertLayer(self.config).apply({"params": bp}, h, jnp.ones(h.shape[:2], jnp.int32))

  def subblock(self, name, bp, x):
    raise ValueError(f"BertArch.subblock: name={name!r}; BERT groups only inspect single layers.")


def architecture(model):
  """The group/sub-block description of ``model``: `LlamaArch` or `BertArch`."""
  from jquant.models import bert, llama
  if isinstance(model, llama.Model):
    return LlamaArch(model.config)
  if isinstance(model, bert.BertModel):
    return BertArch(model.config)
  raise TypeError(f"jquant.awq: no AWQ groups are defined for a {type(model).__name__}; "
                  "allowed: jquant.models.Model (Llama-style decoders), jquant.models.BertModel.")


def _kernel(bp, path):
  return _get(bp, path)["kernel"]


class GroupReport(NamedTuple):
  """What the scale search chose for one group of one block."""

  block: str
  group: str
  alpha: float
  weighted: bool
  error: float      # the chosen candidate's output error
  rtn_error: float  # the same sub-block with plain round-to-nearest weights


class ScaledModel(NamedTuple):
  """Result of `scale_model`.

  Attributes:
    params: Float parameters, scaled, folded and clipped: ready for RTN
      (`jquant.quantize_params`) or GPTQ.
    scales: ``{"layers_i/group": (d,) scales}``.
    reports: One `GroupReport` per searched group.
    seconds: Wall time of the pass.
  """

  params: Any
  scales: dict
  reports: list
  seconds: float


def _specs_for(block_name, linears, rules):
  specs = []
  for l in linears:
    _, spec = first_match(rules, f"{block_name}/{l}/kernel")
    if spec is not None and not isinstance(spec, QuantSpec):
      raise TypeError(f"jquant.awq: the rule for {block_name}/{l}/kernel gives a {type(spec).__name__}; "
                      "allowed: a jquant.QuantSpec or None.")
    specs.append(spec)
  return tuple(specs)


def _weight_mean(bp, group, specs):
  """Pooled `core.weight_stats` over the group's kernels, each with its own spec's groups."""
  parts = [core.weight_stats([_kernel(bp, l)], s) * _kernel(bp, l).shape[1] for l, s in zip(group.linears, specs)]
  return sum(parts) / sum(_kernel(bp, l).shape[1] for l in group.linears)


def _inspect(arch, group, bp, x):
  if group.inspect == "linear":
    return x @ _kernel(bp, group.linears[0]).astype(x.dtype)
  return arch.subblock(group.inspect, bp, x)


# Module-level jits with hashable static descriptions: repeated calls (blocks, models of the same shape,
# tests) reuse the compiled programs.
@functools.partial(jax.jit, static_argnames=("arch", "group", "specs", "n_grid", "variant"))
def _search_group(bp, x, x_mean, pos_w, *, arch, group, specs, n_grid, variant):
  """`core.search_scales` for one group, scored on the group's inspected sub-block output."""
  ref = _inspect(arch, group, bp, x)
  w_mean = _weight_mean(bp, group, specs) if variant != "act" else None

  def loss(s):
    cand = bp
    for l, spec in zip(group.linears, specs):
      cand = _set(cand, f"{l}/kernel", core.scaled_fake_quant(_kernel(bp, l), s, spec))
    return core.output_error(ref, _inspect(arch, group, cand, x), pos_w)

  return core.search_scales(loss, x_mean, w_mean, n_grid=n_grid, variant=variant)


@functools.partial(jax.jit, static_argnames=("arch", "skip"))
def _record(bp, h, *, arch, skip):
  """Block output, every Dense input, and the per-channel sums of |x| past ``skip`` positions."""
  out, xs = capture_inputs(arch.block, bp, h)
  xs = {k.removesuffix('/kernel'): v for k, v in xs.items()}
  sums = {k: jnp.sum(jnp.abs(x[:, skip:].astype(jnp.float32)), axis=(0, 1)) for k, x in xs.items()}
  return out, xs, sums


@functools.partial(jax.jit, static_argnames=("arch",))
def _block(bp, h, *, arch):
  return arch.block(bp, h)


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink"))
def _clip(w, x, *, spec, n_grid, max_shrink):
  return core.search_clip(w, x, spec, n_grid=n_grid, max_shrink=max_shrink)


def _fold(bp, group, s):
  """Block params with the group's scales folded in (float outputs unchanged)."""
  prev = _get(bp, group.prev)
  if group.prev_kind == "norm":
    new_scale, new_bias = core.fold_into_norm(prev["scale"], s, prev.get("bias"))
    new_prev = dict(prev, scale=new_scale)
  else:
    new_kernel, new_bias = core.fold_into_columns(prev["kernel"], s, prev.get("bias"))
    new_prev = dict(prev, kernel=new_kernel)
  if new_bias is not None:
    new_prev["bias"] = new_bias
  bp = _set(bp, group.prev, new_prev)
  for l in group.linears:
    bp = _set(bp, f"{l}/kernel", core.scale_rows(_kernel(bp, l), s))
  return bp


_NO_CLIP = ("attn/q", "attn/k")  # their outputs meet in q k^T: a per-layer error says little


def _dense_paths(bp, prefix=""):
  out = []
  for k, v in bp.items():
    if isinstance(v, dict):
      if "kernel" in v:
        out.append(prefix + k)
      else:
        out.extend(_dense_paths(v, prefix + k + "/"))
  return out


def _batches(n, size):
  return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def scale_model(model, params, calib_windows, rules: Sequence[Rule], *, config: Optional[AWQConfig] = None,
                progress: bool = True, **overrides) -> ScaledModel:
  """Searches AWQ scales and clipping ranges block by block and folds them in.

  Args:
    model: A jquant model with the block API (``embed``, ``block``,
      ``block_names``), e.g. `jquant.models.from_gguf()`.
    params: Its float parameters.
    calib_windows: int32 token windows ``(N, T)``.
    rules: `jquant.Rule` list: the spec of each Dense kernel (paths like
      ``layers_3/mlp/up/kernel``); layers left in float are scored unquantized.
    config: An `AWQConfig`; keyword ``overrides`` replace its fields
      (``n_grid=10``, ``variant="both"``, ...).
    progress: Show a tqdm bar over blocks.

  Returns:
    A `ScaledModel`; ``.params`` is a float tree, equivalent to ``params`` in
    float arithmetic except for the clipping.
  """
  cfg = config or AWQConfig()
  if overrides:
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(AWQConfig)})
    if unknown:
      raise TypeError(f"scale_model: unknown options {unknown}; allowed: "
                      f"{[f.name for f in dataclasses.fields(AWQConfig)]}.")
    cfg = dataclasses.replace(cfg, **overrides)
  rules = list(rules)
  calib = jnp.asarray(calib_windows)
  if calib.ndim != 2 or not jnp.issubdtype(calib.dtype, jnp.integer):
    raise ValueError(f"scale_model: calib_windows must be int tokens (N, T); got shape {calib.shape}, "
                     f"dtype {calib.dtype}.")
  n, length = calib.shape
  if cfg.skip_positions >= length:
    raise ValueError(f"scale_model: skip_positions={cfg.skip_positions} leaves nothing of windows of length "
                     f"{length}; allowed: 0..{length - 1}.")
  n_score = n if cfg.score_windows is None else min(cfg.score_windows, n)
  arch = architecture(model)
  pos_w = core.position_weights(length, cfg.skip_positions)
  start = time.perf_counter()

  h = jnp.concatenate([arch.embed(model, params, calib[sl]) for sl in _batches(n, cfg.batch_size)])
  new_params = dict(params)
  scales, reports = {}, []
  names = model.block_names
  for name in tqdm(names, desc="AWQ", disable=not progress):
    bp = params[name]
    outs, kept, sums = [], {}, {}
    for sl in _batches(n, cfg.batch_size):
      out, xs, s = _record(bp, h[sl], arch=arch, skip=cfg.skip_positions)
      outs.append(out)
      for k in s:
        sums[k] = sums.get(k, 0.0) + s[k]
      if sl.start < n_score:
        for k, x in xs.items():
          kept.setdefault(k, []).append(x[: n_score - sl.start])
    count = n * (length - cfg.skip_positions)
    x_means = {k: v / count for k, v in sums.items()}
    xs = {k: jnp.concatenate(v) for k, v in kept.items()}

    # Scale search on the float block, then all folds (the groups' searches are independent).
    new_bp = bp
    group_scales = {}
    for group in arch.groups(bp):
      specs = _specs_for(name, group.linears, rules)
      if all(s is None for s in specs):
        continue
      res = _search_group(bp, xs[group.linears[0]], x_means[group.linears[0]], pos_w, arch=arch, group=group,
                          specs=specs, n_grid=cfg.n_grid, variant=cfg.variant)
      group_scales[group] = res.scales
      scales[f"{name}/{group.name}"] = res.scales
      rtn = float(res.errors[0]) if cfg.variant != "act_over_weight" else float("nan")
      reports.append(GroupReport(name, group.name, float(res.alpha), bool(res.weighted),
                                 float(res.errors[res.index]), rtn))
    for group, s in group_scales.items():
      new_bp = _fold(new_bp, group, s)

    if cfg.clip:
      input_scale = {l: s for g, s in group_scales.items() for l in g.linears}
      for path in _dense_paths(new_bp):
        _, spec = first_match(rules, f"{name}/{path}/kernel")
        if spec is None or path in _NO_CLIP or path not in xs:
          continue
        x = xs[path]
        if path in input_scale:
          x = x / input_scale[path].astype(x.dtype)
        tokens = core.sample_tokens(x, cfg.clip_tokens, skip_positions=cfg.skip_positions)
        w = _kernel(new_bp, path)
        rng = _clip(w, tokens, spec=spec, n_grid=cfg.clip_grid, max_shrink=cfg.max_shrink)
        if rng is not None:
          new_bp = _set(new_bp, f"{path}/kernel", core.apply_clip(w, rng, spec))

    new_params[name] = new_bp
    if cfg.propagate == "float":
      h = jnp.concatenate(outs)
    else:
      qbp = _fake_quant_block(name, new_bp, rules)
      h = jnp.concatenate([_block(qbp, h[sl], arch=arch) for sl in _batches(n, cfg.batch_size)])
  jax.block_until_ready(h)
  return ScaledModel(new_params, scales, reports, time.perf_counter() - start)


def _fake_quant_block(name, bp, rules):
  return dequantize_params(quantize_params({name: bp}, rules)[name])


def quantize_model(model, params, calib_windows, rules: Sequence[Rule], *, config: Optional[AWQConfig] = None,
                   progress: bool = True, return_scaled_float: bool = False, **overrides):
  """AWQ: `scale_model`, then round-to-nearest with ``rules`` (`jquant.quantize_params`).

  Args:
    model, params, calib_windows, rules, config, progress, overrides: See
      `scale_model` (e.g. ``n_grid=20``, ``variant="both"``, ``clip=False``).
    return_scaled_float: Also return the `ScaledModel` (its float ``params``
      feed GPTQ for AWQ+GPTQ).

  Returns:
    The quantized parameter tree (`jquant.QArray` leaves where ``rules``
    select), or ``(qparams, scaled)`` with ``return_scaled_float=True``.

  Example:
    >>> qparams = jquant.awq.quantize_model(m, m.params, calib, rules, n_grid=20)
  """
  scaled = scale_model(model, params, calib_windows, rules, config=config, progress=progress, **overrides)
  qparams = quantize_params(scaled.params, rules)
  return (qparams, scaled) if return_scaled_float else qparams
