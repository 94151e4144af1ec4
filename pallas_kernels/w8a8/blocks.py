"""Block sizes of the W8A8 kernels per backend and generation.

Entries are upper bounds; `pick` shrinks them for small problems and the
wrappers pad the operands to block multiples.

Example:
    >>> from pallas_kernels.w8a8 import blocks
    >>> blocks.pick("gpu", 37, 896, 1000, "sm90")
    W8A8Blocks(bm=64, bn=128, bk=128, num_warps=8, num_stages=4, group_m=8)
"""

from __future__ import annotations

import dataclasses

from pallas_kernels._common import NoBlocks, round_up


@dataclasses.dataclass(frozen=True)
class W8A8Blocks:
  """Tile of one program: ``bm x bn`` outputs, ``bk`` contraction per step.

  Attributes:
    bm, bn, bk: Block sizes (powers of two on GPU; multiples of 32/128 on TPU).
    num_warps, num_stages: Triton launch settings (GPU only).
    group_m: Row blocks walked together for L2 reuse (GPU only).
  """

  bm: int
  bn: int
  bk: int
  num_warps: int = 4
  num_stages: int = 3
  group_m: int = 8


# int8 MXU: v5e, v5p, v6e. v4 and older have no int8 matmul in Mosaic
# ("Unsupported matmul RHS type on target: vector<...xi8>").
TPU = {
    "v2": NoBlocks("TPU v2 has no int8 MXU path in Mosaic"),
    "v3": NoBlocks("TPU v3 has no int8 MXU path in Mosaic"),
    "v4": NoBlocks("TPU v4 has no int8 MXU path in Mosaic (needs v5e or newer)"),
    "v5e": W8A8Blocks(512, 512, 1024),
    "v5p": W8A8Blocks(512, 512, 1024),
    "v6e": W8A8Blocks(512, 1024, 1024),
    "v7": W8A8Blocks(512, 1024, 1024),
}

# Hopper: 128x128x128 with 8 warps (two warpgroups) compiles to int8 wgmma without register spills
# (128x256 tiles spill in the main loop); bench_kernels.py sweeps the alternatives.
GPU = {
    "sm80": W8A8Blocks(128, 128, 128, num_warps=4, num_stages=4),
    "sm89": W8A8Blocks(128, 128, 128, num_warps=4, num_stages=4),
    "sm90": W8A8Blocks(128, 128, 128, num_warps=8, num_stages=4),
    "default": W8A8Blocks(128, 128, 64, num_warps=4, num_stages=3),
}


def _pow2_at_least(n: int, lo: int) -> int:
  p = lo
  while p < n:
    p *= 2
  return p


def table_entry(backend: str, target: str):
  table = TPU if backend == "tpu" else GPU
  if target in table:
    return table[target]
  if backend == "tpu":
    raise ValueError(f"tpu generation={target!r}; allowed: {tuple(TPU)}.")
  return GPU["default"]


def pick(backend: str, m: int, k: int, n: int, target: str, override: W8A8Blocks | None = None) -> W8A8Blocks:
  """Blocks for an (m, k) x (k, n) problem, shrunk to the problem where it is small.

  Raises:
    KernelUnsupported (via `_common.NoBlocks`) is left to the caller: a
    `NoBlocks` entry is returned as is.
  """
  entry = override or table_entry(backend, target)
  if isinstance(entry, NoBlocks):
    return entry
  if backend == "gpu":
    # Triton tensors are powers of two; int8 mma needs k >= 32 and m, n >= 16.
    bm = min(entry.bm, _pow2_at_least(m, 16))
    bn = min(entry.bn, _pow2_at_least(n, 16))
    bk = min(entry.bk, _pow2_at_least(k, 32))
  else:
    # Mosaic int8 tiles are (32, 128); whole-dimension blocks are also legal.
    bm = min(entry.bm, round_up(m, 32))
    bn = min(entry.bn, round_up(n, 128))
    bk = min(entry.bk, round_up(k, 128))
  return dataclasses.replace(entry, bm=bm, bn=bn, bk=bk)
