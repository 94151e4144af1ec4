"""Weight-only matmul for NVIDIA GPUs (Pallas Triton), reading the packed payload.

Each program owns a ``bm x bn`` output tile and walks K inside the kernel.
Per sub-step of ``sk`` rows (at most one quantization group) it loads the
packed bytes once (Triton pipelines these loads ``num_stages`` deep) and forms

* INT4: ``lo = byte & 0xF`` (logical rows 2j) and ``hi = byte >> 4`` (rows
  2j+1); ``x_even @ lo + x_odd @ hi`` needs no re-interleaving of the
  weights (``x_mode`` says how the even/odd activation columns are read);
* 5..8 bits: one code per byte.

Codes enter the tensor cores as exact small integers ``code - zero``; the
group scale multiplies the ``bm x bn`` partial product, not every weight:
``acc += s_g * (x_g @ (c_g - z_g))``. With ``fast_convert`` (bf16
activations) a nibble becomes the bf16 number ``128 + nibble`` by an OR with
``0x4300`` and one packed bf16 subtraction of ``128 + z`` (integer-to-float
conversions run at a quarter of the ALU rate on Hopper). With ``asm_unpack``
(symmetric INT4, bf16) one inline-PTX block turns 4 packed bytes into 8 bf16
weights with 13 instructions (two ``prmt`` byte spreads, ``lop3`` mask-and-OR
per bf16 pair, one ``fma.bf16x2`` subtracting ``128 + offset`` per pair).

Small M leaves few output tiles (``N / bn``), so ``split_k`` programs share
one tile along K and write fp32 partial sums that XLA adds afterwards: more
programs in flight hide the HBM latency that one long K loop per SM cannot.

Example:
    >>> from pallas_kernels.w4a16 import gpu
    >>> y = gpu.weight_only_matmul(x, packed, scale, None, layout, interpret=True)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import KernelUnsupported, gpu_arch, is_pow2, is_static, pad2, round_up
from pallas_kernels.w4a16 import blocks as blocks_lib
from pallas_kernels.w4a16.reference import WeightLayout

X_MODES = ("split", "strided", "pre", "join")
_MAGIC = 0x4300  # bf16 bit pattern of 128.0; OR-ing a nibble n gives 128 + n


def _pow2_at_least(n: int, lo: int) -> int:
  p = lo
  while p < n:
    p *= 2
  return p


def _bf16_bits(v: float) -> int:
  return int(np.array(v, np.float32).view(np.uint32)) >> 16


def _asm_unpack_int4(w, offset: int):
  """Packed bytes (r, bn) uint8 -> bf16 ``(lo - 128 - offset, hi - 128 - offset)`` via inline PTX.

  Four bytes share one 32-bit register (``pack=4``); ``prmt`` spreads bytes
  0,1 (2,3) into the two 16-bit halves of a word, ``lop3`` computes
  ``(word & 0x000F000F) | 0x43004300`` (two bf16 ``128 + nibble``) and one
  ``fma.rn.bf16x2`` (``x * 1 - (128 + offset)``, exact) removes the offset.
  The high nibbles take the same path on the word shifted right by 4.
  (One asm block per plane: Pallas lowers single-result inline asm only.)
  """
  nz = _bf16_bits(-(128.0 + offset))
  nz2 = (nz << 16) | nz

  def plane(shift: bool):
    src = "sh" if shift else "$2"
    asm = f"""{{
  .reg .b32 sh, t0, t1, zr, one, nz;
  mov.b32 zr, 0;
  mov.b32 one, 0x3F803F80;
  mov.b32 nz, 0x{nz2:08X};
  {"shr.u32 sh, $2, 4;" if shift else ""}
  prmt.b32 t0, {src}, zr, 0x4140;
  prmt.b32 t1, {src}, zr, 0x4342;
  lop3.b32 t0, t0, 0x000F000F, 0x43004300, 0xEA;
  lop3.b32 t1, t1, 0x000F000F, 0x43004300, 0xEA;
  fma.rn.bf16x2 $0, t0, one, nz;
  fma.rn.bf16x2 $1, t1, one, nz;
}}"""
    [out] = plgpu.elementwise_inline_asm(asm, args=[w], constraints="=r,=r,r", pack=4,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.bfloat16)])
    return out

  return plane(False), plane(True)


def _dequant_codes(w, bits: int, dtype, fast: bool, zero, asm: bool = False):
  """Packed bytes (r, bn) -> exact ``code - zero`` in ``dtype``: (lo, hi) for INT4, (codes,) otherwise.

  ``zero`` is a Python number (symmetric offset) or a (1, bn) int32 row.
  """
  if bits == 4 and fast and asm and isinstance(zero, int):
    return _asm_unpack_int4(w, zero)
  if bits == 4 and fast:
    # 0x4300 | n is bf16 128 + n; subtracting 128 + zero in bf16 is exact.
    w16 = w.astype(jnp.int16)
    lo = jax.lax.bitcast_convert_type((w16 & 0xF) | _MAGIC, jnp.bfloat16)
    hi = jax.lax.bitcast_convert_type((w16 >> 4) | _MAGIC, jnp.bfloat16)
    z = (zero + 128).astype(jnp.bfloat16) if not isinstance(zero, (int, float)) else jnp.bfloat16(zero + 128)
    return lo - z, hi - z
  w32 = w.astype(jnp.int32)
  if bits == 4:
    return ((w32 & 0xF) - zero).astype(dtype), ((w32 >> 4) - zero).astype(dtype)
  return ((w32 - zero).astype(dtype),)


def _even_odd(x_ref, k0, h0, sk: int, x_mode: str):
  """Activation columns k0, k0+2, ... and k0+1, k0+3, ... of a sub-step (h0 = k0 / 2)."""
  if x_mode == "pre":  # (2, bm, K/2): split by XLA before the call
    return x_ref[0, :, pl.ds(h0, sk // 2)], x_ref[1, :, pl.ds(h0, sk // 2)]
  if x_mode == "split":  # one contiguous load, split in registers
    xv = x_ref[:, pl.ds(k0, sk)]
    bm = xv.shape[0]
    xe, xo = jnp.split(xv.reshape(bm, sk // 2, 2), 2, axis=-1)
    return xe.reshape(bm, sk // 2), xo.reshape(bm, sk // 2)
  return x_ref[:, pl.ds(k0, sk // 2, stride=2)], x_ref[:, pl.ds(k0 + 1, sk // 2, stride=2)]


def _kernel(*refs, bits: int, nk: int, bk: int, sk: int, gs: int, grouped: bool, has_zero: bool,
            offset: int, fast: bool, k_split: int, x_mode: str, asm: bool = False):
  if has_zero:
    x_ref, w_ref, s_ref, z_ref, o_ref = refs
  else:
    x_ref, w_ref, s_ref, o_ref = refs
    z_ref = None
  bm = x_ref.shape[-2]
  bn = o_ref.shape[-1]
  dtype = x_ref.dtype
  k_base = pl.program_id(2) * k_split  # first K row of this split

  def zero_row(g):
    if z_ref is None:
      return offset
    return z_ref[pl.ds(g, 1), :].astype(jnp.int32)

  def step(kk, j, acc):
    # Offsets carry their alignment so that Triton emits wide, pipelined copies.
    k0 = pl.multiple_of(kk * bk + j * sk, sk)
    g = (k_base + k0) // gs if grouped else 0
    z = zero_row(g)
    if bits == 4:
      h0 = pl.multiple_of(kk * (bk // 2) + j * (sk // 2), sk // 2)
      w = w_ref[pl.ds(h0, sk // 2), :]
      lo, hi = _dequant_codes(w, bits, dtype, fast, z, asm)
      if x_mode == "join":
        # Rows 2j and 2j+1 of the tile come from the same byte: interleave them
        # back in registers and multiply with contiguous activations.
        wf = jnp.transpose(jnp.stack([lo, hi], axis=-1), (0, 2, 1)).reshape(sk, bn)
        d = jnp.dot(x_ref[:, pl.ds(k0, sk)], wf, preferred_element_type=jnp.float32)
      else:
        xe, xo = _even_odd(x_ref, k0, h0, sk, x_mode)
        d = (jnp.dot(xe, lo, preferred_element_type=jnp.float32)
             + jnp.dot(xo, hi, preferred_element_type=jnp.float32))
    else:
      (c,) = _dequant_codes(w_ref[pl.ds(k0, sk), :], bits, dtype, False, z)
      d = jnp.dot(x_ref[:, pl.ds(k0, sk)], c, preferred_element_type=jnp.float32)
    if grouped:
      return acc + s_ref[pl.ds(g, 1), :].astype(jnp.float32) * d
    return acc + d

  def body(kk, acc):
    for j in range(bk // sk):
      acc = step(kk, j, acc)
    return acc

  acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
  if not grouped:
    acc = acc * s_ref[...].astype(jnp.float32)
  o_ref[...] = acc.astype(o_ref.dtype)


def plan(m: int, n: int, layout: WeightLayout, x_dtype, blocks: blocks_lib.WOBlocks | None = None,
         arch: str | None = None):
  """Final blocks for a problem (raises `KernelUnsupported` when the kernel cannot take it)."""
  if not is_static(m):
    raise KernelUnsupported("symbolic M: Pallas Triton has no dynamic grid bounds")
  b = blocks or blocks_lib.table_entry("gpu", arch or gpu_arch(), m)
  grouped = layout.num_groups > 1
  min_sk = 32 if layout.bits == 4 else 16  # dot K >= 16 on each half
  if grouped:
    if not is_pow2(layout.group_size) or layout.group_size < min_sk:
      raise KernelUnsupported(f"group_size={layout.group_size}: the GPU kernel needs a power of two "
                              f">= {min_sk}")
    sk = min(layout.group_size, b.sk)
  else:
    sk = b.sk
    while sk > min_sk and layout.k % sk:  # a step dividing K avoids padding the weights
      sk //= 2
  if not (is_pow2(b.bm) and is_pow2(b.bn) and is_pow2(b.bk) and is_pow2(sk)):
    raise ValueError(f"GPU weight-only blocks must be powers of two, got {b}.")
  sk = max(min_sk, min(sk, _pow2_at_least(layout.k, min_sk)))
  # Largest power-of-two step (a multiple of sk, at most b.bk) dividing K rounded up to sk: the
  # weights are then not padded (SmolLM2's K = 576 runs as 9 steps of 64, not 1024 rows).
  k_sk = round_up(layout.k, sk)
  bk = sk
  while bk * 2 <= b.bk and k_sk % (bk * 2) == 0:
    bk *= 2
  if b.split_k < 1:
    raise ValueError(f"WOBlocks.split_k={b.split_k}; allowed: integers >= 1.")
  # Wide split-K: shorter steps rather than fewer splits when K is short.
  while bk > sk and k_sk // bk < b.split_k:
    bk //= 2
  steps = k_sk // bk
  split = max(1, min(b.split_k, steps))
  while steps % split:
    split -= 1
  fast = bool(b.fast_convert and layout.bits == 4 and jnp.dtype(x_dtype) == jnp.bfloat16)
  if b.x_mode not in X_MODES:
    raise ValueError(f"WOBlocks.x_mode={b.x_mode!r}; allowed: {X_MODES}.")
  asm = bool(b.asm_unpack and fast and layout.bits == 4)
  return dataclasses.replace(b, bm=min(b.bm, _pow2_at_least(m, 16)), bn=min(b.bn, _pow2_at_least(n, 16)),
                             bk=bk, sk=sk, split_k=split, fast_convert=fast, asm_unpack=asm)


def weight_only_matmul(x, packed, scale, zero_point, layout: WeightLayout, out_dtype=None, *,
                       interpret=False, blocks: blocks_lib.WOBlocks | None = None, arch: str | None = None):
  """``x (M, K) @ W`` with ``W`` held packed (see `reference` for the layout).

  Args:
    x: (M, K) bfloat16, float16 or float32 activations.
    packed: (ceil(K/2), N) uint8 for INT4; (K, N) uint8/int8 for 5..8 bits.
    scale: (G, N) float scales (G = 1: per channel).
    zero_point: (G, N) uint8 zero points, or None (symmetric).
    layout: The `WeightLayout`.
    out_dtype: Output dtype (default ``x.dtype``).
    interpret: Run in the Pallas interpreter.
    blocks: Override the block table.
    arch: 'sm90' style target (default `gpu_arch()`).
  """
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  m, k = x.shape
  n = packed.shape[1]
  if k != layout.k:
    raise ValueError(f"weight_only_matmul: x has K={k}, the layout says k={layout.k}.")
  b = plan(m, n, layout, x.dtype, blocks, arch)
  grouped = layout.num_groups > 1
  gs = layout.group_size if grouped else 1
  split = b.split_k
  kp = round_up(k, b.bk * split)
  mp, np_ = round_up(m, b.bm), round_up(n, b.bn)
  k_split = kp // split
  nk = k_split // b.bk
  rows = kp // 2 if layout.bits == 4 else kp
  rows_split = rows // split
  gp = -(-kp // gs) if grouped else 1
  s = jnp.broadcast_to(scale, (scale.shape[0], n))
  x_mode = b.x_mode if layout.bits == 4 else "join"
  if x_mode == "pre":
    xp = pad2(x, mp, kp)
    xp = jnp.stack([xp[:, 0::2], xp[:, 1::2]])
    x_spec = pl.BlockSpec((2, b.bm, k_split // 2), lambda i, j, t: (0, i, t))
  else:
    xp = pad2(x, mp, kp)
    x_spec = pl.BlockSpec((b.bm, k_split), lambda i, j, t: (i, t))
  args = [xp, pad2(packed, rows, np_), pad2(s, gp, np_)]
  in_specs = [x_spec,
              pl.BlockSpec((rows_split, b.bn), lambda i, j, t: (t, j)),
              pl.BlockSpec((gp, b.bn), lambda i, j, t: (0, j))]
  has_zero = zero_point is not None
  if has_zero:
    args.append(pad2(jnp.broadcast_to(zero_point, (zero_point.shape[0], n)).astype(jnp.uint8), gp, np_))
    in_specs.append(pl.BlockSpec((gp, b.bn), lambda i, j, t: (0, j)))
  if split == 1:
    out_shape = jax.ShapeDtypeStruct((mp, np_), out_dtype)
    out_spec = pl.BlockSpec((b.bm, b.bn), lambda i, j, t: (i, j))
  else:
    out_shape = jax.ShapeDtypeStruct((split, mp, np_), jnp.float32)
    out_spec = pl.BlockSpec((None, b.bm, b.bn), lambda i, j, t: (t, i, j))
  kern = functools.partial(_kernel, bits=layout.bits, nk=nk, bk=b.bk, sk=b.sk, gs=gs, grouped=grouped,
                           has_zero=has_zero, offset=int(layout.offset), fast=b.fast_convert, k_split=k_split,
                           x_mode=x_mode,
                           # The interpreter cannot run PTX; its jnp path computes the same codes.
                           asm=b.asm_unpack and not has_zero and not interpret)
  out = pl.pallas_call(
      kern,
      out_shape=out_shape,
      grid=(mp // b.bm, np_ // b.bn, split),
      in_specs=in_specs,
      out_specs=out_spec,
      compiler_params=plgpu.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
      interpret=interpret,
      name=f"jquant_w{layout.bits}a16_gpu",
  )(*args)
  if split > 1:
    # Slice before the sum: XLA then reads only the m real rows of the fp32 partials.
    return out[:, :m, :n].sum(axis=0).astype(out_dtype)
  return out[:m, :n]
