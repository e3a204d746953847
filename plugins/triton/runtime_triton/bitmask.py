"""``apply_token_bitmask`` (contract 1.7): structured output's mask in one launch for every
constrained row of a step, in place.

One program per (row, block of 32 * WORDS tokens): it loads WORDS int32 words of the row's
mask, expands each bit and writes -inf over the tokens whose bit is 0. No host sync, nothing
allocated: a step's constrained rows cost a read of their bitmask and a masked write of their
logits (vs the reference's unpacked [N, V] bool mask, gather and scatter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WORDS = 32
"""Bitmask words per program: 1024 tokens."""


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, vocab, words, stride_logits, stride_bitmask,
                                WORDS: tl.constexpr):
    index = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + index).to(tl.int64)
    word = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    bits = tl.load(bitmask_ptr + index * stride_bitmask + word, mask=word < words, other=-1)
    shifts = tl.arange(0, 32)
    allowed = ((bits[:, None] >> shifts[None, :]) & 1) != 0
    tokens = word[:, None] * 32 + shifts[None, :]
    blocked = (~allowed) & (tokens < vocab)
    tl.store(logits_ptr + row * stride_logits + tokens, tl.full([WORDS, 32], float("-inf"), tl.float32)
             .to(logits_ptr.dtype.element_ty), mask=blocked)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (unit column stride), bitmask [N, ceil(V / 32)] int32, rows [N]: in place."""
    if rows.numel():
        vocab, words = logits.shape[1], bitmask.shape[1]
        _apply_token_bitmask_kernel[(rows.numel(), triton.cdiv(words, WORDS))](
            logits, bitmask, rows, vocab, words, logits.stride(0), bitmask.stride(0), WORDS=WORDS)
    return logits
