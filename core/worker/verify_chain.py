"""Verification steps launched one behind the other, with no read-back in between.

A verification step's next inputs depend on how many proposals it accepts, so the engine used to
wait for its tokens, apply them, propose and launch the next step, with the device idle all the
while (about 0.85 ms a step at batch 8 on an H100, docs/speculative.md). Where every request is
greedy and proposes by n-gram, the next verification is made on the device instead: the tokens
each request emitted are appended to its token history there, the n-gram proposer runs on that
history (the ``propose_ngram_batched`` op), and the next step's token ids, positions, KV slots and sequence
lengths are written into the input buffers that the verification graph reads. The host learns
what was proposed and accepted one step later, when it reads the step back.

The step's shape is that of a padded verification (``verify_batch.pad_verification``): each
request computes its last token and its proposals in a run of 1 + k rows, and the rows past its
proposals write no K/V (slot -1) and are never accepted, so the tokens are those of the same
step run eagerly.

That device work is some 65 small operations a step (about 35 where the platform's n-gram search
is one kernel); launched one by one they cost the host more than the step they were meant to hide
(1.5-1.75 ms a chained step on an H100's host, where the device's step takes about 1.1 ms). So they run as two captured graphs around the
verification graph: one before it (history, proposals, inputs) and one after it (logits, argmax,
acceptance), per batch size and history width, captured the first time a chain needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .decode_graphs import DecodeGraphs
from .input_buffers import InputBuffers, host_to_device


@dataclass
class _Chain:
    """The device state of chains of one batch size and history width, and their two graphs."""

    history: torch.Tensor
    """[B, C] each request's tokens (prompt and output)."""
    lengths: torch.Tensor
    """[B] how many tokens each row of ``history`` holds."""
    emitted: torch.Tensor
    """[B, 1 + k] the tokens the last step emitted for each request (-1 past its count)."""
    counts: torch.Tensor
    """[B] how many."""
    tables: torch.Tensor
    """[B, W] the requests' block tables (W: the input buffers' width)."""
    drafts: torch.Tensor
    """[B, k] the proposals the next step verifies."""
    num_drafts: torch.Tensor
    """[B] how many of them each request has."""
    limits: torch.Tensor
    """[B] how many each request may have: k, or 0 while it pauses its proposals (back-off)."""
    prepare: Callable[[], None] | None = None
    finish: Callable[[], None] | None = None
    results: torch.Tensor | None = None
    """What ``finish`` writes: the emitted tokens, their counts, the proposals and their counts, flat."""


class VerificationChain:
    """Owner of the device state of chained verification steps (see the module's text)."""

    def __init__(self, platform: Any, buffers: InputBuffers, block_size: int, num_speculative_tokens: int,
                 min_n: int, max_n: int, device: torch.device, logits: Callable[[torch.Tensor], torch.Tensor],
                 graphs: DecodeGraphs, propose: Callable[..., tuple[torch.Tensor, torch.Tensor]]):
        """``logits``: the model's hidden states -> logits; ``graphs``: the runner's decode and
        verification graphs; ``propose``: the platform's ``propose_ngram_batched`` op."""
        self.platform, self.buffers, self.block_size, self.k = platform, buffers, block_size, num_speculative_tokens
        self.min_n, self.max_n, self.device = min_n, max_n, device
        self._logits, self._graphs, self._propose = logits, graphs, propose
        self._chains: dict[tuple[int, int, int], _Chain] = {}
        """By (batch, history width, graph size)."""
        self._pool = platform.graph_pool()
        self.current: _Chain | None = None
        """The running chain's state; None between chains."""
        self._size = 0
        self._uploaded: np.ndarray | None = None
        """The block tables last copied to ``current.tables``."""
        self._limits: np.ndarray | None = None
        """The limits last copied to ``current.limits``."""

    @property
    def capacity(self) -> int:
        return 0 if self.current is None else self.current.history.shape[1]

    def begin(self, token_ids: list[list[int]], capacity: int, size: int, emitted: torch.Tensor,
              counts: torch.Tensor) -> None:
        """Begin a chain: each request's known tokens (in rows of ``capacity``), the tokens the
        step in flight emits for each (``emitted`` [B, W], the first ``counts[b]`` of row b, on
        the device), for verification graphs of ``size`` sequences. The sequences past the
        requests' are padding (as ``pad_verification`` makes them), written once for the chain."""
        batch, query_len = len(token_ids), 1 + self.k
        chain = self._chains.get((batch, capacity, size))
        if chain is None:
            chain = self._chains[batch, capacity, size] = self._capture(batch, capacity, size)
        rows = np.zeros((batch, capacity), dtype=np.int64)
        for row, tokens in zip(rows, token_ids):
            row[:len(tokens)] = tokens
        chain.history.copy_(host_to_device(rows, torch.int64, self.device))
        chain.lengths.copy_(host_to_device([len(tokens) for tokens in token_ids], torch.int64, self.device))
        chain.emitted.fill_(-1)
        chain.emitted[:, :emitted.shape[1]].copy_(emitted)
        chain.counts.copy_(counts)
        buffers = self.buffers
        buffers.query_start_loc[:size + 1].copy_(torch.arange(size + 1, device=self.device) * query_len)
        buffers.input_ids[batch * query_len:size * query_len].fill_(0)
        buffers.positions[batch * query_len:size * query_len].fill_(0)
        buffers.slot_mapping[batch * query_len:size * query_len].fill_(-1)
        buffers.seq_lens[batch:size].fill_(query_len)
        buffers.block_table[batch:size].fill_(0)
        self.current, self._size, self._uploaded, self._limits = chain, size, None, None

    def stop(self) -> None:
        """A step launched from the host's state ends the chain: its histories go stale."""
        self.current = None

    def step(self, block_table: np.ndarray, limits: np.ndarray) -> torch.Tensor:
        """Queue the next verification of the running chain, its requests' blocks in
        ``block_table`` [B, <= W] (covering the step's positions), each request's proposals
        capped at ``limits`` [B]. Returns its results on the device, flat: the emitted tokens
        [B, 1 + k] (-1 past each count), their counts [B], the proposals verified [B, k] and
        their counts [B]."""
        chain = self.current
        if self._uploaded is None or not np.array_equal(self._uploaded, block_table):
            chain.tables[:, :block_table.shape[1]].copy_(host_to_device(block_table, torch.int64, self.device))
            self._uploaded = block_table
        if self._limits is None or not np.array_equal(self._limits, limits):
            chain.limits.copy_(host_to_device(limits, torch.int64, self.device))
            self._limits = limits
        chain.prepare()
        self._graphs.run(self._size, 1 + self.k)
        chain.finish()
        return chain.results

    def _capture(self, batch: int, capacity: int, size: int) -> _Chain:
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=self.device)  # noqa: E731
        query_len = 1 + self.k
        chain = _Chain(zeros(batch, capacity), zeros(batch), zeros(batch, query_len), zeros(batch),
                       zeros(batch, self.buffers.width), zeros(batch, self.k), zeros(batch), zeros(batch))
        # A first run of each compiles their kernels before the capture: on the zeroed state,
        # which begin() overwrites; the inputs they write are rewritten before any graph reads them.
        chain.lengths.fill_(1)
        prepare = lambda: self._prepare(chain)  # noqa: E731
        prepare()
        chain.prepare, _ = self.platform.capture_graph(prepare, self._pool)
        hidden = self._graphs.output(size, query_len)
        finish = lambda: self._finish(chain, hidden)  # noqa: E731
        finish()
        chain.finish, chain.results = self.platform.capture_graph(finish, self._pool)
        return chain

    def _prepare(self, chain: _Chain) -> torch.Tensor:
        """Append each request's emitted tokens to its history, propose from it and write the
        next verification's inputs for the requests' rows."""
        batch, width = chain.emitted.shape
        device = self.device
        # Past a request's count the row holds -1: written past its new length, never read.
        chain.history.scatter_(1, chain.lengths.unsqueeze(1) + torch.arange(width, device=device), chain.emitted)
        chain.lengths += chain.counts
        drafts, num_drafts = self._propose(chain.history, chain.lengths, self.k, self.min_n, self.max_n)
        num_drafts = torch.minimum(num_drafts, chain.limits)
        chain.drafts.copy_(drafts)
        chain.num_drafts.copy_(num_drafts)
        query_len = 1 + self.k
        last = chain.history.gather(1, (chain.lengths - 1).unsqueeze(1))
        offsets = torch.arange(query_len, device=device)
        positions = (chain.lengths - 1).unsqueeze(1) + offsets
        computed = offsets <= num_drafts.unsqueeze(1)
        blocks = chain.tables.gather(1, torch.where(computed, positions // self.block_size, 0))
        slots = torch.where(computed, blocks * self.block_size + positions % self.block_size, -1)
        rows = batch * query_len
        buffers = self.buffers
        buffers.input_ids[:rows].copy_(torch.where(computed, torch.cat([last, drafts], 1), 0).view(-1))
        buffers.positions[:rows].copy_(torch.where(computed, positions, 0).view(-1))
        buffers.slot_mapping[:rows].copy_(slots.view(-1))
        buffers.seq_lens[:batch].copy_(chain.lengths - 1 + query_len)
        buffers.block_table[:batch].copy_(chain.tables)
        return num_drafts

    def _finish(self, chain: _Chain, hidden: torch.Tensor) -> torch.Tensor:
        """Each request's argmax on its rows, matched against its proposals: the tokens it emits
        (accepted proposals and the one after them), kept for the next step and returned flat
        with the proposals."""
        batch, query_len = chain.emitted.shape
        device = self.device
        argmax = self._logits(hidden[:batch * query_len]).argmax(-1).view(batch, query_len)
        proposed = torch.arange(self.k, device=device) < chain.num_drafts.unsqueeze(1)
        accepted = ((argmax[:, :self.k] == chain.drafts) & proposed).long().cumprod(1).sum(1)
        chain.emitted.copy_(torch.where(torch.arange(query_len, device=device) <= accepted.unsqueeze(1), argmax, -1))
        chain.counts.copy_(accepted + 1)
        return torch.cat([chain.emitted.view(-1), chain.counts, chain.drafts.view(-1), chain.num_drafts])
