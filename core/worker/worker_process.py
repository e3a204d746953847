"""A worker: rank r of an engine's ranks, replaying rank 0's steps (worker/mirror.py).

It joins the process group, builds its share of the model (its tensor-parallel slice of its
pipeline stage's layers) exactly as rank 0 builds its own (worker/setup.py), then runs each
step it is sent until told to stop. It exits with its parent (the engine core), and when a
collective fails (a peer died) it exits non-zero.
"""

from __future__ import annotations

import logging
import signal
import sys
from datetime import timedelta

import torch.distributed as dist
import zmq

from ..platform import get_registry
from .mirror import WORKER_READY, Launch, Stop, StepMirror, decode
from .progress import RankProgress
from .setup import RunnerPlan, build_runner, join_groups

logger = logging.getLogger("runtime")


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def worker_device_index(platform, plan: RunnerPlan, rank: int) -> int:
    """One device per rank on devices that have several; every rank shares the CPU."""
    return 0 if platform.device_type == "cpu" else plan.first_device + rank


def run_worker(plan: RunnerPlan, rank: int, dist_address: str, step_address: str, results_address: str,
               timeout_s: float, log_level: int, name_process: bool = True, device_index: int | None = None,
               progress: RankProgress | None = None) -> None:
    """The worker's main: a spawned process, or a Ray actor's call (``name_process`` False; Ray
    shows the actor its own device as ``device_index`` 0). The last pipeline stage's first rank
    sends each step's results to ``results_address``; every worker first sends ``WORKER_READY``
    there. ``progress`` (mp workers) is where it notes its steps and heartbeat for rank 0."""
    if name_process:
        from ..engine.engine_process import exit_with_parent

        exit_with_parent(f"runtime-rank-{rank}")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _raise_exit)
    logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s (rank {rank}): %(message)s")
    registry = get_registry()
    platform = registry.select_platform(plan.device)
    context = zmq.Context()
    steps = context.socket(zmq.PULL)
    steps.setsockopt(zmq.LINGER, 0)
    steps.connect(step_address)
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 0)
    results.connect(results_address)
    # Rank 0 starts the rendezvous only once every worker is this far (imports done), so that
    # --distributed-timeout bounds collectives, not how long a loaded machine takes to spawn us.
    results.send(WORKER_READY)
    try:
        dist.init_process_group(platform.dist_backend, init_method=dist_address, rank=rank,
                                world_size=plan.world_size, timeout=timedelta(seconds=timeout_s))
        place = join_groups(registry, platform, plan, rank)
        if device_index is None:
            device_index = worker_device_index(platform, plan, rank)
        runner, _, _ = build_runner(plan, registry, platform, place=place, device_index=device_index)
        send_result = results.send if place.pp.size > 1 and place.pp.is_last and place.tp.rank == 0 else None
        mirror = StepMirror(runner, plan.max_model_len, send_result)
        if progress is not None:
            progress.keep_beating(rank)
        while True:
            message = decode(steps.recv())
            if isinstance(message, Stop):
                return
            if progress is not None and isinstance(message, Launch):
                progress.started(rank, message.step)
            mirror.handle(message)
    except Exception:  # noqa: BLE001  (rank 0 names this rank when its own collective fails)
        logger.exception("worker rank %d failed", rank)
        sys.exit(1)
    finally:
        context.destroy(linger=0)
        if dist.is_initialized():
            dist.destroy_process_group()
