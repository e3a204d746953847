"""``propose_ngram_batched`` (contract 1.15): the n-gram proposer's search for every request of a
step in one launch.

One program per row. It walks the row's possible occurrence ends e (every position before its
last token, BLOCK at a time, no further than the row's length) and scores each by the run of
tokens ending at e that equal the tokens ending at the row's last, at most MAX_N: the largest
score, the latest end among those scoring it, is one max over ``run * C + e``. It then copies up
to NUM_TOKENS tokens after that end. The reference's tensors ([B, C, max_n] compares, a cumprod,
a dozen reductions and gathers) are some thirty launches inside the chained verification's
graph, each a few microseconds of a step that takes about a millisecond.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256
"""Occurrence ends a program scores at once."""


@triton.jit
def _propose_ngram_kernel(history_ptr, lengths_ptr, proposals_ptr, counts_ptr, capacity, stride_history,
                          NUM_TOKENS: tl.constexpr, TOKENS_BLOCK: tl.constexpr, MIN_N: tl.constexpr,
                          MAX_N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tokens = history_ptr + row * stride_history
    length = tl.load(lengths_ptr + row).to(tl.int64)
    best = tl.full([BLOCK], -1, tl.int64)
    for first in range(0, length - 1, BLOCK):
        ends = first + tl.arange(0, BLOCK).to(tl.int64)
        valid = ends < length - 1
        matching = valid
        run = tl.zeros([BLOCK], tl.int64)
        for back in tl.static_range(MAX_N):
            # -1 before the row's start on this side, -2 on the other: never equal.
            last = tl.load(tokens + length - 1 - back, mask=length - 1 - back >= 0, other=-1)
            token = tl.load(tokens + ends - back, mask=matching & (ends - back >= 0), other=-2)
            matching = matching & (token == last)
            run += matching.to(tl.int64)
        best = tl.maximum(best, tl.where(valid, run * capacity + ends, -1))
    key = tl.max(best, 0)
    n = key // capacity
    start = key % capacity + 1
    count = tl.where((key >= 0) & (n >= MIN_N), tl.minimum(length - start, NUM_TOKENS), 0)
    offsets = tl.arange(0, TOKENS_BLOCK)
    proposed = tl.load(tokens + start + offsets, mask=offsets < count, other=0)
    tl.store(proposals_ptr + row * NUM_TOKENS + offsets, proposed, mask=offsets < NUM_TOKENS)
    tl.store(counts_ptr + row, count)


def propose_ngram_batched(history: torch.Tensor, lengths: torch.Tensor, num_tokens: int, min_n: int, max_n: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """history [B, C] int64 (unit column stride), lengths [B] int64: (proposals [B, num_tokens],
    counts [B]), as the reference."""
    batch, capacity = history.shape
    proposals = torch.empty(batch, num_tokens, dtype=torch.int64, device=history.device)
    counts = torch.empty(batch, dtype=torch.int64, device=history.device)
    if batch:
        _propose_ngram_kernel[(batch,)](history, lengths, proposals, counts, capacity, history.stride(0),
                                        NUM_TOKENS=num_tokens, TOKENS_BLOCK=triton.next_power_of_2(num_tokens),
                                        MIN_N=min_n, MAX_N=max_n, BLOCK=BLOCK)
    return proposals, counts
