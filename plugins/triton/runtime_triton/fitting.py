"""Launching a tiled kernel on a GPU with less shared memory than the one its plan was tuned on."""

from __future__ import annotations

from typing import Callable, Hashable, Optional

from triton.runtime.errors import OutOfResources


def launch_fitting(fitted: dict, key: Hashable, plan: dict, launch: Callable[[dict], None],
                   smaller: Callable[[dict], Optional[dict]]) -> None:
    """``launch(plan)``; where the compiled plan asks for more shared memory than this GPU has
    (Triton's OutOfResources, raised at compile time, before anything runs), ``launch`` of the next
    ``smaller(plan)`` until one fits, remembered in ``fitted`` under ``key`` so that later launches
    start from it. Raises the last OutOfResources when ``smaller`` has nothing left (None)."""
    plan = fitted.get(key, plan)
    while True:
        try:
            launch(plan)
            return
        except OutOfResources:
            plan = smaller(plan)
            if plan is None:
                raise
            fitted[key] = plan


def fewer_stages_then_shallower(k_key: str, min_k: int) -> Callable[[dict], Optional[dict]]:
    """``smaller`` for :func:`launch_fitting` over plans whose K depth is ``plan[k_key]``: one
    pipeline stage fewer, then (at one stage) half the K depth, down to ``min_k``, with two stages."""
    def smaller(plan: dict) -> Optional[dict]:
        if plan["num_stages"] > 1:
            return {**plan, "num_stages": plan["num_stages"] - 1}
        if plan[k_key] > min_k:
            return {**plan, k_key: plan[k_key] // 2, "num_stages": 2}
        return None
    return smaller
