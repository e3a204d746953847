"""The step's flat inputs in tensors allocated once, and host-to-device copies that do not wait.

A step writes its token ids, positions, slots and block table into pinned host staging and
copies them into device tensors that live as long as the engine: nothing is allocated per step,
the copies queue behind the previous step's work instead of waiting for it, and a captured
decode graph reads the very tensors each step writes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..platform import AttentionMetadata


@functools.cache
def asynchronous_copies(device: torch.device) -> bool:
    """Whether host-device copies to ``device`` run asynchronously from pinned memory and are
    ordered by events: where ``device`` is torch's current accelerator (CUDA, ROCm). Devices torch
    does not pin for (XLA, whose copies are part of the traced step) copy from plain host memory."""
    if device.type == "cpu":
        return False
    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None and accelerator.is_available() else None
    return current is not None and current.type == device.type


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor on ``device`` from host values, copied without a host-device sync.

    Pinned memory comes from torch's caching host allocator, which keeps a block until the copy
    that reads it has finished, so the source may go out of scope at once.
    """
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    if not asynchronous_copies(device):
        return torch.tensor(values, dtype=dtype).to(device)
    # ``torch.tensor(..., pin_memory=True)`` refuses numpy arrays; pinning a plain copy takes both.
    return torch.as_tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


_ALIGN = 8
"""Columns start at multiples of this in a packed buffer: a typed view of a byte tensor needs its
offset to be a multiple of the element size (at most 8 here)."""


def pack_columns(columns: list[tuple[list, torch.dtype]]) -> tuple[torch.Tensor, list[tuple[int, int, torch.dtype]]]:
    """Host values of several dtypes in one uint8 tensor: the tensor and each column's (byte
    offset, length, dtype) in it."""
    parts, places, offset = [], [], 0
    for values, dtype in columns:
        data = torch.as_tensor(values, dtype=dtype).reshape(-1).view(torch.uint8)
        pad = -data.numel() % _ALIGN
        parts += [data, torch.zeros(pad, dtype=torch.uint8)]
        places.append((offset, data.numel() // dtype.itemsize, dtype))
        offset += data.numel() + pad
    return torch.cat(parts), places


def unpack_columns(packed: torch.Tensor, places: list[tuple[int, int, torch.dtype]]) -> list[torch.Tensor]:
    """The columns of a :func:`pack_columns` buffer as typed views of it (on its device)."""
    return [packed[offset:offset + count * dtype.itemsize].view(dtype) for offset, count, dtype in places]


def host_to_device_columns(columns: list[tuple[list, torch.dtype]], device: torch.device) -> list[torch.Tensor]:
    """:func:`host_to_device` of several small columns in one copy: each copy from the host costs
    a pinned staging block and a launch of its own, several of them for a sampling step's settings."""
    if not asynchronous_copies(device):
        return [host_to_device(values, dtype, device) for values, dtype in columns]
    packed, places = pack_columns(columns)
    return unpack_columns(packed.pin_memory().to(device, non_blocking=True), places)


@dataclass
class StepInputs:
    """One step's inputs on the host, unpadded: what the scheduler asked for."""

    input_ids: np.ndarray
    """[T] int64."""
    positions: np.ndarray
    """[T] int64."""
    slot_mapping: np.ndarray
    """[T] int64."""
    query_start_loc: np.ndarray
    """[B+1] int64."""
    seq_lens: np.ndarray
    """[B] int64."""
    block_table: np.ndarray
    """[B, W] int64, padded with 0."""


def step_inputs(input_ids: np.ndarray, starts, counts, block_tables, block_size: int) -> StepInputs:
    """The flat inputs of sequences that each compute ``counts[i]`` tokens from position
    ``starts[i]``, with their KV blocks ``block_tables[i]``."""
    starts, counts = np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    query_start = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=query_start[1:])
    total = int(query_start[-1])
    row_of_token = np.repeat(np.arange(len(counts)), counts)
    positions = np.arange(total) - query_start[row_of_token] + starts[row_of_token]
    block_table = np.zeros((len(counts), max(len(t) for t in block_tables)), dtype=np.int64)
    for i, table in enumerate(block_tables):
        block_table[i, :len(table)] = table
    slots = block_table[row_of_token, positions // block_size] * block_size + positions % block_size
    return StepInputs(input_ids, positions, slots, query_start, starts + counts, block_table)


class _Staged:
    """Pinned host memory and the device tensor it is copied to (the same tensor on the CPU).

    Two host halves, used in turn: a step may be prepared while the previous one's copy is
    still queued (look-ahead decoding), so it must not overwrite the memory that copy reads.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self.size = size
        on_host = device.type == "cpu"
        self.device = torch.zeros(size, dtype=dtype, device=device)
        self.asynchronous = asynchronous_copies(device)
        hosts = [self.device] if on_host else [torch.zeros(size, dtype=dtype, pin_memory=self.asynchronous)
                                               for _ in range(2)]
        self._hosts = [(host, host.numpy()) for host in hosts]
        self._turn = 0

    def next_host_array(self) -> np.ndarray:
        """The host memory the next :meth:`upload` copies from."""
        self._turn = (self._turn + 1) % len(self._hosts)
        return self._hosts[self._turn][1]

    def upload(self, end: int) -> None:
        """Copy the first ``end`` elements: one transfer, queued behind earlier device work."""
        host = self._hosts[self._turn][0]
        if host is not self.device:
            # A whole-buffer copy takes no view: XLA cannot version a view made under inference mode.
            target, source = (self.device, host) if end == self.size else (self.device[:end], host[:end])
            target.copy_(source, non_blocking=self.asynchronous)


class InputBuffers:
    """Owns the persistent input tensors of a runner: at most ``max_tokens`` tokens in
    ``max_seqs`` sequences of at most ``max_blocks_per_seq`` KV blocks.

    Two flat buffers, so a step is two host-to-device copies whatever its size: the token inputs
    (ids, positions, slots; int64) and the sequence inputs (query starts, lengths and the block
    table; int32), laid out so the part a step uses is a prefix.
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device):
        self.max_tokens, self.max_seqs, self.width = max_tokens, max_seqs, max_blocks_per_seq
        self.tokens = _Staged(3 * max_tokens, torch.int64, device)
        self.seqs = _Staged(2 * max_seqs + 1 + max_seqs * max_blocks_per_seq, torch.int32, device)
        t, n = max_tokens, max_seqs
        # Token inputs: [slots | ids | positions], so a step's slots, ids and positions are read
        # from the front of each third.
        self.slot_mapping = self.tokens.device[:t]
        self.input_ids = self.tokens.device[t:2 * t]
        self.positions = self.tokens.device[2 * t:]
        self.query_start_loc = self.seqs.device[:n + 1]
        self.seq_lens = self.seqs.device[n + 1:2 * n + 1]
        self._table_start = 2 * n + 1
        self.block_table = self.seqs.device[self._table_start:].view(n, max_blocks_per_seq)

    def load(self, step: StepInputs, padded_seqs: int | None = None, max_seq_len: int | None = None,
             static_shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Copy ``step`` to the device; returns (input ids, positions, attention metadata).

        ``padded_seqs`` (a decode step for a captured graph) pads the batch to that many
        one-token sequences: padding tokens write no K/V (slot -1) and attend to one key of the
        null block. The tensors returned then cover the padded batch, and ``max_seq_len`` (the
        capture's bound) replaces the step's own.

        ``static_shape`` (tokens, sequences), a static-shape bucket: the step padded to exactly
        that many tokens and sequences at the block table's full width, so every step of a bucket
        has the same shapes. Padding tokens (slot -1) follow the last sequence's; padding
        sequences have no new tokens and one key of the null block.
        """
        if static_shape is not None:
            return self._load_static(step, *static_shape)
        tokens, seqs = len(step.input_ids), len(step.seq_lens)
        rows = padded_seqs or seqs
        width = step.block_table.shape[1]
        padded_tokens = tokens + rows - seqs
        slots, ids, positions, query_start, seq_lens, table = self._write_step(step)
        if rows > seqs:
            ids[tokens:padded_tokens], positions[tokens:padded_tokens], slots[tokens:padded_tokens] = 0, 0, -1
            query_start[seqs + 1:rows + 1] = np.arange(tokens + 1, padded_tokens + 1)
            seq_lens[seqs:rows] = 1
            table[seqs:rows, 0] = 0
        self.tokens.upload(2 * self.max_tokens + padded_tokens)
        self.seqs.upload(self._table_start + rows * self.width)
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[:rows + 1], seq_lens=self.seq_lens[:rows],
            block_table=self.block_table[:rows, :width], slot_mapping=self.slot_mapping[:padded_tokens],
            max_query_len=int(np.max(np.diff(query_start[:rows + 1]))),
            max_seq_len=max_seq_len or int(seq_lens[:rows].max()),
            query_start_loc_cpu=query_start[:rows + 1].tolist(), seq_lens_cpu=seq_lens[:rows].tolist())
        return self.input_ids[:padded_tokens], self.positions[:padded_tokens], meta

    def _write_step(self, step: StepInputs) -> tuple[np.ndarray, ...]:
        """Write the step's own rows into the next host staging; returns its views (slots, ids,
        positions, query starts, sequence lengths, block table) for the caller's padding."""
        tokens, seqs = len(step.input_ids), len(step.seq_lens)
        t, n = self.max_tokens, self.max_seqs
        token_host, seq_host = self.tokens.next_host_array(), self.seqs.next_host_array()
        slots, ids, positions = token_host[:t], token_host[t:2 * t], token_host[2 * t:]
        query_start, seq_lens = seq_host[:n + 1], seq_host[n + 1:2 * n + 1]
        table = seq_host[self._table_start:].reshape(n, self.width)
        ids[:tokens], positions[:tokens], slots[:tokens] = step.input_ids, step.positions, step.slot_mapping
        query_start[:seqs + 1], seq_lens[:seqs] = step.query_start_loc, step.seq_lens
        table[:seqs, :step.block_table.shape[1]] = step.block_table
        return slots, ids, positions, query_start, seq_lens, table

    def _load_static(self, step: StepInputs, padded_tokens: int,
                     rows: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        tokens, seqs = len(step.input_ids), len(step.seq_lens)
        slots, ids, positions, query_start, seq_lens, table = self._write_step(step)
        ids[tokens:padded_tokens], positions[tokens:padded_tokens], slots[tokens:padded_tokens] = 0, 0, -1
        query_start[seqs + 1:rows + 1], seq_lens[seqs:rows] = tokens, 1
        table[:seqs, step.block_table.shape[1]:], table[seqs:rows] = 0, 0
        self.tokens.upload(self.tokens.size)
        self.seqs.upload(self.seqs.size)
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[:rows + 1], seq_lens=self.seq_lens[:rows],
            block_table=self.block_table[:rows], slot_mapping=self.slot_mapping[:padded_tokens],
            max_query_len=int(np.max(np.diff(step.query_start_loc))), max_seq_len=int(np.max(step.seq_lens)),
            query_start_loc_cpu=query_start[:rows + 1].tolist(), seq_lens_cpu=seq_lens[:rows].tolist())
        return self.input_ids[:padded_tokens], self.positions[:padded_tokens], meta

    def full_width_block_table(self, rows: int) -> torch.Tensor:
        """The device block table's first ``rows`` rows at full width: what a graph is captured
        with, so any later step's table (copied into its leading columns) is read in place."""
        return self.block_table[:rows]
