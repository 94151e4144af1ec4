"""Block sizes of the weight-only kernels per backend and generation.

Entries are upper bounds keyed by a batch bucket (the activation rows M);
`pick` shrinks them to the problem and the wrappers pad operands to block
multiples. ``experiments/bench_kernels.py`` prints the best setting it found
per shape, in this format.

Example:
    >>> from pallas_kernels.w4a16 import blocks
    >>> blocks.table_entry("gpu", "sm90", m=8)
    WOBlocks(bm=16, bn=128, bk=256, sk=128, num_warps=4, num_stages=4, split_k=8, fast_convert=True, x_mode='pre', asm_unpack=True)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WOBlocks:
  """Tile of one program of the weight-only kernels.

  Attributes:
    bm, bn: Output tile (powers of two on GPU; TPU: bm multiple of 16, bn of 128).
    bk: Contraction per step (logical rows of K).
    sk: GPU only: largest sub-step handled by one dot (a group, or less).
    num_warps, num_stages: Triton launch settings (GPU only).
    split_k: GPU only: programs sharing one output tile along K (fp32
      partial sums added by XLA). For small M the grid is ``N / bn`` tiles,
      fewer than a GPU has SMs x resident programs; splitting K multiplies the
      programs in flight (the planner shortens ``bk`` when K is too short).
    fast_convert: GPU only, INT4 with bf16 activations: turn nibbles into
      bf16 with integer ops (``0x4300 | nibble`` is ``128 + nibble``) instead
      of int-to-float conversions, which run at a quarter rate.
    x_mode: GPU only, INT4: how nibbles meet activations. ``"split"``: the
      low-nibble plane (rows 2j) multiplies the even activation columns and
      the high plane the odd ones, read as one contiguous tile and split in
      registers; ``"strided"``: the same with two stride-2 reads; ``"pre"``:
      XLA splits the activations before the call; ``"join"``: the nibbles are
      interleaved back into rows 2j, 2j+1 in registers (one dot).
    asm_unpack: GPU only, symmetric INT4 with ``fast_convert``: unpack 4 bytes
      at a time with inline PTX (``prmt``/``lop3``/``fma.bf16x2``) instead of
      per-element Triton ops. The interpreter runs the equivalent jnp code.
  """

  bm: int
  bn: int
  bk: int
  sk: int = 128
  num_warps: int = 4
  num_stages: int = 3
  split_k: int = 1
  fast_convert: bool = True
  x_mode: str = "split"
  asm_unpack: bool = False


# (max M of the bucket, blocks). First bucket with m <= max wins.
GPU = {
    # H200, K = N = 8192: split_k=1 left 128 programs of 4 warps on 132 SMs (51 us at M=1,
    # 0.7 TB/s); split_k=2 with bn=128 gave 42.6 us. The pipelined loop keeps num_stages x (bk/2 x bn
    # weight bytes + bm x bk activations) in shared memory: bk=256, bn=128, 4 stages is ~74 KB, so
    # 3 programs (12 warps) share an SM, and split_k=8 gives 512 programs. M <= 64: ~92 KB, 2 per SM.
    # Measured on an H200 (JAX 0.11.2, experiments/results/bench_kernels_h200.md): these entries with
    # asm_unpack won, 29.5 us at M=1 and 40.6 us at M=64 (1.21x and 1.01x bf16), rel err 1.7e-3.
    "sm90": ((16, WOBlocks(16, 128, 256, 128, num_warps=4, num_stages=4, split_k=8, x_mode="pre", asm_unpack=True)),
             (64, WOBlocks(64, 128, 128, 128, num_warps=4, num_stages=3, split_k=4, x_mode="pre", asm_unpack=True)),
             (256, WOBlocks(128, 128, 128, 128, num_warps=8, num_stages=3)),
             (None, WOBlocks(128, 256, 64, 64, num_warps=8, num_stages=3))),
    "sm80": ((16, WOBlocks(16, 64, 256, 128, num_warps=4, num_stages=4)),
             (64, WOBlocks(64, 64, 256, 128, num_warps=4, num_stages=4)),
             (None, WOBlocks(128, 128, 64, 64, num_warps=8, num_stages=3))),
}
GPU["default"] = GPU["sm80"]

TPU = {
    "v5e": ((256, WOBlocks(256, 512, 1024)), (None, WOBlocks(256, 512, 1024))),
    "v5p": ((256, WOBlocks(256, 512, 1024)), (None, WOBlocks(512, 512, 1024))),
    "v6e": ((256, WOBlocks(256, 1024, 1024)), (None, WOBlocks(512, 1024, 1024))),
    "v7": ((256, WOBlocks(256, 1024, 1024)), (None, WOBlocks(512, 1024, 1024))),
}
for _old in ("v2", "v3", "v4"):
  TPU[_old] = ((None, WOBlocks(128, 256, 512)),)


def table_entry(backend: str, target: str, m: int) -> WOBlocks:
  """The table's blocks for ``m`` activation rows on ``target`` (the last bucket for a symbolic ``m``)."""
  table = GPU if backend == "gpu" else TPU
  if target not in table:
    if backend == "tpu":
      raise ValueError(f"tpu generation={target!r}; allowed: {tuple(TPU)}.")
    target = "default"
  for limit, b in table[target]:
    if limit is None or (isinstance(m, int) and m <= limit):
      return b
  return table[target][-1][1]
