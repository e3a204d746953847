"""What a step's structured output hands the runner: which logit rows to mask, and how; and the
host buffers those masks are filled into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..worker.input_buffers import asynchronous_copies, host_to_device


@dataclass
class GrammarBitmask:
    """The allowed tokens of a step's constrained logit rows: bit ``v % 32`` of word ``v // 32``
    of ``bitmask[i]`` is set when token v may follow at logits row ``rows[i]`` (the rows of the
    step's sampled positions, in the runner's order)."""

    rows: list[int]
    bitmask: torch.Tensor
    """[len(rows), ceil(V / 32)] int32, on the host (pinned where the device copies from pinned memory)."""

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(bitmask, rows) on ``device``, copied without a host-device sync; a pinned bitmask
        is copied straight from its buffer."""
        rows = host_to_device(self.rows, torch.int64, device)
        if device.type == "cpu":
            return self.bitmask, rows
        if not asynchronous_copies(device):
            return self.bitmask.to(device), rows
        source = self.bitmask if self.bitmask.is_pinned() else self.bitmask.pin_memory()
        return source.to(device, non_blocking=True), rows


class BitmaskBuffers:
    """Host buffers for the steps' masks, reused instead of allocated each step (a batch-64
    Llama-3 mask is 1 MiB). Pinned where the device copies asynchronously from pinned memory,
    so the copy reads the buffer itself. ``depth`` buffers take turns: a buffer is written again
    only after ``depth - 1`` other steps' masks, by which time the step that read it has been
    collected (its copy is done). A buffer holds ``rows`` (the most a step can constrain) from the
    start, so a growing batch does not allocate pinned memory step after step; a step that needs
    more grows it."""

    def __init__(self, words: int, depth: int, pin_memory: bool, rows: int = 0):
        self.words = words
        self.pin_memory = pin_memory
        self.rows = rows
        self._buffers: list[Optional[torch.Tensor]] = [None] * depth
        self._turn = 0

    def take(self, rows: int) -> torch.Tensor:
        """A [rows, words] int32 host tensor whose contents the caller overwrites."""
        turn, self._turn = self._turn, (self._turn + 1) % len(self._buffers)
        buffer = self._buffers[turn]
        if buffer is None or buffer.shape[0] < rows:
            self.rows = max(rows, self.rows)
            buffer = torch.empty((self.rows, self.words), dtype=torch.int32, pin_memory=self.pin_memory)
            self._buffers[turn] = buffer
        return buffer[:rows]
