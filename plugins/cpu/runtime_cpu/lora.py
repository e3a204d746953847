"""LoRA shrink/expand/add on the CPU: one matmul per long run of tokens, one per adapter for the others.

The reference gathers every token's adapter weights ([T, r, in]): gigabytes for a long prompt
chunk on a large projection. Here each adapter's weights multiply the rows of its tokens at once.
Rows that lie together in a long run (a prompt chunk, a whole step on one adapter) are used as
they are, with no copy; the tokens of short runs (decode steps: one token per request) are
gathered once, sorted by slot, multiplied one adapter at a time and scattered back. Tokens with
slot -1 get nothing (shrink) or ``base`` unchanged (expand, add). The grouping costs a dozen small
ops; it is done once for the many calls of a step. ``lora_add`` (what the engine calls) shrinks
against every partition of a fused projection at once and adds each partition's product into
its columns of the output in place.

Chosen by ``benchmarks/lora_kernels.py --threads 1`` (docs/benchmarks.md has the figures): over
steps of 1 to 2048 tokens, ranks 8-64 and 1-8 adapters, one gather, matmul and scatter per
adapter took 1.15-2.0x the time of this (geometric means per kind of step), one matmul against
every adapter of the device 2.0-4.4x, the reference 3.3-31x.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

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
    out = base.clone(memory_format=torch.contiguous_format)
    return _add_expanded(out, shrunk, lora_b, slot_groups(slots), [lora_b.shape[1]])


def lora_add(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor,
             slices: Sequence[int], scale: float) -> torch.Tensor:
    """y [T, out] += each partition's expand(shrink(x)), in place (contract 1.5; see the reference):
    one shrink against the partitions' A stacked ([S, n * r, in]) serves them all."""
    return _add_expanded(y, lora_shrink(x, lora_a, slots, scale), lora_b, slot_groups(slots), slices)


def _add_expanded(y: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, groups: SlotGroups,
                  slices: Sequence[int]) -> torch.Tensor:
    """y [T, out] += shrunk [T, n * r] @ lora_b[slot].T per partition, in place: per adapter group one
    product per partition into its columns. The gathered (decode) tokens' rows of ``y`` are read
    once and written back once for all partitions."""
    rank, start, columns = lora_b.shape[2], 0, []
    for i, width in enumerate(slices):
        columns.append((slice(i * rank, (i + 1) * rank), slice(start, start + width)))
        start += width
    for slot, rows in groups.runs:
        for ranks, outs in columns:
            y[rows, outs].addmm_(shrunk[rows, ranks], lora_b[slot, outs].T)
    if groups.gathered is not None:
        rows_in, rows_out = shrunk.index_select(0, groups.gathered), y.index_select(0, groups.gathered)
        for slot, rows in groups.gathered_runs:
            for ranks, outs in columns:
                rows_out[rows, outs].addmm_(rows_in[rows, ranks], lora_b[slot, outs].T)
        y.index_copy_(0, groups.gathered, rows_out)
    return y
