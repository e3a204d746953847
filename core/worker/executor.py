"""Executors: how the engine core's steps reach every rank.

``LocalExecutor`` runs the one rank in the engine core's own process. ``MultiprocExecutor``
(``--distributed-executor-backend mp``) is rank 0 of an engine whose other ranks (tensor-parallel
ranks, later pipeline stages) are worker processes on this machine (worker/worker_process.py):
each step it sends them the step (worker/mirror.py) over ZeroMQ, then runs its own share; the
ranks' collectives meet inside the model, the stages hand on hidden states between them. With
several stages, the last one's first rank sends back what each step produced.
``RayExecutor`` (``ray``) places the same workers as Ray actors.

A worker that dies, or a collective that stalls past ``--distributed-timeout``, ends the engine
with an error naming the rank; the workers exit with the engine core (they are its children, or
Ray actors it owns).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Optional

import torch.distributed as dist
import zmq

from ..platform import Platform, Registry
from ..sched.scheduler import SchedulerOutput
from ..structured.bitmask import GrammarBitmask
from .mirror import WORKER_READY, Collect, Stop, StepSender, decode_result, encode
from .progress import RankProgress
from .model_runner import PendingStep, RunnerOutput
from .setup import RunnerPlan, build_runner, join_groups

logger = logging.getLogger("runtime")

_HUNG_AFTER_DEATH_S = 10.0
"""How long the engine core may stay stuck (in a collective) after a worker died before it exits."""

_WORKER_START_S = 300.0
"""How long workers may take to start (spawn, imports) at least: a loaded machine is slow at it."""

_NAMING_WAIT_S = 2.0
"""How long an error of a step waits to learn whether a worker died or stalled, to name it."""
_WATCH_TICK_S = 1.0
"""How often the watcher looks for a worker that stopped answering while rank 0 waits for a step."""


class LocalExecutor:
    """One rank, in this process."""

    world_size = 1

    def __init__(self, plan: RunnerPlan, registry: Registry, platform: Platform, source: Any = None):
        self.driver, self.num_blocks, self.activation_bytes = build_runner(plan, registry, platform, source,
                                                                           device_index=plan.first_device)

    def launch(self, out: SchedulerOutput, previous: Optional[PendingStep] = None,
               grammar: Optional[GrammarBitmask] = None, sample: bool = True) -> Optional[PendingStep]:
        return self.driver.launch(out, previous, grammar, sample)

    def sample(self, pending: PendingStep, grammar: Optional[GrammarBitmask]) -> None:
        self.driver.sample(pending, grammar)

    def collect(self, pending: Optional[PendingStep]) -> RunnerOutput:
        return self.driver.collect(pending)

    def shutdown(self) -> None:
        pass

    def describe(self) -> str:
        return f"1 rank ({self.driver.device})"


class MultiprocExecutor:
    """Rank 0 here, ranks 1..N-1 in worker processes (``_start_workers``)."""

    def __init__(self, plan: RunnerPlan, registry: Registry, platform: Platform, source: Any = None,
                 backend: str = "mp", timeout_s: float = 300.0):
        self.world_size = plan.world_size
        self.plan = plan
        self.backend = backend
        self.timeout_s = timeout_s
        self.platform = platform
        self._dir = tempfile.TemporaryDirectory(prefix="runtime-workers-")
        self._zmq = zmq.Context()
        self._sockets = []
        addresses = []
        for rank in range(1, self.world_size):
            sock = self._zmq.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            address = self._bind(sock, rank)
            self._sockets.append(sock)
            addresses.append(address)
        self._results = self._zmq.socket(zmq.PULL)
        self._results.setsockopt(zmq.LINGER, 0)
        results_address = self._bind(self._results, "results")
        dist_address = f"tcp://{_host_for(backend)}:{_free_port()}"
        self._failure: Optional[str] = None
        self._waiting_since: Optional[float] = None
        """When rank 0 began to wait for its share of the step in flight (None while not waiting)."""
        self._progress: Optional[RankProgress] = None
        """Set by ``_start_workers`` where the workers can share memory with this process."""
        self._sender = StepSender()
        self._workers = self._start_workers(plan, dist_address, addresses, results_address, timeout_s)
        try:
            self._await_workers(max(timeout_s, _WORKER_START_S))
            dist.init_process_group(platform.dist_backend, init_method=dist_address, rank=0,
                                    world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
            place = join_groups(registry, platform, plan, 0)
            self.driver, self.num_blocks, self.activation_bytes = build_runner(plan, registry, platform, source, place,
                                                                               device_index=plan.first_device)
        except Exception as exc:
            self.shutdown()
            raise self._named(exc) from None
        self._watcher = threading.Thread(target=self._watch, name="runtime-worker-watch", daemon=True)
        self._watcher.start()

    # -- steps ------------------------------------------------------------------------------

    def launch(self, out: SchedulerOutput, previous: Optional[PendingStep] = None,
               grammar: Optional[GrammarBitmask] = None, sample: bool = True) -> Optional[PendingStep]:
        message, step = self._sender.launch(out, previous, grammar, sample)
        self._broadcast(encode(message))
        try:
            pending = self.driver.launch(out, previous, grammar, sample)
        except Exception as exc:
            raise self._named(exc) from None
        if pending is not None:
            self._sender.name(pending, step)
        return pending

    def sample(self, pending: PendingStep, grammar: Optional[GrammarBitmask]) -> None:
        """Every rank samples a step launched with ``sample=False`` (one pipeline stage only)."""
        self._broadcast(encode(self._sender.sample(pending, grammar)))
        try:
            self.driver.sample(pending, grammar)
        except Exception as exc:
            raise self._named(exc) from None

    def collect(self, pending: Optional[PendingStep]) -> RunnerOutput:
        if pending is None:
            return self.driver.collect(None)
        message = self._sender.collect(pending)
        if self.plan.pipeline_parallel_size > 1:
            self._collect_own_share(pending)  # the first stage's send is done
            result = self._receive_result(message.step)
            self._broadcast(encode(Collect(message.step, result.sampled)))
            return result
        self._broadcast(encode(message))
        return self._collect_own_share(pending)

    def _collect_own_share(self, pending: PendingStep) -> RunnerOutput:
        self._waiting_since = time.monotonic()
        try:
            result = self.driver.collect(pending)
        except Exception as exc:
            raise self._named(exc) from None
        finally:
            self._waiting_since = None
        if self._failure is not None:
            # A rank died or stopped while this step ran: its collectives were aborted
            # (_abort_collectives), so what it computed is not to be used.
            raise RuntimeError(self._failure)
        return result

    def _receive_result(self, step: int) -> RunnerOutput:
        """What the last pipeline stage computed for ``step`` (it sends steps in launch order)."""
        deadline = time.monotonic() + self.timeout_s
        while not self._results.poll(100):
            if self._failure is not None:
                raise RuntimeError(self._failure)
            if time.monotonic() > deadline:
                last = self.world_size - self.plan.tensor_parallel_size
                raise self._named(RuntimeError(f"the last pipeline stage (rank {last}) sent no result for step {step} "
                                               f"in {self.timeout_s:g} s (--distributed-timeout)"))
        result = decode_result(self._results.recv())
        if result.step != step:
            raise RuntimeError(f"the last pipeline stage sent step {result.step}, expected {step}")
        return result.output()

    def _broadcast(self, data: bytes) -> None:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        for rank, sock in enumerate(self._sockets, start=1):
            try:
                # Unbounded queues: a send fails only when the worker is no longer connected.
                sock.send(data, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                raise self._named(RuntimeError(f"rank {rank} stopped receiving steps")) from None

    # -- workers ----------------------------------------------------------------------------

    def _bind(self, sock: zmq.Socket, name: Any) -> str:
        if self.backend == "mp":
            address = f"ipc://{self._dir.name}/steps-{name}"
            sock.bind(address)
            return address
        port = sock.bind_to_random_port(f"tcp://{_host_for(self.backend)}")
        return f"tcp://{_host_for(self.backend)}:{port}"

    def _start_workers(self, plan: RunnerPlan, dist_address: str, addresses: list[str], results_address: str,
                       timeout_s: float) -> list:
        from .worker_process import run_worker

        context = multiprocessing.get_context("spawn")
        self._progress = RankProgress(context, self.world_size)
        workers = []
        for rank, address in enumerate(addresses, start=1):
            process = context.Process(target=run_worker, name=f"runtime-worker-{rank}", daemon=True,
                                      args=(plan, rank, dist_address, address, results_address, timeout_s,
                                            logging.getLogger().level, True, None, self._progress))
            process.start()
            workers.append(process)
        return workers

    def _await_workers(self, timeout_s: float) -> None:
        """Wait for every worker's ``WORKER_READY``, failing at once if one ends before it."""
        waiting, deadline = self.world_size - 1, time.monotonic() + timeout_s
        while waiting:
            if self._results.poll(100):
                message = self._results.recv()
                if message != WORKER_READY:
                    raise RuntimeError(f"a worker sent {message[:40]!r} before the others started")
                waiting -= 1
                continue
            ended = self._ended_worker()
            if ended is not None:
                self._failure = ended
                raise RuntimeError("it ended before joining the process group (its error is logged above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{waiting} of {self.world_size - 1} workers did not start within {timeout_s:g} s")

    def _ended_worker(self) -> Optional[str]:
        """How the first worker that has already ended did so, or None."""
        dead = [(rank, p) for rank, p in enumerate(self._workers, start=1) if not p.is_alive()]
        return _worker_exit(*dead[0]) if dead else None

    exit_when_stuck = False
    """Set by the engine core process: a step still waiting for a dead or stopped worker a grace
    period after the watcher named it ends the process (its API processes then fail every request).
    In a user's process (the offline LLM) the step raises instead: its collectives time out (gloo)
    or are aborted (NCCL, ``_abort_collectives``)."""

    def _watch(self) -> None:
        """Name a dead worker, or one that stopped answering while rank 0 has waited for a step
        longer than the collectives' timeout; see ``exit_when_stuck``."""
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._workers, start=1)}
        ready, problems = [], []
        while not ready and not problems:
            ready = wait(list(sentinels), timeout=_WATCH_TICK_S)
            if self._stopping:
                return
            waiting = self._waiting_since
            if not ready and waiting is not None and time.monotonic() - waiting > self.timeout_s:
                # gloo's collectives time out by themselves; NCCL's replayed from a graph never do.
                problems = self._stalled()
        if ready:
            rank = sentinels[ready[0]]
            # A rank that froze makes the others' collectives time out and exit: name it first.
            problems = self._stalled() + [_worker_exit(rank, self._workers[rank - 1])]
        self._failure = "; ".join(problems)
        logger.error("%s", self._failure)
        self._abort_collectives()
        time.sleep(_HUNG_AFTER_DEATH_S)
        if self.exit_when_stuck and not self._stopping:
            logger.error("the engine is still waiting after %.0f s (%s); exiting", _HUNG_AFTER_DEATH_S, self._failure)
            os._exit(1)

    def _abort_collectives(self) -> None:
        """End this process's collectives that wait on a dead or stopped rank. gloo's fail by themselves; an
        NCCL kernel waits for ever, and NCCL's watchdog, which aborts it after the timeout, does not
        watch collectives replayed from a CUDA graph (every decode step's), so rank 0 would wait in
        such a step for ever. Not yet seen on several GPUs (issue 21's test_multi_gpu.py)."""
        if self.platform.dist_backend != "nccl" or not dist.is_initialized():
            return
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception as exc:  # an experimental torch API; the step then fails only if NCCL's watchdog ends it
            logger.warning("could not abort the NCCL communicators (%s): %s", self._failure, exc)

    _stopping = False

    def _stalled(self) -> list[str]:
        if self._progress is None or self._sender.latest is None:
            return []
        return [problem for problem in self._progress.stalled(self._sender.latest)
                if not any(f"rank {rank} " in problem for rank, p in enumerate(self._workers, 1) if not p.is_alive())]

    def _named(self, exc: BaseException) -> BaseException:
        """``exc`` with the rank that caused it named: a worker that died, or one that stalled."""
        # A killed worker's sockets close a moment before its process can be reaped, so the error
        # of a collective with it can come first: wait for the watcher's news, or for the death.
        deadline = time.monotonic() + _NAMING_WAIT_S
        while self._failure is None and time.monotonic() < deadline and all(p.is_alive() for p in self._workers):
            time.sleep(0.05)
        if self._failure is None:
            ended = self._ended_worker()
            problems = self._stalled() + ([ended] if ended else [])
            if problems:
                self._failure = "; ".join(problems)
        return RuntimeError(f"{self._failure}: {exc}") if self._failure else exc

    def shutdown(self) -> None:
        self._stopping = True
        for sock in self._sockets:
            try:
                sock.send(encode(Stop()), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for process in self._workers:
            process.join(5)
            if process.is_alive():
                process.kill()  # also ends a stopped or stuck worker
                process.join(5)
        self._zmq.destroy(linger=0)
        if dist.is_initialized():
            dist.destroy_process_group()
        else:
            # torch counts the default group before its rendezvous; after a failed one the next
            # engine in this process would name its groups one off from its fresh workers' and hang.
            dist.distributed_c10d._world.group_count = 0
        self._dir.cleanup()

    def describe(self) -> str:
        first = self.plan.first_device
        devices = ("every rank on the CPU" if self.platform.device_type == "cpu" else
                   f"ranks 0-{self.world_size - 1} on {self.platform.device_type}:{first}-{first + self.world_size - 1}")
        return (f"tensor parallel {self.plan.tensor_parallel_size} x pipeline parallel "
                f"{self.plan.pipeline_parallel_size} = {self.world_size} ranks ({self.backend} executor; {devices})")


def _worker_exit(rank: int, process: Any) -> str:
    """What ended worker ``rank``: its sentinel closes a moment before its exit status can be read."""
    deadline = time.monotonic() + 2.0
    while process.exitcode is None and time.monotonic() < deadline:
        process.join(0.05)
    return f"worker rank {rank} (pid {process.pid}) exited with code {process.exitcode}"


def _host_for(backend: str) -> str:
    return "127.0.0.1" if backend == "mp" else socket.gethostbyname(socket.gethostname())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_executor(plan: RunnerPlan, registry: Registry, platform: Platform, source: Any = None,
                  backend: Optional[str] = None, timeout_s: float = 300.0):
    """The executor for ``plan``: local for one rank, else ``backend`` (mp or ray)."""
    if plan.world_size == 1:
        return LocalExecutor(plan, registry, platform, source)
    backend = backend or "mp"
    if backend == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(plan, registry, platform, source, timeout_s=timeout_s)
    if backend != "mp":
        raise ValueError(f"--distributed-executor-backend {backend!r} is not one of mp, ray")
    return MultiprocExecutor(plan, registry, platform, source, timeout_s=timeout_s)
