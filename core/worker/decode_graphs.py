"""Decode steps replayed from device graphs captured at start-up.

A decode step of a large model launches hundreds of small kernels; from Python each launch
costs several microseconds of host time, which at batch 1 is more than the GPU needs to read
the weights. A graph records one step's launches once and replays them in one call. Shapes are
fixed per graph, so one is captured per batch size of a ladder and a step of ``n`` sequences
replays the smallest one that holds it, padded (see :meth:`InputBuffers.load`).

Attention is captured planned for the longest context (``max_model_len``); a backend's launch
then covers any shorter one, its device code reading the real lengths from ``seq_lens``.

With LoRA enabled every size is captured twice: with the LoRA path on (each projection's
``lora_add`` reads the step's per-token slots) and off (no LoRA kernel at all). A step replays
the first only when one of its tokens has an adapter (``LoRASlots.active``), so serving the base
model costs what it does with LoRA disabled.
"""

from __future__ import annotations

import bisect
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


def _dummy_decode(num_seqs: int) -> StepInputs:
    """``num_seqs`` one-token sequences that write nothing and read the null block."""
    ones = np.ones(num_seqs, dtype=np.int64)
    return StepInputs(input_ids=np.zeros(num_seqs, dtype=np.int64), positions=np.zeros(num_seqs, dtype=np.int64),
                      slot_mapping=-ones, query_start_loc=np.arange(num_seqs + 1, dtype=np.int64), seq_lens=ones,
                      block_table=np.zeros((num_seqs, 1), dtype=np.int64))


@dataclasses.dataclass
class _Graph:
    replay: Callable[[], None]
    hidden: torch.Tensor
    batch: ForwardBatch
    """Kept alive: launch plans in its metadata own workspaces the graph reads and writes."""


class DecodeGraphs:
    """One captured forward pass (input ids -> final hidden states) per ladder batch size, and
    per LoRA state when ``lora`` (the runner's ``LoRASlots``) is given."""

    def __init__(self, platform: Platform, model: Callable[[ForwardBatch], torch.Tensor], buffers: InputBuffers,
                 kv_caches: list[torch.Tensor], max_model_len: int, max_batch: int, lora: Any = None):
        self.platform, self.model, self.buffers = platform, model, buffers
        self.kv_caches, self.max_model_len = kv_caches, max_model_len
        self.lora = lora
        self.sizes = capture_sizes(min(max_batch, buffers.max_seqs, buffers.max_tokens))
        self.graphs: dict[tuple[int, bool], _Graph] = {}
        """By (batch size, captured with the LoRA path on)."""

    def capture(self) -> None:
        """Capture every size, largest first so the smaller graphs reuse its pool memory."""
        start = time.perf_counter()
        pool = self.platform.graph_pool()
        lora_states = (False, True) if self.lora is not None else (False,)
        for size in reversed(self.sizes):
            for with_lora in lora_states:
                if self.lora is not None:
                    self.lora.active = with_lora
                # A batch of its own per graph: launch plans in its metadata own what the graph reads.
                input_ids, positions, meta = self.buffers.load(_dummy_decode(size), max_seq_len=self.max_model_len)
                meta = dataclasses.replace(meta, block_table=self.buffers.full_width_block_table(size))
                batch = ForwardBatch(input_ids, positions, meta, self.kv_caches)
                self.model(batch)  # compiles kernels and plans launches outside the capture
                replay, hidden = self.platform.capture_graph(functools.partial(self.model, batch), pool)
                self.graphs[size, with_lora] = _Graph(replay, hidden, batch)
        if self.lora is not None:
            self.lora.active = False
        self.platform.synchronize()
        logger.info("captured decode graphs for %d batch sizes (1 to %d)%s in %.1f s", len(self.sizes),
                    self.sizes[-1], ", with and without LoRA," if self.lora is not None else "",
                    time.perf_counter() - start)

    def size_for(self, num_seqs: int) -> int | None:
        """The captured batch size a decode step of ``num_seqs`` sequences runs at, or None (eager)."""
        index = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[index] if index < len(self.sizes) and self.graphs else None

    def run(self, size: int) -> torch.Tensor:
        """Replay the graph of ``size`` on what :meth:`InputBuffers.load` last copied (the one with
        the LoRA path when the step has adapted tokens); hidden [size, H]."""
        graph = self.graphs[size, self.lora is not None and self.lora.active]
        graph.replay()
        return graph.hidden
