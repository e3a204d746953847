"""The engine core process: a busy loop that owns the model and the scheduler and runs nothing else.

It binds one inbox (PULL) that every API process pushes ``AddRequest``/``AbortRequests`` into,
and pushes to each API process's own outbox (PULL, bound by that process) one ``StepOutputs``
per step. It never waits on a client: its outgoing queues are unbounded and it blocks only when
it has no work. Liveness is a pipe: the core holds its only write end, every API process a read
end, so a core that dies in any way (killed, out of memory, a device error) shows up at once as
end-of-file in each API process.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

import zmq

from .args import EngineArgs
from .core import EngineCore
from .messages import (AbortRequests, AddRequest, ClientReady, EngineCoreOutput, Failed, Ready, StepOutputs,
                       decode_to_core, encode)
from .submit import add_samples

logger = logging.getLogger("runtime")

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def exit_with_parent(name: str) -> None:
    """Name this process (as ``ps -o comm`` and ``/proc/PID/comm`` show it) and have the kernel
    send it SIGTERM when its parent dies, so a killed server leaves no process behind. Linux
    only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, name.encode()[:15])
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class CoreConnection:
    """What one API process needs to reach the engine core (picklable into a spawned process)."""

    input_address: str
    output_address: str
    client: int
    """This API process's number: the core routes its requests' outputs to ``output_address``."""
    alive: Connection = field(repr=False)
    """Read end of the liveness pipe: readable (end-of-file) once the core process is gone."""


@dataclass
class EngineCoreHandle:
    """The spawned core process, as its parent sees it."""

    process: Any
    connections: list[CoreConnection]
    status: Connection = field(repr=False)
    """Receives ``Ready`` or ``Failed`` once, as the API processes do."""
    ipc_dir: tempfile.TemporaryDirectory = field(repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL; removes the socket files."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.status.close()
        self.ipc_dir.cleanup()


def start_engine_core(args: EngineArgs, num_clients: int = 1, build: Callable[[EngineArgs], EngineCore] = EngineCore,
                      log_level: Optional[str] = None) -> EngineCoreHandle:
    """Spawn the engine core process for ``num_clients`` API processes; returns at once (it loads in
    the background). ``build`` must be picklable (a module-level function or class)."""
    context = multiprocessing.get_context("spawn")
    ipc_dir = tempfile.TemporaryDirectory(prefix="runtime-ipc-")
    input_address = f"ipc://{ipc_dir.name}/input"
    outputs = [f"ipc://{ipc_dir.name}/output-{i}" for i in range(num_clients)]
    alive_reader, alive_writer = context.Pipe(duplex=False)
    status_reader, status_writer = context.Pipe(duplex=False)
    level = log_level or logging.getLevelName(logging.getLogger().level)
    # Not a daemon: it starts tensor-parallel workers of its own. Its parent stops it (stop()),
    # and the kernel does if the parent dies first (exit_with_parent).
    process = context.Process(target=run_engine_core, name="runtime-engine-core",
                              args=(args, build, input_address, outputs, alive_writer, status_writer, level))
    process.start()
    # The core must hold the only write end, or end-of-file would never come.
    alive_writer.close()
    status_writer.close()
    connections = [CoreConnection(input_address, address, i, alive_reader) for i, address in enumerate(outputs)]
    return EngineCoreHandle(process, connections, status_reader, ipc_dir)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def run_engine_core(args: EngineArgs, build: Callable[[EngineArgs], EngineCore], input_address: str,
                    output_addresses: list[str], alive: Connection, status: Connection, log_level: str) -> None:
    """The process's main: load the model, announce it, then step until terminated."""
    # runtime-core, or runtime-core-D for data-parallel rank D of several.
    exit_with_parent("runtime-core" if args.data_parallel_size == 1 else f"runtime-core-{args.data_parallel_rank}")
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches every process of the terminal's group: the API processes drain their
    # requests, so the core keeps stepping until its parent stops it (SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_exit)
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.bind(input_address)
    outboxes = []
    for address in output_addresses:
        outbox = context.socket(zmq.PUSH)
        outbox.setsockopt(zmq.SNDHWM, 0)  # unbounded: the core never blocks on a slow API process
        outbox.setsockopt(zmq.LINGER, 2000)
        outbox.connect(address)
        outboxes.append(outbox)

    def announce(message: Ready | Failed) -> None:
        data = encode(message)
        for outbox in outboxes:
            outbox.send(data)
        try:
            status.send(message)
        except OSError:
            pass  # the parent stopped listening; the API processes have the news

    try:
        try:
            core = build(args)
        except Exception as exc:  # noqa: BLE001  (any load failure is reported, then the process exits 1)
            logger.error("the model failed to load: %s", exc)
            announce(Failed(str(exc), while_loading=True))
            sys.exit(1)
        core.executor.exit_when_stuck = True
        _wait_for_clients(inbox, len(outboxes))
        # What exists now (the model, imported libraries: millions of objects) lives as long as the
        # process: keep it out of the collector's full passes, each of which would stall a step.
        gc.freeze()
        announce(Ready(max_model_len=core.max_model_len, vocab_size=core.runner.settings.vocab_size,
                       kernels=core.kernel_report))
        try:
            EngineCoreLoop(core, inbox, outboxes).run()
        except Exception as exc:  # noqa: BLE001
            logger.exception("the engine core died")
            announce(Failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, while_loading=False))
            sys.exit(1)
        finally:
            core.shutdown()
    finally:
        alive.close()
        context.destroy(linger=2000)


def _wait_for_clients(inbox: zmq.Socket, count: int) -> None:
    """Until every API process has its tokenizer (no request comes before: they are not ready)."""
    waiting = set(range(count))
    while waiting:
        message = decode_to_core(inbox.recv())
        if isinstance(message, ClientReady):
            waiting.discard(message.client)


class EngineCoreLoop:
    """Receive, step, publish: the core process's whole life after loading."""

    def __init__(self, core: EngineCore, inbox: zmq.Socket, outboxes: list[zmq.Socket]):
        self.core = core
        self.inbox = inbox
        self.outboxes = outboxes
        self._client_of: dict[str, int] = {}
        """Core-level request id -> the API process that owns it."""
        self._refused: list[list[tuple[str, str]]] = [[] for _ in outboxes]

    def run(self) -> None:
        core = self.core
        while True:
            # Block only when idle; otherwise take whatever has arrived and step.
            self._receive(block=not core.has_unfinished_requests())
            outputs = core.step() if core.has_unfinished_requests() else []
            self._publish(outputs)

    def _receive(self, block: bool) -> None:
        flags = 0 if block else zmq.NOBLOCK
        while True:
            try:
                data = self.inbox.recv(flags, copy=True)
            except zmq.Again:
                return
            self._handle(decode_to_core(data))
            flags = zmq.NOBLOCK

    def _handle(self, message: AddRequest | AbortRequests) -> None:
        if isinstance(message, AbortRequests):
            self.core.abort_requests(message.request_ids)
            for rid in message.request_ids:
                self._client_of.pop(rid, None)
            return
        try:
            ids = add_samples(self.core, message.request_id, message.prompt_token_ids, message.params,
                              message.priority, message.arrival_time, message.lora_request,
                              pooling=message.pooling, mm_inputs=message.mm_inputs)
        except ValueError as exc:
            self._refused[message.client].append((message.request_id, str(exc)))
            return
        for cid in ids:
            self._client_of[cid] = message.client

    def _publish(self, outputs: list[EngineCoreOutput]) -> None:
        per_client: list[list[EngineCoreOutput]] = [[] for _ in self.outboxes]
        client_of = self._client_of
        for out in outputs:
            client = client_of.get(out.request_id)
            if client is None:
                continue  # aborted while its step was in flight
            per_client[client].append(out)
            if out.finish_reason is not None:
                del client_of[out.request_id]
        stats = self.core.stats()
        for client, outbox in enumerate(self.outboxes):
            refused, self._refused[client] = self._refused[client], []
            outbox.send(encode(StepOutputs(per_client[client], stats, refused)), copy=True)
