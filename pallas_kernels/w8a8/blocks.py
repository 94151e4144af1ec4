"""Block sizes of the W8A8 kernels per backend and generation.

Entries are upper bounds; `pick` shrinks them for small problems and the
wrappers pad the operands to block multiples.

Example:
    >>> from pallas_kernels.w8a8 import blocks
    >>> blocks.pick("gpu", 37, 896, 1000, "sm90")
    W8A8Blocks(bm=64, bn=128, bk=64, num_warps=4, num_stages=5, group_m=8)
    >>> blocks.pick("gpu", 4096, 4096, 4096, "sm90")
    W8A8Blocks(bm=128, bn=256, bk=128, num_warps=8, num_stages=3, group_m=8)
"""

from __future__ import annotations

import dataclasses

from pallas_kernels._common import NoBlocks, is_static, round_up


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

# Hopper, measured on H200 (bench_kernels.py): 128x256x128, 8 warps, 3 stages gave 1.54x bf16 at
# 4096^3 and 1.52x at 8192^3 (128x128x64, 4 warps, 5 stages: 1.55x and 1.48x; the former
# 128x128x128 w8 s4: 1.26x and 1.29x).
GPU = {
    "sm80": W8A8Blocks(128, 128, 128, num_warps=4, num_stages=4),
    "sm89": W8A8Blocks(128, 128, 128, num_warps=4, num_stages=4),
    "sm90": W8A8Blocks(128, 256, 128, num_warps=8, num_stages=3),
    "default": W8A8Blocks(128, 128, 64, num_warps=4, num_stages=3),
}
# Used instead of GPU[target] when its tiles would not fill two waves of the SMs: the smaller tile
# keeps all SMs busy (H200 at 4096^3: 1.55x bf16, on par with the large tile).
GPU_FEW_TILES = {"sm90": W8A8Blocks(128, 128, 64, num_warps=4, num_stages=5)}
_SM_COUNT = {"sm90": 132}


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
  if not is_static(m):
    if backend == "gpu":
      return NoBlocks("symbolic M: Pallas Triton has no dynamic grid bounds")
    return dataclasses.replace(entry, bn=min(entry.bn, round_up(n, 128)), bk=min(entry.bk, round_up(k, 128)))
  if override is None and backend == "gpu" and target in GPU_FEW_TILES:
    tiles = -(-m // entry.bm) * -(-n // entry.bn)
    if tiles < 2 * _SM_COUNT[target]:
      entry = GPU_FEW_TILES[target]
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
