"""Engine builders with faults, for tests that run them in a spawned engine core process (so they
live at module level, where pickling finds them)."""

from __future__ import annotations

import time
from pathlib import Path

from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore


def build_when_released(release: Path, args: EngineArgs) -> EngineCore:
    """Load only once the file ``release`` exists (use with functools.partial)."""
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return EngineCore(args)


def build_failing_after_three_steps(args: EngineArgs) -> EngineCore:
    """An engine whose fourth step raises, as a device error would."""
    core = EngineCore(args)
    steps = iter(range(3))

    def step():
        next(steps)  # StopIteration after three steps: the engine loop dies
        return EngineCore.step(core)

    core.step = step
    return core
