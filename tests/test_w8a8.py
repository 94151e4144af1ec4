"""W8A8: int8 matmul exactness on any model (Linen / NNX, Dense / DenseGeneral / Einsum), calibrate ->
convert -> save -> load -> serve through jquant.quantized, SmoothQuant folding, static scales."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
import jquant.capture  # noqa: F401  (registers the submodule)
import jquant.models
import w8a8_qat_models as M
from jquant import capture, graph, ops
from jquant import observers as O
from jquant import smoothquant as sq
from jquant.calibrate import ActivationStats, W8A8Spec, calibrate, convert
from jquant.ops import W8A8Weight, int8_matmul, qdot, quantize_activations_per_token
from jquant.utils import path_str

DENSE = r"(attn|mlp)/\w+/kernel$"
STATIC = [jquant.Rule(DENSE, W8A8Spec(activations="static"))]
DYNAMIC = [jquant.Rule(DENSE, W8A8Spec(activations="dynamic"))]
BLOCKS = ("layers_0", "layers_1")
SITES = ("attn_norm", "mlp_norm", "mlp/up", "attn/v")


@dataclasses.dataclass(frozen=True)
class _CtxConfig(jquant.models.LlamaConfig):
  max_seq_len: int = 32  # a context limit for the too-long-window test


@pytest.fixture(scope="module")
def toy():
  cfg = _CtxConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
  m = jquant.models.llama_init(cfg, jax.random.key(0))
  # Persistent outlier channels after the norms, as real LLMs have, so smoothing has work to do.
  p = dict(m.params)
  for b in BLOCKS:
    bp = dict(p[b])
    for n in ("attn_norm", "mlp_norm"):
      bp[n] = {"scale": bp[n]["scale"].at[7].multiply(40.0).at[19].multiply(15.0)}
    p[b] = bp
  m = dataclasses.replace(m, params=p)
  calib = jax.random.randint(jax.random.key(1), (6, 32), 0, cfg.vocab_size)
  evalw = jax.random.randint(jax.random.key(2), (4, 32), 0, cfg.vocab_size)
  return m, calib, evalw


@pytest.fixture(scope="module")
def toy_stats(toy):
  """Per-tensor min-max and per-channel max|x| stats of the toy, computed once for the module."""
  m, calib, _ = toy
  static = calibrate(m, m.params, calib, STATIC, batch_size=3, progress=False)
  chan = calibrate(m, m.params, calib, STATIC, observer=O.MinMaxObserver("channel"), batch_size=3,
                   progress=False)
  return static, chan


def _count(jaxpr, names) -> int:
  """Occurrences of primitives named in ``names``, through every sub-jaxpr."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in names
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          n += _count(inner, names)
  return n


def _int8_dots(jaxpr) -> list:
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and all(v.aval.dtype == jnp.int8 for v in eqn.invars):
      out.append(eqn.params["preferred_element_type"])
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += _int8_dots(inner)
  return out


# ---------------------------------------------------------------------------
# The int8 matmul.


@pytest.mark.parametrize("static", [True, False])
def test_int8_matmul_is_bit_exact_against_int32_numpy(static):
  kx, kw = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (3, 5, 96)) * 4.0
  w = jax.random.normal(kw, (96, 40))
  q = jquant.quantize(w, W8A8Spec().weight_spec())
  if static:
    xs = jnp.float32(12.0 / 127.0)
    xq = jquant.ops.quantize_activations_static(x, xs)
  else:
    xq, xs = quantize_activations_per_token(x)
  acc = int8_matmul(xq, q.qvalue)
  assert acc.dtype == jnp.int32
  ref = np.asarray(xq).astype(np.int32) @ np.asarray(q.qvalue).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(acc), ref)
  # qdot through the wrapper runs exactly this product, then scales it.
  y = qdot(x, W8A8Weight(q, xs if static else None))
  want = ref.astype(np.float32) * np.asarray(xs) * np.asarray(q.scale).reshape(-1)
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-7, atol=0)
  # The XLA product is int8 x int8 -> int32 (other backends' kernels are checked in pallas_kernels' tests).
  with jquant.ops.force_xla():
    jaxpr = jax.make_jaxpr(lambda a: qdot(a, W8A8Weight(q, xs if static else None)))(x).jaxpr
  assert _int8_dots(jaxpr) == [jnp.int32]


# ---------------------------------------------------------------------------
# calibrate -> convert -> footprint -> save -> load -> serve.


def test_calibrate_convert_save_load_serve(toy, toy_stats, tmp_path):
  m, calib, evalw = toy
  stats = toy_stats[0]
  assert sorted(stats.keys()) == sorted(f"{b}/{l}/kernel" for b in BLOCKS for l in
                                        ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"))
  # min-max per tensor over all calibration windows equals max|x| of the captured inputs.
  _, xs = jquant.capture.capture_inputs(m.apply, m.params, calib)
  assert float(stats.amax()["layers_0/attn/q/kernel"]) == float(jnp.max(jnp.abs(xs["layers_0/attn/q/kernel"])))
  assert stats.axes["layers_1/mlp/down/kernel"] == (0,)

  qparams = convert(m.params, stats, STATIC)
  k = qparams["layers_0"]["attn"]["q"]["kernel"]
  assert isinstance(k, W8A8Weight) and k.weight.qvalue.dtype == jnp.int8
  assert float(k.act_scale) == pytest.approx(float(stats.amax()["layers_0/attn/q/kernel"]) / 127.0)
  fp, fp_float = jquant.footprint(qparams), jquant.footprint(m.params)
  dense_float = sum(l.nbytes for l in fp_float.leaves if "kernel" in l.path)
  assert fp_float.total_bytes - fp.total_bytes >= 0.7 * dense_float  # int8 kernels: ~1/4 of float

  serve = jax.jit(jquant.quantized(m.apply))
  ref = m.apply(m.params, evalw)
  out = serve(qparams, evalw)
  assert bool(jnp.all(jnp.isfinite(out)))
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 0.5, rel  # loose: the toy has x40 outlier channels by construction (see the SmoothQuant tests)

  # Static and dynamic layers in one tree; load rebuilds the W8A8Weight wrappers with or without a target.
  qparams["layers_1"]["mlp"]["down"]["kernel"] = W8A8Weight(qparams["layers_1"]["mlp"]["down"]["kernel"].weight)
  out = serve(qparams, evalw)
  path = jquant.save(tmp_path / "w8a8", qparams)
  for restored in (jquant.load(path, target=qparams), jquant.load(path)):
    q = restored["layers_0"]["attn"]["q"]["kernel"]
    assert isinstance(q, W8A8Weight) and float(q.act_scale) == float(k.act_scale)
    assert restored["layers_1"]["mlp"]["down"]["kernel"].act_scale is None
    np.testing.assert_array_equal(np.asarray(serve(restored, evalw)), np.asarray(out))


def test_dynamic_needs_no_stats_and_mixes_with_static(toy, toy_stats):
  m, calib, evalw = toy
  mixed = [jquant.Rule(r"mlp/down/kernel$", W8A8Spec(activations="dynamic")), jquant.Rule(r"mlp/down", None)] \
      + STATIC
  q_dyn = convert(m.params, None, DYNAMIC)
  assert q_dyn["layers_1"]["mlp"]["down"]["kernel"].act_scale is None
  q_mix = convert(m.params, toy_stats[0], mixed)
  assert q_mix["layers_0"]["mlp"]["down"]["kernel"].act_scale is None
  assert q_mix["layers_0"]["mlp"]["up"]["kernel"].act_scale is not None
  with pytest.raises(ValueError, match="no activation statistics for static layer"):
    convert(m.params, None, STATIC)


def test_static_scales_are_constants_of_the_serving_function(toy, toy_stats):
  """Static activations are quantized with stored scales: no range reduction per call."""
  m, calib, evalw = toy
  q_static = convert(m.params, toy_stats[0], STATIC)
  q_dyn = convert(m.params, None, DYNAMIC)
  reductions = ("reduce_max", "reduce_min", "argmax", "argmin")

  def serving(params):  # params closed over: they are constants of the compiled function
    with jquant.ops.force_xla():  # the CPU path; one trace instead of one branch per platform
      return jax.make_jaxpr(jax.jit(lambda t: jquant.quantized(m.apply)(params, t)))(evalw).jaxpr

  n_float = _count(serving(m.params), reductions)  # softmax's max only
  assert _count(serving(q_static), reductions) == n_float
  assert _count(serving(q_dyn), reductions) == n_float + 14  # one per-token max per Dense input
  assert len(_int8_dots(serving(q_static))) == 14
  # A single static qdot has no range reduction, and its scale is a literal constant in the HLO; its only
  # reduction is the per-row finiteness test that turns a row holding NaN/inf into a NaN output row.
  wq = q_static["layers_0"]["attn"]["q"]["kernel"]
  x = jax.random.normal(jax.random.key(4), (2, 8, 64))
  with jquant.ops.force_xla():
    one = jax.make_jaxpr(lambda a: qdot(a, wq))(x).jaxpr
    hlo = jax.jit(lambda a: qdot(a, wq)).lower(x).as_text()
  assert _count(one, reductions + ("reduce_sum",)) == 0
  assert [e.primitive.name for e in one.eqns if e.primitive.name.startswith("reduce")] == ["reduce_and"]
  assert "constant" in hlo


# ---------------------------------------------------------------------------
# SmoothQuant.


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothquant_leaves_float_outputs_unchanged(toy, toy_stats, alpha):
  m, calib, evalw = toy
  amax = toy_stats[1].amax()
  smoothed, factors = sq.smooth(m, m.params, calib, amax, alpha)   # all four folds per block, derived
  assert sorted(factors) == sorted(f"{b}/{s}" for b in BLOCKS for s in SITES)
  ref, out = m.apply(m.params, evalw), m.apply(smoothed, evalw)
  # Each fold adds at most one rounding (2^-24 relative) to every scaled weight; 2 blocks x 4 folds
  # propagate a few hundred ulp at most.
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=512 * 2**-24 * float(jnp.max(jnp.abs(ref))))


def test_smoothquant_reduces_static_w8a8_error(toy, toy_stats):
  m, calib, evalw = toy
  cstats = toy_stats[1]
  ref = m.apply(m.params, evalw)

  def static_error(params, stats):
    return float(jnp.linalg.norm(jquant.quantized(m.apply)(convert(params, stats, STATIC), evalw) - ref))

  alphas = sq.search_alpha(m, m.params, calib, cstats.amax(), alphas=(0.0, 0.5, 0.8), progress=False)
  assert set(alphas) == {f"{b}/{s}" for b in BLOCKS for s in SITES}
  smoothed, _ = sq.smooth(m, m.params, calib, cstats.amax(), alphas)
  # The outlier channels (x40, x15 after both norms) dominate the per-tensor range without smoothing.
  smoothed_stats = calibrate(m, smoothed, calib, STATIC, batch_size=3, progress=False)
  assert static_error(smoothed, smoothed_stats) < 0.6 * static_error(m.params, toy_stats[0])


# ---------------------------------------------------------------------------
# Errors.


def test_calibrate_errors_are_clear(toy):
  m, calib, _ = toy
  with pytest.raises(ValueError, match="calibration data is empty"):
    calibrate(m, m.params, np.zeros((0, 16), np.int32), STATIC)
  with pytest.raises(ValueError, match=r"length 40, longer than the model's context \(32 tokens\)"):
    calibrate(m, m.params, np.zeros((2, 40), np.int32), STATIC)
  with pytest.raises(ValueError, match=r"select no matmul weight; the model's matmul weights are \['embed/embedding', "
                     r"'layers_0/attn/k/kernel'"):
    calibrate(m, m.params, calib, [jquant.Rule(r"nothing", W8A8Spec())], progress=False)
  with pytest.raises(ValueError, match="batch_size=0"):
    calibrate(m, m.params, calib, STATIC, batch_size=0)
  with pytest.raises(ValueError, match="skip_positions=-1"):
    calibrate(m, m.params, calib, STATIC, skip_positions=-1)
  with pytest.raises(ValueError, match=r"skip_positions=40 needs inputs .* more than 40 positions"):
    calibrate(m, m.params, calib, STATIC, skip_positions=40, progress=False)
  with pytest.raises(graph.GraphError, match="matches no parameter path"):
    calibrate(m, m.params, calib, STATIC, blocks=r"decoder_\d+", progress=False)
  with pytest.raises(TypeError, match="rules must be jquant.Rule"):
    calibrate(m, m.params, calib, [(DENSE, W8A8Spec())])
  with pytest.raises(ValueError, match="activations='weekly'"):
    W8A8Spec(activations="weekly")
  with pytest.raises(ValueError, match="bits=4"):
    W8A8Spec(bits=4)


def test_uneven_last_batch(toy, toy_stats):
  """6 windows in batches of 4 and 2 (a second traced program for the short batch) give the one-batch stats."""
  m, calib, _ = toy
  chan = toy_stats[1]                                     # batches of 3
  uneven = calibrate(m, m.params, calib, STATIC, observer=O.MinMaxObserver("channel"), batch_size=4,
                     progress=False)
  assert sorted(uneven.keys()) == sorted(chan.keys())
  for k in chan.keys():                                   # same activations up to the matmul blocking of XLA
    np.testing.assert_allclose(np.asarray(uneven.amax()[k]), np.asarray(chan.amax()[k]), rtol=8 * 2**-24)


def test_stats_merge_and_reinterpret(toy, toy_stats):
  """Stats of two calibration halves merge to the stats of all windows; one histogram serves many observers."""
  m, calib, _ = toy
  obs = O.PercentileObserver(percentile=99.0)
  whole = calibrate(m, m.params, calib, STATIC, observer=obs, batch_size=3, progress=False)
  a = calibrate(m, m.params, calib[:3], STATIC, observer=obs, batch_size=3, progress=False)
  b = calibrate(m, m.params, calib[3:], STATIC, observer=obs, batch_size=3, progress=False)
  merged = a.merge(b)
  for k in whole.keys():
    np.testing.assert_array_equal(np.asarray(merged[k].counts), np.asarray(whole[k].counts))
  mm = whole.with_observer(O.PercentileObserver(percentile=100.0)).amax()
  exact = toy_stats[0].amax()
  for k in exact:
    assert float(mm[k]) == float(exact[k])
  assert isinstance(jax.tree.map(lambda x: x, whole), ActivationStats)
  with pytest.raises(ValueError, match="same state type"):
    whole.with_observer(O.MinMaxObserver())


# ---------------------------------------------------------------------------
# Models users write with Flax's own layers (tests/w8a8_qat_models.py).


def _np_to_matrix(w, k_axes):
  free = [a for a in range(w.ndim) if a not in k_axes]
  return np.transpose(w, list(k_axes) + free).reshape(int(np.prod([w.shape[a] for a in k_axes])), -1)


def _np_quantize(x, act_scale):
  """The documented int8 arithmetic in NumPy float32 (per token when act_scale is None)."""
  x = np.asarray(x, np.float32)
  if act_scale is None:
    amax = np.max(np.abs(x), axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax * np.float32(1 / 127), np.float32(1)).astype(np.float32)
  else:
    scale = np.float32(act_scale)
  return np.clip(np.round(x * (np.float32(1) / scale)), -127, 127).astype(np.int64)


def _leaf(tree, path):
  """The leaf at a ``/``-joined path of a Linen dict or an NNX state."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, W8A8Weight))[0]
  return {path_str(kp): leaf for kp, leaf in leaves}[path]


@pytest.mark.parametrize("name", M.NAMES)
def test_user_model_w8a8_int32_accumulators_match_numpy_int64(name, monkeypatch):
  """Static (calibrated) and dynamic W8A8 through jquant.quantized: every int32 accumulator equals NumPy's int64
  product of the quantized activations (documented arithmetic) and the int8 weight codes."""
  model, apply, params, toks = M.make(name)
  blocks = [M.block_prefix(name, i) for i in range(2)]
  want_paths = sorted([f"{b}/{k}" for b in blocks for k in M.block_kernels(name)] + ["head/kernel"])
  axes = capture.contraction_axes(apply, params, toks)
  if name.endswith("general"):
    assert {p: axes[p] for p in want_paths} == {**{f"{b}/{k}": a for b in blocks for k, a in M.GENERAL_AXES.items()},
                                                 "head/kernel": (0,)}
  rules = [jquant.Rule(r"kernel$", W8A8Spec(activations="static"))]
  stats = calibrate(model, None if name.startswith("nnx") else params, toks, rules, batch_size=2, progress=False)
  assert sorted(stats.keys()) == want_paths                       # every block layer and the head (suffix)
  assert all(stats.axes[p] == axes[p] for p in want_paths)
  # min-max over the calibration batches is max|x| of each float layer input (the block-by-block jitted run
  # and this eager one may fuse differently: a few float32 ulps apart).
  _, xs = capture.capture_inputs(apply, params, toks)
  for p in want_paths:
    np.testing.assert_allclose(float(stats.amax()[p]), float(jnp.max(jnp.abs(xs[p]))), rtol=8 * 2**-24, err_msg=p)
  dynamic = [jquant.Rule(r"kernel$", W8A8Spec(activations="dynamic"))]
  order = [p for p in axes if p in want_paths]                    # the model's matmuls in execution order
  for qparams in (convert(params, stats, rules), convert(params, None, dynamic, axes=axes)):
    # The serving function, jitted, with its int8 activations and int32 accumulators as extra outputs.
    calls = []
    orig_mm, orig_qi = ops.int8_matmul, W8A8Weight.quantize_input
    monkeypatch.setattr(ops, "int8_matmul", lambda a, b: calls.append(orig_mm(a, b)) or calls[-1])
    monkeypatch.setattr(W8A8Weight, "quantize_input", lambda w, x: calls.append(x) or orig_qi(w, x))

    def serve(q, t):
      calls.clear()
      with ops.force_xla():
        out = jquant.quantized(apply)(q, t)
      return out, list(calls)

    out, seen = jax.jit(serve)(qparams, toks)
    monkeypatch.undo()
    assert len(seen) == 2 * len(order)
    for p, x, acc in zip(order, seen[0::2], seen[1::2]):
      leaf = _leaf(qparams, p)
      assert isinstance(leaf, W8A8Weight) and leaf.weight.qvalue.dtype == jnp.int8
      k_codes = _np_to_matrix(np.asarray(leaf.weight.codes()), axes[p])   # (K, N) from the logical layout
      x = np.asarray(x).reshape(-1, k_codes.shape[0])
      xq_ref = _np_quantize(x, None if leaf.act_scale is None else np.asarray(leaf.act_scale))
      np.testing.assert_array_equal(np.asarray(acc).reshape(-1, k_codes.shape[1]).astype(np.int64),
                                    xq_ref @ k_codes.astype(np.int64), err_msg=p)
    # The first block's first layer reads the float model's activation: its input is the float one.
    np.testing.assert_allclose(np.asarray(seen[0]).reshape(-1), np.asarray(xs[order[0]]).reshape(-1),
                               rtol=8 * 2**-24, atol=1e-6)
    ref = apply(params, toks)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.1


def test_user_model_without_blocks_and_linen_variables_dict():
  """One nn.Dense (no repeated blocks): calibrated as one piece; a {'params': ...} dict is accepted."""
  model = nn.Dense(8)
  x = jax.random.normal(jax.random.key(0), (6, 5, 16)).at[..., 3].multiply(9.0)
  params = model.init(jax.random.key(1), x)["params"]
  rules = [jquant.Rule(r"kernel$", W8A8Spec())]
  stats = calibrate(model, {"params": params}, x, rules, batch_size=4, progress=False)
  assert list(stats.keys()) == ["kernel"] and stats.axes == {"kernel": (0,)}
  assert float(stats.amax()["kernel"]) == float(jnp.max(jnp.abs(x)))
  q = convert({"params": params}, stats, rules)["params"]
  y = jax.jit(jquant.quantized(model.apply))({"params": q}, x)
  ref = model.apply({"params": params}, x)
  assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 0.05   # one step is max|x| / 127, 9x outliers
  # A batch list of any pytree works too: here (x,) tuples of different lengths.
  stats2 = calibrate(model, params, [(x[:4],), (x[4:, :2],)], rules, progress=False)
  assert float(stats2.amax()["kernel"]) == float(jnp.max(jnp.abs(jnp.concatenate([x[:4].reshape(-1, 16),
                                                                                  x[4:, :2].reshape(-1, 16)]))))


def test_convert_nd_kernels_need_axes():
  model, apply, params, toks = M.make("linen_general")
  dynamic = [jquant.Rule(r"kernel$", W8A8Spec(activations="dynamic"))]
  with pytest.raises(ValueError, match=r"'layers_0/gate_up/kernel' has shape \(2, 32, 48\) and no known contraction "
                     r"axes.*axes=jquant.capture.contraction_axes"):
    convert(params, None, dynamic)
  q = convert(params, None, dynamic, axes=capture.contraction_axes(apply, params, toks))
  o = q["layers_0"]["o"]["kernel"].weight
  assert o.shape == (4, 8, 32) and o.qvalue.shape == (32, 32) and o.scale.shape == (1, 32)  # one scale per output
  qk = q["layers_0"]["q"]["kernel"].weight                      # Gemma-style (heads, d, head_dim) over d
  assert qk.scale.shape == (4, 1, 8)


class _SqrtBlock(nn.Module):
  """``x + down(sqrt(up(x)))``: finite weights and inputs, NaN activations where ``up(x) < 0``."""

  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(x.shape[-1], name="down")(jnp.sqrt(nn.Dense(16, name="up")(x)))


class _SqrtNet(nn.Module):
  n_layers: int = 2

  @nn.compact
  def __call__(self, x):
    for i in range(self.n_layers):
      x = _SqrtBlock(name=f"layers_{i}")(x)
    return x


@pytest.mark.parametrize("n_layers", [2, 1])  # block by block, and the whole model as one piece
def test_calibrate_rejects_non_finite_activations_naming_the_layers(n_layers):
  """Observers drop NaN (min-max amax reads it as 0): calibrate counts them on device and refuses them."""
  net = _SqrtNet(n_layers)
  x = jax.random.normal(jax.random.key(0), (4, 8, 16))
  params = net.init(jax.random.key(1), x)["params"]
  rules = [jquant.Rule(r"kernel$", W8A8Spec())]
  with pytest.raises(ValueError, match=r"calibrate: the calibration activations hold non-finite values \(NaN or "
                                       r"inf\) at the inputs of layers_0/down/kernel \(\d+ values\)"):
    calibrate(net, params, x, rules, batch_size=2, progress=False)
  with pytest.raises(ValueError, match=r"calibrate: the calibration inputs hold non-finite .* at calib \(1 value\)"):
    calibrate(net, params, x.at[0, 1, 2].set(jnp.nan), rules, progress=False)


def test_calibrate_and_convert_name_non_finite_weights(toy, toy_stats):
  m, calib, _ = toy
  p = jax.tree_util.tree_map(lambda a: a, m.params)
  p["layers_1"]["mlp"]["down"]["kernel"] = p["layers_1"]["mlp"]["down"]["kernel"].at[0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match=r"calibrate: params hold non-finite .* at layers_1/mlp/down/kernel \(1 value\)"):
    calibrate(m, p, calib, STATIC, progress=False)
  with pytest.raises(ValueError, match=r"convert: leaf 'layers_1/mlp/down/kernel'.*non-finite"):
    convert(p, toy_stats[0], STATIC)
