"""Verification steps launched one behind the other, with no read-back in between.

A verification step's next inputs depend on how many proposals it accepts, so the engine used to
wait for its tokens, apply them, propose and launch the next step, with the device idle all the
while (about 0.85 ms a step at batch 8 on an H100, docs/speculative.md). Where every request is
greedy and proposes by n-gram, the next verification is made on the device instead: the tokens
each request emitted are appended to its token history there, the n-gram proposer runs on that
history (``spec.device_ngram``), and the next step's token ids, positions, KV slots and sequence
lengths are written into the input buffers that the verification graph reads. The host learns
what was proposed and accepted one step later, when it reads the step back.

The step's shape is that of a padded verification (``verify_batch.pad_verification``): each
request computes its last token and its proposals in a run of 1 + k rows, and the rows past its
proposals write no K/V (slot -1) and are never accepted, so the tokens are those of the same
step run eagerly.
"""

from __future__ import annotations

import numpy as np
import torch

from ..spec.device_ngram import propose_ngram_batched
from .input_buffers import InputBuffers, host_to_device


class VerificationChain:
    """Owner of the device token histories of the requests of a chain of verification steps."""

    def __init__(self, buffers: InputBuffers, block_size: int, num_speculative_tokens: int, min_n: int, max_n: int,
                 device: torch.device):
        self.buffers, self.block_size, self.k = buffers, block_size, num_speculative_tokens
        self.min_n, self.max_n, self.device = min_n, max_n, device
        self.history: torch.Tensor | None = None
        """[B, C] each request's tokens (prompt and output), on the device; None between chains."""
        self.lengths: torch.Tensor | None = None
        """[B] how many tokens each row of ``history`` holds."""

    def start(self, token_ids: list[list[int]], capacity: int, size: int) -> None:
        """Begin a chain with each request's known tokens, in rows of ``capacity`` tokens, for
        verification graphs of ``size`` sequences: the sequences past the requests' are padding
        (as ``pad_verification`` makes them), written once for the whole chain."""
        rows = np.zeros((len(token_ids), capacity), dtype=np.int64)
        for row, tokens in zip(rows, token_ids):
            row[:len(tokens)] = tokens
        self.history = host_to_device(rows, torch.int64, self.device)
        self.lengths = host_to_device([len(tokens) for tokens in token_ids], torch.int64, self.device)
        batch, query_len, buffers = len(token_ids), 1 + self.k, self.buffers
        buffers.query_start_loc[:size + 1].copy_(torch.arange(size + 1, device=self.device) * query_len)
        buffers.input_ids[batch * query_len:size * query_len].fill_(0)
        buffers.positions[batch * query_len:size * query_len].fill_(0)
        buffers.slot_mapping[batch * query_len:size * query_len].fill_(-1)
        buffers.seq_lens[batch:size].fill_(query_len)
        buffers.block_table[batch:size].fill_(0)

    def stop(self) -> None:
        """A step launched from the host's state ends the chain: its histories go stale."""
        self.history = self.lengths = None

    @property
    def capacity(self) -> int:
        return 0 if self.history is None else self.history.shape[1]

    def advance(self, emitted: torch.Tensor, counts: torch.Tensor, block_table: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each request's emitted tokens (``emitted`` [B, W], the first ``counts[b]`` of row
        b) to its history, propose from it and write the next verification's inputs for the
        requests' rows (``block_table`` [B, width]: their blocks, covering the step's positions).
        Returns the proposals [B, k] and their counts [B]."""
        batch, width = emitted.shape
        columns = torch.arange(width, device=self.device)
        # Past a request's count the row holds -1: written past its new length, never read.
        self.history.scatter_(1, self.lengths.unsqueeze(1) + columns, emitted)
        self.lengths += counts
        drafts, num_drafts = propose_ngram_batched(self.history, self.lengths, self.k, self.min_n, self.max_n)
        query_len = 1 + self.k
        last = self.history.gather(1, (self.lengths - 1).unsqueeze(1))
        offsets = torch.arange(query_len, device=self.device)
        positions = (self.lengths - 1).unsqueeze(1) + offsets
        computed = offsets <= num_drafts.unsqueeze(1)
        tables = host_to_device(block_table, torch.int64, self.device)
        blocks = tables.gather(1, torch.where(computed, positions // self.block_size, 0))
        slots = torch.where(computed, blocks * self.block_size + positions % self.block_size, -1)
        rows = batch * query_len
        buffers = self.buffers
        buffers.input_ids[:rows].copy_(torch.where(computed, torch.cat([last, drafts], 1), 0).view(-1))
        buffers.positions[:rows].copy_(torch.where(computed, positions, 0).view(-1))
        buffers.slot_mapping[:rows].copy_(slots.view(-1))
        buffers.seq_lens[:batch].copy_(self.lengths - 1 + query_len)
        buffers.block_table[:batch, :block_table.shape[1]].copy_(tables)
        return drafts, num_drafts
