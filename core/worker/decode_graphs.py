"""Decode steps replayed from device graphs captured at start-up.

A decode step of a large model launches hundreds of small kernels; from Python each launch
costs several microseconds of host time, which at batch 1 is more than the GPU needs to read
the weights. A graph records one step's launches once and replays them in one call. Shapes are
fixed per graph, so one is captured per batch size of a ladder and a step of ``n`` sequences
replays the smallest one that holds it, padded (see :meth:`InputBuffers.load`).

Attention is captured planned for the longest context (``max_model_len``); a backend's launch
then covers any shorter one, its device code reading the real lengths from ``seq_lens``.

With speculative decoding (k proposed tokens per request) a second ladder is captured for
verification steps, every sequence padded to 1 + k query tokens (see verify_batch.py); the
attention launch is planned for that query length, and a mixed step (prompt chunks) runs eagerly.

With LoRA enabled every size is captured twice: with the LoRA path on (each projection's
``lora_add`` reads the step's per-token slots) and off (no LoRA kernel at all). A step replays
the first only when one of its tokens has an adapter (``LoRASlots.active``), so serving the base
model costs what it does with LoRA disabled.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import logging
import time
from typing import Any, Callable

import numpy as np
import torch

from ..models.batch import ForwardBatch
from ..platform import Platform
from .input_buffers import InputBuffers, StepInputs

logger = logging.getLogger("runtime")

MAX_CAPTURE_SIZE = 512


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to ``max_batch`` (rounded up to the ladder)."""
    ladder = [1, 2, 4] + list(range(8, MAX_CAPTURE_SIZE + 1, 8))
    top = bisect.bisect_left(ladder, min(max_batch, MAX_CAPTURE_SIZE))
    return ladder[:top + 1]


def _dummy_step(num_seqs: int, query_len: int) -> StepInputs:
    """``num_seqs`` sequences of ``query_len`` tokens that write nothing (their keys are read
    through the block table at capture, whatever it holds; nothing reads the outputs)."""
    tokens = num_seqs * query_len
    return StepInputs(input_ids=np.zeros(tokens, dtype=np.int64), positions=np.zeros(tokens, dtype=np.int64),
                      slot_mapping=np.full(tokens, -1, dtype=np.int64),
                      query_start_loc=np.arange(num_seqs + 1, dtype=np.int64) * query_len,
                      seq_lens=np.full(num_seqs, query_len, dtype=np.int64),
                      block_table=np.zeros((num_seqs, 1), dtype=np.int64))


@dataclasses.dataclass
class _Graph:
    replay: Callable[[], None]
    hidden: torch.Tensor
    batch: ForwardBatch
    """Kept alive: launch plans in its metadata own workspaces the graph reads and writes."""


class DecodeGraphs:
    """One captured forward pass (input ids -> final hidden states) per ladder batch size and
    query length (1, and 1 + k with ``num_speculative_tokens`` k), and per LoRA state when
    ``lora`` (the runner's ``LoRASlots``) is given."""

    def __init__(self, platform: Platform, model: Callable[[ForwardBatch], torch.Tensor], buffers: InputBuffers,
                 kv_caches: list[torch.Tensor], max_model_len: int, max_batch: int, lora: Any = None,
                 num_speculative_tokens: int = 0):
        self.platform, self.model, self.buffers = platform, model, buffers
        self.kv_caches, self.max_model_len = kv_caches, max_model_len
        self.lora = lora
        self.sizes = capture_sizes(min(max_batch, buffers.max_seqs, buffers.max_tokens))
        """The decode ladder (one token per sequence)."""
        self.ladders: dict[int, list[int]] = {1: self.sizes}
        """Captured batch sizes by query tokens per sequence."""
        if num_speculative_tokens:
            query_len = 1 + num_speculative_tokens
            # The padded step must fit the input buffers, sized for the step budget and the decode ladder.
            self.ladders[query_len] = [size for size in self.sizes if size * query_len <= buffers.max_tokens]
        self.graphs: dict[tuple[int, int, bool], _Graph] = {}
        """By (batch size, query tokens per sequence, captured with the LoRA path on)."""
        self.replays: collections.Counter[tuple[int, int]] = collections.Counter()
        """Replays by (batch size, query tokens per sequence), for tests and logs."""

    def capture(self) -> None:
        """Capture every shape, most tokens first so the smaller graphs reuse its pool memory."""
        start = time.perf_counter()
        pool = self.platform.graph_pool()
        lora_states = (False, True) if self.lora is not None else (False,)
        shapes = sorted(((size, query_len) for query_len, sizes in self.ladders.items() for size in sizes),
                        key=lambda shape: -shape[0] * shape[1])
        for size, query_len in shapes:
            for with_lora in lora_states:
                if self.lora is not None:
                    self.lora.active = with_lora
                # A batch of its own per graph: launch plans in its metadata own what the graph reads.
                input_ids, positions, meta = self.buffers.load(_dummy_step(size, query_len),
                                                               max_seq_len=self.max_model_len)
                meta = dataclasses.replace(meta, block_table=self.buffers.full_width_block_table(size))
                batch = ForwardBatch(input_ids, positions, meta, self.kv_caches)
                self.model(batch)  # compiles kernels and plans launches outside the capture
                replay, hidden = self.platform.capture_graph(functools.partial(self.model, batch), pool)
                self.graphs[size, query_len, with_lora] = _Graph(replay, hidden, batch)
        if self.lora is not None:
            self.lora.active = False
        self.platform.synchronize()
        verify = [f"{len(sizes)} of {query_len} tokens per sequence" for query_len, sizes in self.ladders.items()
                  if query_len > 1 and sizes]
        logger.info("captured decode graphs for %d batch sizes (1 to %d)%s%s in %.1f s", len(self.sizes),
                    self.sizes[-1], "".join(f", verification graphs for {v} batch sizes" for v in verify),
                    ", with and without LoRA," if self.lora is not None else "", time.perf_counter() - start)

    def size_for(self, num_seqs: int, query_len: int = 1) -> int | None:
        """The captured batch size a step of ``num_seqs`` sequences of ``query_len`` tokens each
        runs at, or None (eager)."""
        sizes = self.ladders.get(query_len, [])
        index = bisect.bisect_left(sizes, num_seqs)
        return sizes[index] if index < len(sizes) and self.graphs else None

    def output(self, size: int, query_len: int) -> torch.Tensor:
        """The hidden states [size * query_len, H] that each replay of that graph (without the
        LoRA path) rewrites, for work captured to follow it."""
        return self.graphs[size, query_len, False].hidden

    def run(self, size: int, query_len: int = 1) -> torch.Tensor:
        """Replay the graph of ``size`` sequences of ``query_len`` tokens on what
        :meth:`InputBuffers.load` last copied (the one with the LoRA path when the step has
        adapted tokens); hidden [size * query_len, H]."""
        graph = self.graphs[size, query_len, self.lora is not None and self.lora.active]
        self.replays[size, query_len] += 1
        graph.replay()
        return graph.hidden
