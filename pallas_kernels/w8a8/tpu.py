"""W8A8 matmul for TPU (Pallas Mosaic): int8 MXU, int32 accumulator in VMEM.

Grid ``(M/bm, N/bn, K/bk)``; the last axis walks the contraction and
accumulates into a VMEM scratch; the last step applies the per-token and
per-channel scales (or stores the raw int32 sums). TPU v4 and older have no
int8 matmul in Mosaic: the block table marks them and the call raises
`KernelUnsupported` (the dispatcher then takes XLA).

Example:
    >>> from pallas_kernels.w8a8 import tpu
    >>> y = tpu.w8a8_matmul(xq, xs, wq, ws, interpret=True)   # doctest: +SKIP
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import KernelUnsupported, NoBlocks, pad2, round_up, tpu_generation
from pallas_kernels.w8a8 import blocks as blocks_lib


def _kernel(*refs, nk: int, scaled: bool):
  if scaled:
    x_ref, w_ref, xs_ref, ws_ref, o_ref, acc_ref = refs
  else:
    x_ref, w_ref, o_ref, acc_ref = refs
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.int32)

  @pl.when(k == nk - 1)
  def _():
    acc = acc_ref[...]
    if scaled:
      y = acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]
      o_ref[...] = y.astype(o_ref.dtype)
    else:
      o_ref[...] = acc


def _interpret_arg(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


def w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.bfloat16, *, interpret=False,
                blocks: blocks_lib.W8A8Blocks | None = None, generation: str | None = None):
  """int8 (M,K) x int8 (K,N) on the MXU, scales applied in the epilogue.

  Args:
    x_q: int8 (M, K).
    x_scale: float (M, 1) per-token scales, or None (with ``w_scale`` None: int32 out).
    w_q: int8 (K, N).
    w_scale: float (1, N) per-channel scales, or None.
    out_dtype: float output dtype when scaled.
    interpret: Run in the TPU interpreter (True or a ``pltpu.InterpretParams``).
    blocks: Override the block table.
    generation: TPU generation to build for (default: `tpu_generation()`).

  Raises:
    KernelUnsupported: the generation has no int8 MXU path.
  """
  gen = generation or tpu_generation()
  m, k = x_q.shape
  k2, n = w_q.shape
  if k != k2:
    raise ValueError(f"w8a8_matmul: x_q is {x_q.shape} and w_q is {w_q.shape}; contraction sizes differ.")
  if x_q.dtype != jnp.int8 or w_q.dtype != jnp.int8:
    raise ValueError(f"w8a8_matmul: x_q and w_q must be int8, got {x_q.dtype} and {w_q.dtype}.")
  b = blocks_lib.pick("tpu", m, k, n, gen, blocks)
  if isinstance(b, NoBlocks):
    raise KernelUnsupported(f"w8a8_matmul (TPU {gen}): {b.reason}; use backend='xla'.")
  scaled = x_scale is not None or w_scale is not None
  mp, np_, kp = round_up(m, b.bm), round_up(n, b.bn), round_up(k, b.bk)
  xp = pad2(x_q, mp, kp)
  wp = pad2(w_q, kp, np_)
  nk = kp // b.bk
  grid = (mp // b.bm, np_ // b.bn, nk)
  in_specs = [pl.BlockSpec((b.bm, b.bk), lambda i, j, kk: (i, kk)),
              pl.BlockSpec((b.bk, b.bn), lambda i, j, kk: (kk, j))]
  args = [xp, wp]
  if scaled:
    xs = jnp.ones((m, 1), jnp.float32) if x_scale is None else jnp.broadcast_to(
        x_scale.astype(jnp.float32).reshape(-1, 1), (m, 1))
    ws = jnp.ones((1, n), jnp.float32) if w_scale is None else jnp.broadcast_to(
        w_scale.astype(jnp.float32).reshape(1, -1), (1, n))
    args += [pad2(xs, mp, 1), pad2(ws, 1, np_)]
    in_specs += [pl.BlockSpec((b.bm, 1), lambda i, j, kk: (i, 0)),
                 pl.BlockSpec((1, b.bn), lambda i, j, kk: (0, j))]
  out_t = jnp.dtype(out_dtype) if scaled else jnp.dtype(jnp.int32)
  out = pl.pallas_call(
      functools.partial(_kernel, nk=nk, scaled=scaled),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_t),
      grid=grid,
      in_specs=in_specs,
      out_specs=pl.BlockSpec((b.bm, b.bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((b.bm, b.bn), jnp.int32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret_arg(interpret),
      name="jquant_w8a8_tpu",
  )(*args)
  return out[:m, :n]
