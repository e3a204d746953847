"""Tile plans for NVIDIA GPUs (32-thread warps), measured on an H100."""

from __future__ import annotations

from . import TilePlans, plan_attention


def attention(**sizes) -> tuple[int, int, int, int]:
    """``plan_attention`` with 4 warps a program (8 for 128 rows)."""
    return plan_attention(**sizes, warps=lambda block_m: 8 if block_m >= 128 else 4)


def skinny_matmul(n: int, k: int) -> dict:
    """Tile sizes for an [n, k] weight, from a sweep on an H100 (plugins/cuda/benchmarks/skinny_matmul.py):
    small weights want more, narrower programs; long rows and tall weights wide, deep tiles."""
    if n <= 8192 and k <= 4096:
        return dict(block_n=16, block_k=256, num_warps=4, num_stages=4)
    return dict(block_n=32, block_k=512, num_warps=4, num_stages=4)


PLANS = TilePlans(target="nvidia", warp_size=32, attention=attention, skinny_matmul=skinny_matmul)
