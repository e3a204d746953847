"""A test hook: a device running out of memory in the middle of serving, on any platform.

``RUNTIME_INJECT_OOM_AT_STEP=N`` in the engine core's environment makes its N-th step (counting
from 1 once the engine serves; start-up profiling is not a step) raise ``torch.OutOfMemoryError``,
the error a device allocation that fails raises, from where a step's allocations happen. The
reliability tests use it to check what an operator sees then (docs/reliability.md): every client
gets an error, nothing hangs, the server exits 1 naming the error. Unset, it costs one
comparison a step.
"""

from __future__ import annotations

import os

import torch

ENV = "RUNTIME_INJECT_OOM_AT_STEP"


class StepFaults:
    """Counts an engine's steps and fails the one ``RUNTIME_INJECT_OOM_AT_STEP`` names."""

    def __init__(self) -> None:
        value = os.environ.get(ENV)
        try:
            self.fail_at = int(value) if value else 0
        except ValueError:
            raise ValueError(f"{ENV}={value!r} is not a step number") from None
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.fail_at:
            raise torch.OutOfMemoryError(f"out of memory in step {self.steps} (injected by {ENV})")
