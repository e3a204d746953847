"""Verification steps shaped for a captured graph: every sequence computes 1 + k tokens.

A speculative step where each request decodes its last token plus up to k proposals has one
shape per batch size once every sequence is padded to 1 + k query tokens, so it can replay a
graph captured like the decode ones (see decode_graphs.py). Padding keeps the step exact:

- a padded token sits after its sequence's real ones, and attention is causal, so no real token
  sees it; its own output row is never read (verification reads each request's first 1 + m rows);
- a padded token has slot -1, so it writes no K/V (the store skips negative slots): the slots
  of proposals this request did not make keep whatever they held, and the scheduler counts only
  accepted positions as computed, so later steps overwrite them before anything reads them;
- the sequence's length counts its padded tokens, whose keys lie in the request's own blocks or
  in block-table columns padded with the null block 0; they are read only by padded queries.

So the step's accepted tokens are exactly those of the same step run eagerly, unpadded.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..sched.scheduler import ScheduledRequest
from .input_buffers import StepInputs


def verification_size(scheduled: list[ScheduledRequest], num_speculative_tokens: int, max_positions: int,
                      size_for: Callable[[int, int], Optional[int]]) -> Optional[int]:
    """The captured batch size a step replays as a verification graph of 1 + k tokens per
    sequence, or None where it runs eagerly: a step with prompt chunks (or anything other than
    one known token plus its proposals per request), one without proposals (a plain decode
    graph serves it), or one where a padded sequence would reach past ``max_positions`` (the
    block table's reach, ``max_blocks_per_seq * block_size``).

    ``size_for(num_seqs, query_len)`` is the graphs' ladder lookup (``DecodeGraphs.size_for``).
    """
    query_len = 1 + num_speculative_tokens
    if not num_speculative_tokens or not any(s.draft_token_ids for s in scheduled):
        return None
    for s in scheduled:
        if (s.token_pending or not s.sample or s.num_new_tokens != 1 + len(s.draft_token_ids)
                or s.start + query_len > max_positions):
            return None
    return size_for(len(scheduled), query_len)


def pad_verification(step: StepInputs, query_len: int, size: int, block_size: int) -> StepInputs:
    """``step`` (sequences of at most ``query_len`` tokens each) as ``size`` sequences of exactly
    ``query_len`` tokens: each sequence's tokens first, then padding tokens (id 0, position 0,
    slot -1); sequences past the step's are all padding, of length ``query_len`` over the null
    block. Sequence i's tokens start at row ``i * query_len``."""
    seqs = len(step.seq_lens)
    counts = np.diff(step.query_start_loc)
    if seqs > size or counts.max() > query_len:
        raise ValueError(f"a step of {seqs} sequences of up to {counts.max()} tokens does not fit {size} x {query_len}")
    query_start = np.arange(size + 1, dtype=np.int64) * query_len
    total = size * query_len
    # Row of each real token: its sequence's padded start plus its index within the sequence.
    rows = np.repeat(query_start[:seqs] - step.query_start_loc[:-1], counts) + np.arange(len(step.input_ids))
    input_ids, positions = np.zeros(total, dtype=np.int64), np.zeros(total, dtype=np.int64)
    slot_mapping = np.full(total, -1, dtype=np.int64)
    input_ids[rows], positions[rows], slot_mapping[rows] = step.input_ids, step.positions, step.slot_mapping
    seq_lens = np.full(size, query_len, dtype=np.int64)
    seq_lens[:seqs] = step.seq_lens - counts + query_len
    width = max(step.block_table.shape[1], -(-int(seq_lens.max()) // block_size))
    block_table = np.zeros((size, width), dtype=np.int64)
    block_table[:seqs, :step.block_table.shape[1]] = step.block_table
    return StepInputs(input_ids, positions, slot_mapping, query_start, seq_lens, block_table)
