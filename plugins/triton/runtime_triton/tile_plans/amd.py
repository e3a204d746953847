"""Tile plans for AMD CDNA GPUs (MI300: gfx942, MI350: gfx950), 64-thread wavefronts.

Derived from the NVIDIA plans, not measured on AMD hardware (docs/platforms.md): the same tiles
where they fit (MFMA, like the tensor cores, takes 16-row operands), half the warps so a program
keeps the same number of threads in 64-wide wavefronts, two pipeline stages (what Triton's AMD
backend overlaps), and every tile a program stages within a CU's 64 KiB of LDS, where an H100's
SM has 228 KiB of shared memory.
"""

from __future__ import annotations

from . import TilePlans, padded_head_size, plan_attention

LDS_BYTES = 64 << 10


def attention(**sizes) -> tuple[int, int, int, int]:
    """``plan_attention`` with 2 wavefronts a program (4 for 128 rows), the keys per tile halved
    until a Q tile and a K and a V tile fit the LDS (float32 with 256-wide heads).
    ``multiprocessors`` is the CU count (304 on an MI300X)."""
    block_m, tile_n, splits, warps = plan_attention(**sizes, warps=lambda block_m: 4 if block_m >= 128 else 2)
    row_bytes = padded_head_size(sizes["head_size"]) * sizes["dtype"].itemsize
    while tile_n > 16 and (block_m + 2 * tile_n) * row_bytes > LDS_BYTES:
        tile_n //= 2
    return block_m, tile_n, splits, warps


def skinny_matmul(n: int, k: int) -> dict:
    """The NVIDIA plan's column tiles, 256-deep reduction steps and two stages: two stages of a
    32 x 256 bf16 weight tile and the 16 padded rows take 48 KiB of the LDS."""
    if n <= 8192 and k <= 4096:
        return dict(block_n=16, block_k=256, num_warps=4, num_stages=2)
    return dict(block_n=32, block_k=256, num_warps=4, num_stages=2)


PLANS = TilePlans(target="amd", warp_size=64, attention=attention, skinny_matmul=skinny_matmul)
