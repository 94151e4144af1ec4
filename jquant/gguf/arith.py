"""llama.cpp's CPU matmul arithmetic in jquant: activations quantized to the weight type's ``vec_dot_type``.

llama.cpp's CPU backend does not multiply a quantized weight with float
activations: it first converts the activations (``src1``) of every matmul to
the weight type's ``vec_dot_type`` (``ggml-cpu.c``'s ``type_traits_cpu``),
then takes exact integer dot products per block times the two scales, summed
in float32. `VEC_DOT_TYPE` lists the pairs:

========================  ==============  =====================================================
weight type               vec_dot_type    activation value (one block along the contraction axis)
========================  ==============  =====================================================
Q4_0, Q5_0, Q8_0          Q8_0            ``fp16(d) * q``, 32 per block, ``d = amax / 127``
Q4_1, Q5_1                Q8_1            as Q8_0, plus ``s = fp16(d * sum(q))`` (see below)
Q2_K, Q3_K, ..., Q6_K     Q8_K            ``d * q``, 256 per block, float32 ``d = 1 / iscale``
F16 / BF16 / F32          same            the activations rounded to float16 / bfloat16 / kept
========================  ==============  =====================================================

Q8_0 / Q8_1 (``quantize_row_q8_0_ref`` / ``_q8_1_ref`` in ``ggml-quants.c``):
``amax = max|x|``, ``d = amax / 127``, ``id = d ? 1 / d : 0``,
``q = roundf(x * id)`` (half away from zero), ``d`` stored as float16
(``impl="ref"``). The SIMD builds differ in two float32 details: x86
(AVX/AVX2/AVX-512, ``arch/x86/quants.c``; ``impl="x86"``, the default)
computes ``id = 127 / amax`` and rounds half to even; ARM NEON
(``impl="arm"``) keeps ``id = 1 / d`` and rounds half to even. Few codes
differ (a few per million on SmolLM2), yet the predicted perplexity moves
(Q4_K: 27.62 with "ref", 27.77 with "x86", llama.cpp on x86 27.77).
Q8_K (``quantize_row_q8_K_ref``, used by every build): ``max`` = the value of
largest magnitude (first one, with its sign), all zero when ``amax == 0``,
else ``iscale = -127 / max``, ``q = min(127, nearest_int(iscale * x))``
(half to even), ``d = 1 / iscale`` kept in float32 (the x86 repacked
path's ``ggml_quantize_mat_q8_K_4x8`` gives the same values). A Q4_1/Q5_1 weight
``d_w * q_w + m`` meets Q8_1 activations in ``d_w * d_a * sum(q_w * q_a) +
m * s`` with ``s = fp16(d_a * sum(q_a))`` (``ggml_vec_dot_q4_1_q8_1``): the
min term uses the float16-rounded block sum, which `GGMLWeight` reproduces.

Bit exact: `quantize_activations` returns the float32 values ``fp16(d) * q``
(Q8_0/Q8_1) and ``d * q`` (Q8_K) of the codes and scales ggml computes, for
every element. The product (`GGMLWeight`) then multiplies them with the
dequantized weight in float32; llama.cpp sums the same terms in another
order (integer per block, then float32), so products agree to float32
rounding, not bit for bit.

Not modelled here: llama.cpp's float16 KV cache (the attention's ``K q`` and
``V p`` products also round q and the probabilities to float16), which is
attention arithmetic of the model, not of the weights. Nor are IQ types,
or CPU builds that repack weights with other activation layouts (the values
are the same for the x86 repacked Q4_0/Q4_K paths).

Example:
    >>> import jquant
    >>> packed = jquant.gguf.load("/tmp/smollm2-q4_k.gguf")               # QArrays on GGML grids
    >>> lp = jquant.gguf.llamacpp_params(packed.params)                   # each kernel: GGMLWeight
    >>> ppl, n = jquant.eval.perplexity(packed, lp, windows)              # jquant's llama.cpp prediction
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jquant.gguf import types as gtypes
from jquant.qarray import QArray, dequantize
from jquant.ops import weight_property
from jquant.utils import path_str

# ggml-cpu.c type_traits_cpu[type].vec_dot_type for the types jquant models.
VEC_DOT_TYPE = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q5_0": "Q8_0",
                "Q4_1": "Q8_1", "Q5_1": "Q8_1", "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K",
                "Q6_K": "Q8_K"}
VEC_DOT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q8_1", "Q8_K")
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q8_1": 32, "Q8_K": 256}
IMPLS = ("ref", "x86", "arm")


def _check_vec_dot_type(vec_dot_type, fn: str) -> str:
  key = str(getattr(vec_dot_type, "name", vec_dot_type)).upper()
  if key not in VEC_DOT_TYPES:
    raise ValueError(f"{fn}: vec_dot_type={vec_dot_type!r}; allowed: {', '.join(VEC_DOT_TYPES)} (a weight type's "
                     "is VEC_DOT_TYPE[type], e.g. Q8_K for Q4_K).")
  return key


def _check_impl(impl, fn: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"{fn}: impl={impl!r}; allowed: 'ref' (ggml's quantize_row_*_ref), 'x86' (AVX/AVX2/AVX-512 "
                     "builds) or 'arm' (NEON builds).")
  return impl


def _blocks(x, block: int, fn: str, vec_dot_type: str):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{fn}: x has dtype {x.dtype}; allowed: a floating dtype (float32, bfloat16, float16).")
  if x.ndim < 1 or x.shape[-1] % block:
    raise ValueError(f"{fn}: x has shape {x.shape}: its last (contraction) axis of {x.shape[-1] if x.ndim else 0} "
                     f"values is not a multiple of {vec_dot_type}'s {block}-value blocks; llama.cpp requires whole "
                     "blocks (rows of a weight of that type have them): pass activations (..., K) with K a "
                     f"multiple of {block}.")
  xf = x.astype(jnp.float32)
  return xf.reshape(xf.shape[:-1] + (xf.shape[-1] // block, block))


def _roundf(t):
  """C's ``roundf``: half away from zero, exact in float32 (``t - trunc(t)`` is exact below 2^23)."""
  r = jnp.trunc(t)
  return r + jnp.where(jnp.abs(t - r) >= 0.5, jnp.sign(t), 0.0)


def _q8_0_parts(xb, impl: str):
  """Q8_0/Q8_1 of blocks (..., G, 32): float32 codes, the float32 ``d`` and the stored ``fp16(d)`` (..., G, 1)."""
  amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
  d = jax.lax.optimization_barrier(amax / jnp.float32(127.0))  # 1 / d stays a reciprocal of this rounded d
  if impl == "x86":
    inv = jnp.where(amax != 0, jnp.float32(127.0) / jnp.where(amax != 0, amax, 1.0), 0.0)
  else:
    inv = jnp.where(d != 0, jnp.float32(1.0) / jnp.where(d != 0, d, 1.0), 0.0)
  t = xb * inv
  # Integer codes as ggml stores them (int8: no -0.0), back in float32.
  q = (_roundf(t) if impl == "ref" else jnp.round(t)).astype(jnp.int32).astype(jnp.float32)
  d16 = d.astype(jnp.float16).astype(jnp.float32)
  return q, d, d16


def _q8_k_values(xb):
  """Q8_K of blocks (..., G, 256): the float32 values ``d * q``."""
  ax = jnp.abs(xb)
  i = jnp.argmax(ax, axis=-1, keepdims=True)  # the first largest magnitude, as ggml's strict ``ax > amax``
  mx = jnp.take_along_axis(xb, i, axis=-1)
  amax = jnp.take_along_axis(ax, i, axis=-1)
  nz = amax != 0
  # The barrier keeps XLA from rewriting 1 / (-127 / max) as max / -127 (another rounding than ggml's).
  iscale = jax.lax.optimization_barrier(jnp.float32(-127.0) / jnp.where(nz, mx, 1.0))
  q = jnp.minimum(jnp.round(iscale * xb), 127.0).astype(jnp.int32).astype(jnp.float32)
  d = jnp.float32(1.0) / iscale
  v = jnp.where(nz, d * q, 0.0)
  # NaN or inf in a block: ggml's comparisons skip NaN; make the whole block non-finite, never a silent value.
  return jnp.where(jnp.all(jnp.isfinite(xb), axis=-1, keepdims=True), v, jnp.nan)


def quantize_activations(x, vec_dot_type, *, impl: str = "x86") -> jax.Array:
  """The activations llama.cpp's CPU matmul uses for ``x``, dequantized: float32, ``x``'s shape.

  Args:
    x: Float activations (..., K), any float dtype (computed in float32 as
      ggml does); blocks run along the last axis.
    vec_dot_type: ``"Q8_0"``, ``"Q8_1"``, ``"Q8_K"``, ``"F16"``, ``"BF16"`` or
      ``"F32"`` (`VEC_DOT_TYPE` maps a weight type to it).
    impl: ``"x86"`` (default): llama.cpp's CPU backend on x86-64 (the
      AVX/AVX2/AVX-512 ``quantize_row_q8_0``: ``id = 127/amax``, half to
      even); ``"arm"``: NEON (``id = 1/d``, half to even); ``"ref"``: ggml's
      ``quantize_row_q8_0_ref`` / ``_q8_1_ref`` (``id = 1/d``, ``roundf``;
      what the ``gguf`` package's ``quants.quantize`` computes). Q8_K and
      the float types are the same in all three.

  Returns:
    float32 (..., K): ``fp16(d) * q`` per 32-block (Q8_0, Q8_1), ``d * q``
    per 256-block (Q8_K), ``x`` rounded to float16 / bfloat16 (F16 / BF16,
    round half to even) or ``x`` in float32 (F32). A block holding NaN or
    inf comes back non-finite.

  Raises:
    ValueError: an unknown ``vec_dot_type`` or ``impl``; K not a multiple of
      the block (32 or 256): llama.cpp requires whole blocks.
    TypeError: integer ``x``.

  Example:
    >>> quantize_activations(jnp.array([0.5, -1.0, 0.25, 0.0] * 8), "Q8_0")[:4].tolist()
    [0.50390625, -0.99993896484375, 0.251953125, 0.0]
  """
  fn = "quantize_activations"
  key = _check_vec_dot_type(vec_dot_type, fn)
  impl = _check_impl(impl, fn)
  xb = _blocks(x, BLOCK[key], fn, key)
  shape = jnp.shape(x)
  if key == "F32":
    return xb.reshape(shape)
  if key in ("F16", "BF16"):
    return xb.astype(jnp.float16 if key == "F16" else jnp.bfloat16).astype(jnp.float32).reshape(shape)
  if key == "Q8_K":
    return _q8_k_values(xb).reshape(shape)
  q, _, d16 = _q8_0_parts(xb, impl)
  return (d16 * q).reshape(shape)


class _GGMLFields(NamedTuple):
  weight: object
  vec_dot_type: str = "Q8_0"
  impl: str = "x86"


def _check_fields(weight, vec_dot_type, impl):
  _check_vec_dot_type(vec_dot_type, "GGMLWeight")
  _check_impl(impl, "GGMLWeight")
  if isinstance(weight, QArray):
    return
  if not hasattr(weight, "shape") or not hasattr(weight, "dtype") or not jnp.issubdtype(weight.dtype, jnp.floating):
    raise ValueError(f"GGMLWeight: weight is a {type(weight).__name__}; allowed: a QArray on a GGML grid "
                     "(jquant.gguf.spec_for) or a float array.")


@jax.tree_util.register_pytree_node_class
class GGMLWeight(_GGMLFields):
  """A weight whose matmul runs llama.cpp's CPU arithmetic: activations quantized to ``vec_dot_type`` first.

  ``qdot(x, GGMLWeight(w, "Q8_K"))`` computes ``quantize_activations(x,
  "Q8_K") @ dequantize(w)`` in float32 (and, for Q8_1 activations against a
  Q4_1/Q5_1 weight, replaces the min term by llama.cpp's float16 block sums),
  returned in ``x``'s dtype. Inside `jquant.quantized` (``Model.apply``) a
  matmul over the weight's contraction axis uses this product; any other use
  (an embedding lookup: llama.cpp's ``get_rows`` dequantizes the rows) reads
  the dequantized weight, so a tied embedding can be wrapped too.

  Attributes:
    weight: A `QArray` on a GGML grid, (K, N) contracting axis 0 (or an
      embedding (V, d) along its last axis, inside `jquant.quantized`), or a
      float array (F16 / BF16 / F32 weights).
    vec_dot_type: The activations' type (`VEC_DOT_TYPES`), static.
    impl: ``"x86"`` (default), ``"arm"`` or ``"ref"`` (see `quantize_activations`), static.

  Raises:
    ValueError: at construction, an unknown ``vec_dot_type``/``impl`` or a
      weight that is neither a QArray nor a float array; at ``qdot``, a
      weight that is not 2-D contracting axis 0, or K not a multiple of the
      activation block.

  Example:
    >>> q = jquant.quantize(w, jquant.gguf.spec_for("Q4_K"))          # w: (512, 64)
    >>> y = jquant.ops.qdot(x, GGMLWeight(q, "Q8_K"))                 # x: (..., 512)
  """

  __slots__ = ()
  # jquant.quantized: uses other than a matmul over the contraction axis read the dequantized weight.
  dequantized_elsewhere = True

  def __new__(cls, weight, vec_dot_type: str = "Q8_0", impl: str = "x86"):
    _check_fields(weight, vec_dot_type, impl)
    return super().__new__(cls, weight, _check_vec_dot_type(vec_dot_type, "GGMLWeight"), impl)

  def tree_flatten(self):
    return (self.weight,), (self.vec_dot_type, self.impl)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls._make((children[0],) + tuple(aux))  # no checks: children may be tracers or placeholders

  shape = weight_property("shape")
  dtype = weight_property("dtype")

  def quantize_input(self, x):
    """``x`` as llama.cpp multiplies it with this weight (`quantize_activations`), float32."""
    return quantize_activations(x, self.vec_dot_type, impl=self.impl)

  def __qdot__(self, x):
    w = self.weight
    if isinstance(w, QArray):
      if w.ndim != 2 or w.axis != -w.ndim:
        raise ValueError(f"GGMLWeight: weight must be (K, N) contracting axis 0 for qdot; got shape {w.shape} with "
                         f"axis {w.axis}. An embedding or N-D weight runs through jquant.quantized(apply), which "
                         "views it as its (K, N) matrix.")
      wf = dequantize(w, jnp.float32)
    else:
      if jnp.ndim(w) != 2:
        raise ValueError(f"GGMLWeight: weight must be 2-D (K, N); got shape {jnp.shape(w)}.")
      wf = jnp.asarray(w).astype(jnp.float32)
    if jnp.shape(x)[-1] != wf.shape[0]:
      raise ValueError(f"GGMLWeight: x has {jnp.shape(x)[-1]} values along its last axis, the weight {wf.shape[0]} "
                       "rows; allowed: x (..., K) with the weight (K, N).")
    hi = jax.lax.Precision.HIGHEST
    min_term = (self.vec_dot_type == "Q8_1" and isinstance(w, QArray) and not w.spec.two_level
                and w.spec.float_min)
    if not min_term:
      y = jnp.dot(self.quantize_input(x), wf, precision=hi, preferred_element_type=jnp.float32)
      return y.astype(x.dtype)
    # Q4_1/Q5_1 x Q8_1: d_w d_a sum(q_w q_a) + m s_a with s_a = fp16(d_a sum(q_a)); the float product of the
    # values carries m fp16(d_a) sum(q_a) instead, so add m (s_a - fp16(d_a) sum(q_a)) per block.
    xb = _blocks(x, BLOCK["Q8_1"], "GGMLWeight", "Q8_1")
    q, d, d16 = _q8_0_parts(xb, self.impl)
    sq = jnp.sum(q, axis=-1)
    s = (d[..., 0] * sq).astype(jnp.float16).astype(jnp.float32)
    corr = s - d16[..., 0] * sq                                      # (..., G)
    _, zmin = w.group_params()                                       # value = scale * q - zmin: m = -zmin
    if zmin.shape[0] != corr.shape[-1]:
      raise ValueError(f"GGMLWeight: a Q8_1 product needs one weight group per 32 inputs; the weight has "
                       f"{zmin.shape[0]} groups for {wf.shape[0]} inputs (spec {w.spec}).")
    xa = (d16 * q).reshape(jnp.shape(x))
    y = jnp.dot(xa, wf, precision=hi, preferred_element_type=jnp.float32)
    y = y - jnp.dot(corr, zmin.astype(jnp.float32), precision=hi, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def tensor_types(path) -> dict:
  """``{jquant parameter path: GGML type name}`` of a GGUF file's tensors (``"layers_0/mlp/down/kernel": "Q4_K"``).

  For `llamacpp_params`'s ``types``: `jquant.gguf.load` returns F16/BF16
  tensors as float32 arrays, so only the file says they were F16.

  Raises:
    FileNotFoundError, jquant.files.FileFormatError: as `jquant.gguf.load`.
  """
  import os
  from jquant.files import read_gguf
  from jquant.gguf import names
  path = os.fspath(path)
  reader = read_gguf(path, "tensor_types")
  return {names.param_path(t.name)[0]: t.tensor_type.name for t in reader.tensors
          if t.name not in names.CONFIG_TENSORS}


def llamacpp_params(params, *, types: Optional[Mapping[str, str]] = None, impl: str = "x86"):
  """``params`` with every matmul weight wrapped in `GGMLWeight` at its type's ``vec_dot_type``, as llama.cpp runs it.

  Then ``jquant.eval.perplexity(model, llamacpp_params(packed.params),
  windows)`` is jquant's prediction of llama.cpp's (CPU) perplexity on the
  same file: same weights, activations quantized as llama.cpp quantizes them.

  * A `QArray` leaf on a GGML grid (`jquant.gguf.type_of`): ``GGMLWeight(q,
    VEC_DOT_TYPE[type])`` (the tied embedding included: its lookup still reads
    the dequantized table, its output-head product quantizes the final hidden
    state as llama.cpp does).
  * A float leaf of 2 or more dimensions: by ``types[path]`` when given,
    else by its dtype (float16 -> F16, bfloat16 -> BF16); float32 (F32) is
    left as is (llama.cpp multiplies F32 weights in float32). 1-D leaves
    (norms) are left as they are.

  Args:
    params: A parameter tree, e.g. ``jquant.gguf.load(path).params`` or
      `jquant.quantize_params` on `jquant.gguf.rules`.
    types: Optional ``{path: GGML type}`` (`tensor_types` of the file): float
      leaves get the type named there (a loaded F16 tensor is float32); a
      QArray whose grid is another type raises.
    impl: ``"x86"`` (default), ``"arm"`` or ``"ref"``: which build's Q8_0/Q8_1
      rounding (see `quantize_activations`). It matters: on SmolLM2-135M
      Q4_K, ``"ref"`` predicts a perplexity 0.6% below ``"x86"``, and ``"x86"``
      is what llama.cpp measures on x86-64.

  Returns:
    A tree of the same structure.

  Raises:
    ValueError: a quantized leaf that is not on a GGML grid, or another
      activation-quantizing wrapper (the message names the path and spec); a
      QArray whose grid differs from ``types[path]``; an unknown type or impl.

  Example:
    >>> lp = llamacpp_params(jquant.gguf.load("/tmp/smollm2-q4_k.gguf").params)
    >>> lp["layers_0"]["mlp"]["down"]["kernel"].vec_dot_type
    'Q8_K'
  """
  fn = "llamacpp_params"
  _check_impl(impl, fn)
  types_ = dict(types or {})
  for p, t in types_.items():
    gtypes.check_type(t, f"{fn}(types[{p!r}])")

  def is_leaf(v):
    return isinstance(v, QArray) or hasattr(type(v), "__qdot__")

  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
  out = []
  for kp, leaf in leaves:
    path = path_str(kp)
    want = types_.get(path)
    want = None if want is None else gtypes.check_type(want, fn)
    if isinstance(leaf, GGMLWeight):
      out.append(leaf)
    elif isinstance(leaf, QArray):
      t = gtypes.type_of(leaf)
      if t is None:
        raise ValueError(f"{fn}: {path!r} is a QArray whose spec is no GGML type's grid ({leaf.spec}); llama.cpp "
                         f"cannot run it. Allowed: specs of jquant.gguf.spec_for(type), type in "
                         f"{', '.join(gtypes.QUANT_TYPES)}; quantize with jquant.gguf.rules.")
      if want is not None and want != t:
        raise ValueError(f"{fn}: {path!r} is a {t} QArray but types says {want}; pass the types of the file "
                         "these parameters were loaded from (tensor_types(path)).")
      out.append(GGMLWeight(leaf, VEC_DOT_TYPE[t], impl))
    elif is_leaf(leaf):
      raise ValueError(f"{fn}: {path!r} is a {type(leaf).__name__}, which quantizes activations its own way; "
                       "allowed: QArrays on GGML grids and float arrays (llama.cpp runs nothing else).")
    elif hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating) and jnp.ndim(leaf) >= 2:
      if want is not None and want not in gtypes.FLOAT_TYPES:
        raise ValueError(f"{fn}: {path!r} is a float array but types says {want}; pass the types of the file "
                         "these parameters were loaded from (tensor_types(path)).")
      t = want or {np.dtype(jnp.float16): "F16", np.dtype(jnp.bfloat16): "BF16"}.get(np.dtype(leaf.dtype), "F32")
      out.append(leaf if t == "F32" else GGMLWeight(leaf, VEC_DOT_TYPE[t], impl))
    else:
      out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


__all__ = ["VEC_DOT_TYPE", "VEC_DOT_TYPES", "BLOCK", "IMPLS", "quantize_activations", "GGMLWeight",
           "llamacpp_params", "tensor_types"]
