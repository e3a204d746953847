"""Which rank stalled: each worker notes in shared memory the step it has started and a
heartbeat, so that rank 0, when a collective times out, can name the rank that stopped
(a frozen process stops beating; a rank that never started the step everyone waits in is
behind) instead of only reporting the timeout it saw. Only for workers on this machine (mp)."""

from __future__ import annotations

import threading
import time
from typing import Any

_BEAT_S = 0.2


class RankProgress:
    """Per rank: the last step it started and a heartbeat count (two int64 slots each)."""

    def __init__(self, context: Any, world_size: int):
        self._slots = context.Array("q", 2 * world_size, lock=False)
        self.world_size = world_size

    def started(self, rank: int, step: int) -> None:
        self._slots[2 * rank] = step

    def keep_beating(self, rank: int) -> None:
        """Beat from a daemon thread for as long as this process runs Python."""
        def beat() -> None:
            while True:
                self._slots[2 * rank + 1] += 1
                time.sleep(_BEAT_S)

        threading.Thread(target=beat, name="runtime-heartbeat", daemon=True).start()

    def stalled(self, current_step: int) -> list[str]:
        """What is wrong with each worker rank that stopped: no heartbeat over a few beats, or
        not started on ``current_step`` (the step rank 0 is in)."""
        before = [self._slots[2 * r + 1] for r in range(self.world_size)]
        time.sleep(3 * _BEAT_S)
        problems = []
        for rank in range(1, self.world_size):
            if self._slots[2 * rank + 1] == before[rank]:
                problems.append(f"worker rank {rank} stopped responding (no heartbeat)")
            elif self._slots[2 * rank] < current_step:
                problems.append(f"worker rank {rank} never started step {current_step} (it is at step "
                                f"{self._slots[2 * rank]})")
        return problems
