"""How each GPU family launches the shared kernels: the kernels are the same Triton source, the
tile sizes and warps per program are not.

An NVIDIA warp is 32 threads and an SM keeps several programs' tiles in flight with deep
software pipelines (``num_stages`` 3-4, cp.async/TMA); an AMD CDNA wavefront is 64 threads, a
CU has 64 KiB of LDS, and Triton's AMD backend pipelines two stages. A plan names each kernel's
launch parameters for one family; a platform's attention backend and ``registry.kernels`` take it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton

from ..paged_attention import padded_head_size


@dataclass(frozen=True)
class TilePlans:
    target: str
    """``"nvidia"`` or ``"amd"``."""
    warp_size: int
    attention: Callable[..., tuple[int, int, int, int]]
    """``(num_seqs=, max_query_len=, max_seq_len=, num_heads=, num_kv_heads=, head_size=, dtype=,
    multiprocessors=) -> (block_m, tile_n, num_splits, num_warps)`` for one step of paged attention."""
    skinny_matmul: Callable[[int, int], dict]
    """``(n, k) -> dict(block_n=, block_k=, num_warps=, num_stages=)`` for an [n, k] weight."""


# Split-K pays once a query block's keys take many tiles; below this context it only adds a launch.
SPLIT_MIN_SEQ_LEN = 512
MAX_SPLITS = 16


def wide_rows(head_size: int, dtype: torch.dtype) -> bool:
    """Whether a query row and its accumulator take twice the registers (head over 128, float32)."""
    return padded_head_size(head_size) > 128 or dtype == torch.float32


def attention_rows(group: int, max_query_len: int, wide: bool) -> int:
    """Query rows per program: enough for the longest query of the step times the GQA group (at
    least 16, tl.dot's minimum on both families), capped where Q and the accumulator still fit in
    registers."""
    cap = max(32 if wide else 64, triton.next_power_of_2(group))
    return min(max(16, triton.next_power_of_2(group * max_query_len)), cap)


def split_count(*, num_seqs: int, num_kv_heads: int, max_seq_len: int, tile_n: int, multiprocessors: int) -> int:
    """Split-K slices when every sequence fits one query block (decode, short speculative steps) and
    the grid would leave multiprocessors (SMs, CUs) idle: about two programs per multiprocessor."""
    if max_seq_len < SPLIT_MIN_SEQ_LEN:
        return 1
    programs = num_seqs * num_kv_heads
    wanted = triton.next_power_of_2(max(1, 2 * multiprocessors // programs))
    # At least a tile per split. Fewer, longer splits leave most multiprocessors idle: at batch 1
    # and 600 tokens of context, 2 splits per KV head made attention 7% of an 8B model's step.
    splits = max(1, min(MAX_SPLITS, wanted, max_seq_len // tile_n))
    return 1 << (splits.bit_length() - 1)  # powers of two, as the plans were timed


def plan_attention(*, num_seqs: int, max_query_len: int, max_seq_len: int, num_heads: int, num_kv_heads: int,
                   head_size: int, dtype: torch.dtype, multiprocessors: int,
                   warps: Callable[[int], int]) -> tuple[int, int, int, int]:
    """(block_m, tile_n, num_splits, num_warps) for one step; every input is known on the host.

    Keys per tile: 64 for decode rows, 32 where a block holds several query tokens (prefill): on an
    H100 a prefill of 32 x 512 tokens ran 1.22x faster with 32 than with 64
    (plugins/cuda/benchmarks/attention_plans.py), the causal diagonal masking less of each tile,
    while a decode step was fastest at 64. ``warps(block_m)`` is the family's warps per program.
    """
    group = num_heads // num_kv_heads
    wide = wide_rows(head_size, dtype)
    block_m = attention_rows(group, max_query_len, wide)
    tile_n = 32 if wide or max_query_len > 1 else 64
    num_splits = 1
    if group * max_query_len <= block_m:
        num_splits = split_count(num_seqs=num_seqs, num_kv_heads=num_kv_heads, max_seq_len=max_seq_len,
                                 tile_n=tile_n, multiprocessors=multiprocessors)
    return block_m, tile_n, num_splits, warps(block_m)
