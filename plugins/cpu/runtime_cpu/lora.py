"""LoRA shrink/expand on the CPU: one matmul per long run of tokens, one per adapter for the others.

The reference gathers every token's adapter weights ([T, r, in]): gigabytes for a long prompt
chunk on a large projection. Here each adapter's weights multiply the rows of its tokens at once.
Rows that lie together in a long run (a prompt chunk, a whole step on one adapter) are used as
they are, with no copy; the tokens of short runs (decode steps: one token per request) are
gathered once, sorted by slot, multiplied one adapter at a time and scattered back. Tokens with
slot -1 get nothing (shrink) or ``base`` unchanged (expand). The grouping costs a dozen small
ops; it is done once for the many calls of a step.

Chosen by ``benchmarks/lora_kernels.py --threads 1`` (docs/benchmarks.md has the figures): over
steps of 1 to 2048 tokens, ranks 8-64 and 1-8 adapters, one gather, matmul and scatter per
adapter took 1.15-2.0x the time of this (geometric means per kind of step), one matmul against
every adapter of the device 2.0-4.4x, the reference 3.3-31x.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Runs of at least this many tokens (prompt chunks) are multiplied where they lie; shorter ones
# (decode tokens) are gathered, so each adapter takes one matmul for all of them.
MIN_RUN_TOKENS = 16


class SlotGroups(NamedTuple):
    """The step's adapter tokens (slot >= 0) grouped by slot."""

    runs: list[tuple[int, slice]]
    """(slot, rows) of each long run of one slot, rows of the inputs as they are."""
    gathered: torch.Tensor | None
    """Indices of the other adapter tokens sorted by slot, or None when there are none."""
    gathered_runs: list[tuple[int, slice]]
    """(slot, rows) of each slot's tokens among ``gathered``."""


def _runs(values: torch.Tensor, counts: torch.Tensor, keep: torch.Tensor | None = None) -> list[tuple[int, slice]]:
    """(slot, rows) of the runs (the ``keep`` ones) of ``counts`` tokens of slot ``values``, laid end to end."""
    starts = counts.cumsum(0) - counts
    if keep is not None:
        values, starts, counts = values[keep], starts[keep], counts[keep]
    return [(slot, slice(start, start + count))
            for slot, start, count in zip(values.tolist(), starts.tolist(), counts.tolist())]


# Every LoRA call of a step (two per projection partition per layer) gets the step's slots: group
# them once. Keyed on the values, not the tensor: the engine may rewrite one persistent tensor each
# step, and tensors made under inference_mode keep no version counter to tell.
_last_grouped: tuple[torch.Tensor, SlotGroups] | None = None


def slot_groups(slots: torch.Tensor) -> SlotGroups:
    """The grouping of ``slots``, computed once for consecutive calls with the same slots."""
    global _last_grouped
    if _last_grouped is None or not _same(_last_grouped[0], slots):
        _last_grouped = (slots.clone(), _group(slots))
    return _last_grouped[1]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _group(slots: torch.Tensor) -> SlotGroups:
    """Long runs where they lie, the other adapter tokens gathered and sorted by slot."""
    values, counts = torch.unique_consecutive(slots, return_counts=True)
    if len(values) == 1:  # one token, or a whole step on one slot: skip the bookkeeping
        slot = int(values[0])
        return SlotGroups([(slot, slice(0, len(slots)))] if slot >= 0 else [], None, [])
    adapter = values >= 0
    long = adapter & (counts >= MIN_RUN_TOKENS)
    short = adapter & ~long
    runs = _runs(values, counts, long)
    if not short.any():
        return SlotGroups(runs, None, [])
    short_tokens = torch.repeat_interleave(short, counts).nonzero().flatten()
    gathered = short_tokens[torch.argsort(slots[short_tokens], stable=True)]
    return SlotGroups(runs, gathered, _runs(*torch.unique_consecutive(slots[gathered], return_counts=True)))


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
    """x [T, in], lora_a [S, r, in], slots [T] -> [T, r] = scale * x @ lora_a[slot].T (0 where slot < 0)."""
    groups = slot_groups(slots)
    out = x.new_zeros(x.shape[0], lora_a.shape[1])
    for slot, rows in groups.runs:
        torch.mm(x[rows], lora_a[slot].T, out=out[rows])
    if groups.gathered is not None:
        rows_in, rows_out = x.index_select(0, groups.gathered), x.new_empty(len(groups.gathered), lora_a.shape[1])
        for slot, rows in groups.gathered_runs:
            torch.mm(rows_in[rows], lora_a[slot].T, out=rows_out[rows])
        out.index_copy_(0, groups.gathered, rows_out)
    return out.mul_(scale)


def lora_expand(shrunk: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """shrunk [T, r], lora_b [S, out, r], base [T, out] -> base + shrunk @ lora_b[slot].T (base where slot < 0)."""
    groups = slot_groups(slots)
    out = base.clone(memory_format=torch.contiguous_format)
    for slot, rows in groups.runs:
        out[rows].addmm_(shrunk[rows], lora_b[slot].T)
    if groups.gathered is not None:
        rows_in, rows_out = shrunk.index_select(0, groups.gathered), base.index_select(0, groups.gathered)
        for slot, rows in groups.gathered_runs:
            rows_out[rows].addmm_(rows_in[rows], lora_b[slot].T)
        out.index_copy_(0, groups.gathered, rows_out)
    return out
