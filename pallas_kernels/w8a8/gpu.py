"""W8A8 matmul for NVIDIA GPUs (Pallas Triton): int8 tensor cores, int32 accumulator.

One program per ``bm x bn`` output tile, walking the contraction in ``bk``
steps inside the kernel (Triton software-pipelines the loads with
``num_stages``). Programs are ordered in groups of ``group_m`` row blocks so
that neighbouring programs share weight tiles in L2. The epilogue applies the
per-token and per-channel scales (or stores the raw int32 sums).

Example:
    >>> from pallas_kernels.w8a8 import gpu
    >>> y = gpu.w8a8_matmul(xq, xs, wq, ws, interpret=True)   # doctest: +SKIP
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import KernelUnsupported, NoBlocks, gpu_arch, pad2, pad_axis, round_up
from pallas_kernels.w8a8 import blocks as blocks_lib


def _grouped_ids(pid, nm: int, nn: int, group_m: int):
  """Program id -> (row block, column block), ``group_m`` row blocks at a time."""
  width = group_m * nn
  group = pid // width
  first_m = group * group_m
  size_m = jnp.minimum(nm - first_m, group_m)
  local = pid % width
  return first_m + local % size_m, local // size_m


def _kernel(*refs, nk: int, bk: int, scaled: bool, w_nk: bool):
  if scaled:
    x_ref, w_ref, xs_ref, ws_ref, o_ref = refs
  else:
    x_ref, w_ref, o_ref = refs
  bm, bn = o_ref.shape

  def body(kk, acc):
    start = pl.multiple_of(kk * bk, bk)
    x = x_ref[:, pl.ds(start, bk)]
    if w_nk:  # (bn, bk) tile, K contiguous: what int8 tensor cores read directly
      w = w_ref[:, pl.ds(start, bk)]
      return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    w = w_ref[pl.ds(start, bk), :]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.int32)

  acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.int32))
  if scaled:
    y = acc.astype(jnp.float32) * xs_ref[...][:, None] * ws_ref[...][None, :]
    o_ref[...] = y.astype(o_ref.dtype)
  else:
    o_ref[...] = acc


def w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.bfloat16, *, interpret=False,
                blocks: blocks_lib.W8A8Blocks | None = None, arch: str | None = None,
                w_layout: str = "kn"):
  """int8 (M,K) x int8 (K,N) on the tensor cores, scales applied in the epilogue.

  Args:
    x_q: int8 (M, K).
    x_scale: float (M, 1) per-token scales, or None (with ``w_scale`` None: int32 out).
    w_q: int8 (K, N).
    w_scale: float (1, N) per-channel scales, or None.
    out_dtype: float output dtype when scaled.
    interpret: Run the kernel in the Pallas interpreter (any machine).
    blocks: Override the block table.
    arch: 'sm90' style target (default: `gpu_arch()`).
    w_layout: ``"kn"``: ``w_q`` is (K, N); ``"nk"``: ``w_q`` is (N, K), K
      contiguous, the operand layout int8 tensor cores (wgmma) read without a
      transpose through shared memory. Store weights that way once to gain it.
  """
  if w_layout not in ("kn", "nk"):
    raise ValueError(f"w8a8_matmul: w_layout={w_layout!r}; allowed: ('kn', 'nk').")
  m, k = x_q.shape
  if w_layout == "nk":
    n, k2 = w_q.shape
  else:
    k2, n = w_q.shape
  if k != k2:
    raise ValueError(f"w8a8_matmul: x_q is {x_q.shape} and w_q is {w_q.shape}; contraction sizes differ.")
  if x_q.dtype != jnp.int8 or w_q.dtype != jnp.int8:
    raise ValueError(f"w8a8_matmul: x_q and w_q must be int8, got {x_q.dtype} and {w_q.dtype}.")
  b = blocks_lib.pick("gpu", m, k, n, arch or gpu_arch(), blocks)
  if isinstance(b, NoBlocks):
    raise KernelUnsupported(f"w8a8_matmul (GPU): {b.reason}; use backend='xla'.")
  scaled = x_scale is not None or w_scale is not None
  mp, np_, kp = round_up(m, b.bm), round_up(n, b.bn), round_up(k, b.bk)
  nm, nn, nk = mp // b.bm, np_ // b.bn, kp // b.bk
  group_m = max(1, min(b.group_m, nm))
  ids = functools.partial(_grouped_ids, nm=nm, nn=nn, group_m=group_m)

  def x_map(pid):
    return ids(pid)[0], 0

  def w_map(pid):
    return 0, ids(pid)[1]

  def o_map(pid):
    return ids(pid)

  if w_layout == "nk":
    args = [pad2(x_q, mp, kp), pad2(w_q, np_, kp)]
    in_specs = [pl.BlockSpec((b.bm, kp), x_map), pl.BlockSpec((b.bn, kp), lambda pid: (ids(pid)[1], 0))]
  else:
    args = [pad2(x_q, mp, kp), pad2(w_q, kp, np_)]
    in_specs = [pl.BlockSpec((b.bm, kp), x_map), pl.BlockSpec((kp, b.bn), w_map)]
  if scaled:
    xs = jnp.ones((m,), jnp.float32) if x_scale is None else jnp.broadcast_to(
        x_scale.astype(jnp.float32).reshape(-1), (m,))
    ws = jnp.ones((n,), jnp.float32) if w_scale is None else jnp.broadcast_to(
        w_scale.astype(jnp.float32).reshape(-1), (n,))
    args += [pad_axis(xs, 0, mp), pad_axis(ws, 0, np_)]
    in_specs += [pl.BlockSpec((b.bm,), lambda pid: (ids(pid)[0],)),
                 pl.BlockSpec((b.bn,), lambda pid: (ids(pid)[1],))]
  out_t = jnp.dtype(out_dtype) if scaled else jnp.dtype(jnp.int32)
  out = pl.pallas_call(
      functools.partial(_kernel, nk=nk, bk=b.bk, scaled=scaled, w_nk=w_layout == "nk"),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_t),
      grid=(nm * nn,),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((b.bm, b.bn), o_map),
      compiler_params=plgpu.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
      interpret=interpret,
      name="jquant_w8a8_gpu",
  )(*args)
  return out[:m, :n]
