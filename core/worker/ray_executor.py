"""``--distributed-executor-backend ray``: the workers (ranks 1..N-1) as Ray actors.

The same worker code as the mp executor (worker_process.run_worker) runs inside one actor per
rank beyond the first, each placed by a Ray placement group (one bundle a rank: a CPU, or a GPU
where the platform has devices), on this machine or anywhere in the Ray cluster the engine
joins: ``RAY_ADDRESS`` or a running local instance (``ray start --head``), else a fresh local
one. Rank 0 stays in the engine core process and sends each step over TCP, as the mp executor
does over a local socket. The actors are owned by the engine core: Ray ends them with it.
"""

from __future__ import annotations

import logging
from typing import Any

from .executor import MultiprocExecutor

logger = logging.getLogger("runtime")


class _RayWorkers:
    """The actors and their running calls, with what the executor's watch and shutdown need."""

    def __init__(self, actors: list, calls: list, placement_group: Any):
        self.actors, self.calls, self.placement_group = actors, calls, placement_group


class _RankActor:
    """One rank beyond the first (wrapped by ray.remote when the executor starts)."""

    def run(self, *args: Any) -> None:
        from .worker_process import run_worker

        run_worker(*args)


class RayExecutor(MultiprocExecutor):
    """Rank 0 here, ranks 1..N-1 as Ray actors."""

    def __init__(self, *args: Any, **kwargs: Any):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("--distributed-executor-backend ray needs Ray: pip install ray") from None
        super().__init__(*args, backend="ray", **kwargs)

    def _start_workers(self, plan, dist_address: str, addresses: list[str], results_address: str,
                       timeout_s: float) -> list:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(address="auto" if _ray_running() else None, logging_level=logging.WARNING,
                     log_to_driver=True, include_dashboard=False)
        gpu = self.platform.device_type != "cpu"
        bundles = [{"GPU": 1, "CPU": 1} if gpu else {"CPU": 1} for _ in addresses]
        group = placement_group(bundles, strategy="PACK")
        ray.get(group.ready(), timeout=timeout_s)

        actor_class = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0)(_RankActor)
        actors, calls = [], []
        for rank in range(1, self.world_size):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank - 1)
            actor = actor_class.options(scheduling_strategy=strategy).remote()
            actors.append(actor)
            # Ray gives each actor its own visible device: device 0 there.
            calls.append(actor.run.remote(plan, rank, dist_address, addresses[rank - 1], results_address, timeout_s,
                                          logging.getLogger().level, False, 0))
        self._ray = _RayWorkers(actors, calls, group)
        return []

    def _watch(self) -> None:
        import ray

        calls = self._ray.calls
        done, _ = ray.wait(calls, num_returns=1)
        if self._stopping:
            return
        rank = calls.index(done[0]) + 1
        try:
            ray.get(done[0])
            reason = "returned"
        except Exception as exc:  # noqa: BLE001  (the actor died or its call raised: both end the engine)
            reason = f"failed: {type(exc).__name__}"
        self._failure = f"worker rank {rank} (Ray actor) {reason}"
        logger.error("%s", self._failure)

    def _ended_worker(self) -> str | None:
        import ray

        done, _ = ray.wait(self._ray.calls, num_returns=1, timeout=0)
        return f"worker rank {self._ray.calls.index(done[0]) + 1} (Ray actor) ended" if done else None

    def _named(self, exc: BaseException) -> BaseException:
        return RuntimeError(f"{self._failure}: {exc}") if self._failure else exc

    def shutdown(self) -> None:
        super().shutdown()
        import ray

        for actor in getattr(getattr(self, "_ray", None), "actors", []):
            ray.kill(actor)
        if getattr(self, "_ray", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._ray.placement_group)


def _ray_running() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
