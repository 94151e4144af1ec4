"""Weight-only matmul for TPU (Pallas Mosaic), reading the packed payload.

Grid ``(M/bm, N/bn, K/bk)`` with a float32 VMEM accumulator. Each step loads
a ``bk/2 x bn`` (INT4) or ``bk x bn`` (bytes) tile, unpacks it with 32-bit
integer ops (Mosaic has no 8-bit vector shifts), dequantizes per group and
feeds the MXU:

* INT4: the low nibbles are rows 2j of the logical tile and the high nibbles
  rows 2j+1, so the product is ``x_even @ lo + x_odd @ hi`` where XLA splits
  the activations into even and odd columns before the call (cheap for the
  small M of decoding).
* Per-group scales arrive reshaped to ``(K/bk, bk/group, N)`` so that each
  step sees exactly its groups; per-channel scales are applied once at the end.

Example:
    >>> from pallas_kernels.w4a16 import tpu
    >>> y = tpu.weight_only_matmul(x, packed, scale, None, layout, interpret=True)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import KernelUnsupported, is_static, pad2, pad_axis, round_up, tpu_generation
from pallas_kernels.w4a16 import blocks as blocks_lib
from pallas_kernels.w4a16.reference import WeightLayout


# Scoped VMEM we allow a call (physical: v4 32 MiB, v5e/v6e 128 MiB, v5p 95 MiB, v7 64 MiB).
_VMEM_LIMIT = {"v2": 12 << 20, "v3": 12 << 20, "v4": 24 << 20, "v5e": 64 << 20, "v5p": 64 << 20,
               "v6e": 64 << 20, "v7": 48 << 20}


def _kernel(*refs, bits: int, grouped: bool, has_zero: bool, offset: int, gs: int, nk: int):
  it = iter(refs)
  if bits == 4:
    xe_ref, xo_ref = next(it), next(it)
  else:
    x_ref = next(it)
  w_ref, s_ref = next(it), next(it)
  z_ref = next(it) if has_zero else None
  o_ref, acc_ref = next(it), next(it)
  k = pl.program_id(2)
  dtype = (xe_ref if bits == 4 else x_ref).dtype

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  w = w_ref[...].astype(jnp.int32)
  planes = [w & 0xF, w >> 4] if bits == 4 else [w]
  rows, bn = planes[0].shape

  def dequant(c):
    c = c.astype(jnp.float32)
    if grouped:
      s = s_ref[...].astype(jnp.float32)  # (groups in this step, bn)
      ng = s.shape[0]
      c = c.reshape(ng, rows // ng, bn)
      z = offset if z_ref is None else z_ref[...].astype(jnp.float32)[:, None, :]
      c = ((c - z) * s[:, None, :]).reshape(rows, bn)
    else:
      z = offset if z_ref is None else z_ref[...].astype(jnp.float32)
      c = c - z
    return c.astype(dtype)

  if bits == 4:
    part = (jnp.dot(xe_ref[...], dequant(planes[0]), preferred_element_type=jnp.float32)
            + jnp.dot(xo_ref[...], dequant(planes[1]), preferred_element_type=jnp.float32))
  else:
    part = jnp.dot(x_ref[...], dequant(planes[0]), preferred_element_type=jnp.float32)
  acc_ref[...] += part

  @pl.when(k == nk - 1)
  def _():
    acc = acc_ref[...]
    if not grouped:
      acc = acc * s_ref[...].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def plan(m: int, n: int, layout: WeightLayout, blocks: blocks_lib.WOBlocks | None = None,
         generation: str | None = None):
  """Final (bm, bn, bk) for a problem; raises `KernelUnsupported` where Mosaic cannot tile it."""
  b = blocks or blocks_lib.table_entry("tpu", generation or tpu_generation(), m)
  grouped = layout.num_groups > 1
  gs = layout.group_size
  # Per-group reshape of a (rows, bn) float32 tile needs whole sublane tiles per group.
  rows_per_group = gs // 2 if layout.bits == 4 else gs
  if grouped and (gs % (2 if layout.bits == 4 else 1) or rows_per_group % 8):
    raise KernelUnsupported(f"group_size={gs}: the TPU kernel needs groups of a multiple of "
                            f"{16 if layout.bits == 4 else 8} rows")
  k = layout.k
  unit = 256 if layout.bits == 4 else 128  # bk/2 (or bk) must fill whole lanes of x
  step = math.lcm(unit, gs) if grouped else unit
  kfull = round_up(k, math.lcm(2, gs) if grouped else 2)
  if kfull <= max(b.bk, step):
    bk = kfull  # one step: whole-dimension blocks are always legal
  else:
    bk = max(step, (b.bk // step) * step)
  bm = min(b.bm, round_up(m, 16)) if is_static(m) else b.bm  # symbolic M: fixed rows, padded
  if n % 128 == 0:
    bn = min(b.bn, n)
    while n % bn:
      bn -= 128
  elif n <= 2 * b.bn:
    bn = n  # whole dimension
  else:
    bn = b.bn
  return dataclasses.replace(b, bm=bm, bn=bn, bk=bk)


def weight_only_matmul(x, packed, scale, zero_point, layout: WeightLayout, out_dtype=None, *,
                       interpret=False, blocks: blocks_lib.WOBlocks | None = None,
                       generation: str | None = None):
  """``x (M, K) @ W`` on the MXU with ``W`` held packed (see `reference` for the layout).

  Args:
    x: (M, K) bfloat16 or float32 activations.
    packed: (ceil(K/2), N) uint8 for INT4; (K, N) uint8/int8 for 5..8 bits.
    scale: (G, N) float scales (G = 1: per channel).
    zero_point: (G, N) uint8 zero points, or None (symmetric).
    layout: The `WeightLayout`.
    out_dtype: Output dtype (default ``x.dtype``).
    interpret: Run in the TPU interpreter (True or a ``pltpu.InterpretParams``).
    blocks: Override the block table.
    generation: TPU generation to build for (default `tpu_generation()`).
  """
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  m, k = x.shape
  n = packed.shape[1]
  if k != layout.k:
    raise ValueError(f"weight_only_matmul: x has K={k}, the layout says k={layout.k}.")
  b = plan(m, n, layout, blocks, generation)
  grouped = layout.num_groups > 1
  gs = layout.group_size
  mp, np_, kp = round_up(m, b.bm), round_up(n, b.bn), round_up(k, b.bk)
  nk = kp // b.bk
  s = jnp.broadcast_to(scale, (scale.shape[0], n))
  z = None if zero_point is None else jnp.broadcast_to(zero_point, (zero_point.shape[0], n))
  xp = pad2(x, mp, kp)
  if layout.bits == 4:
    args = [xp[:, 0::2], xp[:, 1::2], pad2(packed, kp // 2, np_)]
    in_specs = [pl.BlockSpec((b.bm, b.bk // 2), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((b.bm, b.bk // 2), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((b.bk // 2, b.bn), lambda i, j, kk: (kk, j))]
  else:
    args = [xp, pad2(packed, kp, np_)]
    in_specs = [pl.BlockSpec((b.bm, b.bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((b.bk, b.bn), lambda i, j, kk: (kk, j))]
  if grouped:
    per_step = b.bk // gs
    s3 = pad2(s.astype(jnp.float32), nk * per_step, np_).reshape(nk, per_step, np_)
    args.append(s3)
    in_specs.append(pl.BlockSpec((None, per_step, b.bn), lambda i, j, kk: (kk, 0, j)))
    if z is not None:
      args.append(pad2(z.astype(jnp.float32), nk * per_step, np_).reshape(nk, per_step, np_))
      in_specs.append(pl.BlockSpec((None, per_step, b.bn), lambda i, j, kk: (kk, 0, j)))
  else:
    args.append(pad_axis(s.astype(jnp.float32), 1, np_))
    in_specs.append(pl.BlockSpec((1, b.bn), lambda i, j, kk: (0, j)))
    if z is not None:
      args.append(pad_axis(z.astype(jnp.float32), 1, np_))
      in_specs.append(pl.BlockSpec((1, b.bn), lambda i, j, kk: (0, j)))
  kern = functools.partial(_kernel, bits=layout.bits, grouped=grouped, has_zero=z is not None,
                           offset=int(layout.offset), gs=gs, nk=nk)
  out = pl.pallas_call(
      kern,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // b.bm, np_ // b.bn, nk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((b.bm, b.bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((b.bm, b.bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=_VMEM_LIMIT.get(generation or tpu_generation(), 24 << 20)),
      interpret=pltpu.InterpretParams() if interpret is True else interpret,
      name=f"jquant_w{layout.bits}a16_tpu",
  )(*args)
  return out[:m, :n]
