"""``runtime serve``: a supervisor, one engine core process and N API server processes.

The supervisor (this process) binds the listening socket at once, spawns the engine core (the
model and the scheduler, engine/engine_process.py; one per ``--data-parallel-size`` rank, each
with its tensor-parallel workers) and ``--api-server-count`` API processes (Litestar on
uvicorn), which accept connections on that one shared socket and talk to every core over
ZeroMQ. It then only watches:

- every API process answers 503 (with Retry-After) on every ``/v1/*`` route and ``/health``
  until the model is loaded; the supervisor prints "ready" once all of them can serve;
- a model that fails to load stops everything; ``serve`` raises ValueError with the reason;
- the core dying (killed, out of memory, a device error): each API process notices at once
  (its liveness pipe closes), ends every in-flight stream with an error event and exits; the
  supervisor exits 1 within seconds, killing whatever is left;
- SIGTERM or SIGINT: the API processes stop accepting, let in-flight requests finish for up to
  ``shutdown_timeout`` seconds (then abort them) and exit; then the core is stopped; exit 0.

Children get SIGTERM from the kernel if the supervisor itself dies, so no process outlives it.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Optional, Sequence

from runtime.engine.args import EngineArgs
from runtime.engine.engine_process import CoreConnection, EngineCoreHandle, exit_with_parent, start_engine_core
from runtime.engine.messages import Failed, Ready
from runtime.lora import LoRARequest
from runtime.release import version_report

from .limits import MAX_BODY_BYTES
from .chat_tools import ChatParsing

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_AFTER_CORE_DEATH_S = 5.0
"""How long API processes get to fail their streams and exit after the core died."""
_LAST_WORDS_S = 1.0
"""How long a child's exit may precede the core's report of why it failed."""

logger = logging.getLogger("runtime")


def default_model_name(args: EngineArgs) -> str:
    """The name a model is served under without --served-model-name: the MODEL argument, as vLLM does."""
    return str(args.model) if args.model else EMBEDDED_MODEL_NAME


@dataclass
class ApiServerConfig:
    """Everything an API process needs besides its socket and its connection to the core."""

    args: EngineArgs
    model_names: list[str]
    api_key: Optional[str]
    max_queue_len: Optional[int]
    shutdown_timeout: float
    log_level: str
    lora_modules: list[LoRARequest] = field(default_factory=list)
    allow_runtime_lora_updating: bool = False
    tool_call_parser: Optional[str] = None
    enable_auto_tool_choice: bool = False
    max_request_body_bytes: int = MAX_BODY_BYTES
    lora_allowed_dirs: list[str] = field(default_factory=list)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket every API process accepts on (bound here so the port opens at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _exit_cleanly(signum: int, frame: object) -> None:
    # uvicorn handles SIGTERM while it runs, shuts down gracefully, then re-raises the signal so
    # the process ends as it would have; an orderly stop on SIGTERM is a success: exit 0.
    raise SystemExit(0)


def run_api_server(config: ApiServerConfig, sock: socket.socket, connections: list[CoreConnection]) -> None:
    """An API process's main: the app on uvicorn, on the shared socket, until told to stop or
    until a core dies (then exit status 1). ``connections``: one per data-parallel engine core."""
    exit_with_parent(f"runtime-api-{connections[0].client}")
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import uvicorn

    from runtime.engine.async_engine import AsyncEngine

    from .app import create_app

    engine = AsyncEngine(config.args, max_queue_len=config.max_queue_len, connections=connections)
    app = create_app(engine, config.model_names, config.api_key, config.lora_modules,
                     config.allow_runtime_lora_updating, config.tool_call_parser, config.enable_auto_tool_choice,
                     config.max_request_body_bytes, config.lora_allowed_dirs)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level=config.log_level.lower(),
                                           timeout_graceful_shutdown=config.shutdown_timeout, lifespan="on"))
    died = []

    def on_death() -> None:
        died.append(engine.error)
        server.should_exit = True

    engine.on_death(on_death)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run(sockets=[sock])
    if died:
        # The supervisor may see this process exit before the core's own report: say why here.
        print(f"runtime serve: error: {died[0]}", file=sys.stderr, flush=True)
        sys.exit(1)


class Supervisor:
    """Starts the processes of ``runtime serve`` and watches them until the server stops."""

    def __init__(self, config: ApiServerConfig, host: str, port: int, api_server_count: int):
        if api_server_count < 1:
            raise ValueError(f"--api-server-count must be >= 1, got {api_server_count}")
        self.config = config
        self.url = f"http://{host}:{port}"
        self.sock = bind_socket(host, port)
        self.count = api_server_count
        self.stopping = False
        self.cores: list[EngineCoreHandle] = []
        self.api: list = []
        self.metrics_dir = tempfile.TemporaryDirectory(prefix="runtime-metrics-")

    def run(self) -> int:
        name = self.config.model_names[0]
        # Request metrics are summed over the API processes through these files (api/metrics.py);
        # set before the children start, as prometheus_client reads it at import.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir.name
        context = multiprocessing.get_context("spawn")
        args = self.config.args
        self.cores = [start_engine_core(dataclasses.replace(args, data_parallel_rank=rank), self.count,
                                       log_level=self.config.log_level.upper())
                      for rank in range(args.data_parallel_size)]
        self.api = [context.Process(target=run_api_server, name=f"runtime-api-{client}", daemon=True,
                                    args=(self.config, self.sock, [core.connections[client] for core in self.cores]))
                    for client in range(self.count)]
        for process in self.api:
            process.start()
        self.sock.close()  # the API processes hold it now
        for core in self.cores:
            core.connections[0].alive.close()
        print("\n".join(version_report()), file=sys.stderr)
        print(f"runtime serve: listening on {self.url}; loading {name}", file=sys.stderr, flush=True)
        logger.info("serving %s as %s", self.config.args.model or "the embedded model", ", ".join(self.config.model_names))
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_all()
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            self.metrics_dir.cleanup()

    def _stop(self, signum: int, frame: object) -> None:
        """SIGTERM/SIGINT: the API processes drain and exit; the watch loop then stops the core."""
        self.stopping = True
        for process in self.api:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def _watch(self) -> int:
        """Wait for the children's news until the server stops; returns the exit status."""
        statuses = {core.status: core for core in self.cores}
        exits = {**{core.process.sentinel: core for core in self.cores}, **{p.sentinel: i for i, p in enumerate(self.api)}}
        ready = 0
        while True:
            for item in wait([*exits, *statuses]):
                if item in statuses:
                    try:
                        message = item.recv()
                    except (EOFError, OSError):
                        del statuses[item]
                        continue
                    if isinstance(message, Failed) and message.while_loading:
                        raise ValueError(f"the model failed to load: {message.message}")
                    if isinstance(message, Ready):
                        ready += 1
                        if ready == 1:
                            print(f"runtime serve: {message.kernels}", file=sys.stderr, flush=True)
                    if ready == len(self.cores) and not self.stopping:
                        print(f"runtime serve: {self.config.model_names[0]} ready at {self.url}/v1",
                              file=sys.stderr, flush=True)
                    continue
                who = exits.pop(item)
                # The sentinel closes as the child exits, a moment before it can be reaped.
                (who.process if isinstance(who, EngineCoreHandle) else self.api[who]).join(5)
                api_left = [w for w in exits.values() if isinstance(w, int)]
                if self.stopping and not api_left:
                    return 0
                if isinstance(who, EngineCoreHandle) or not self.stopping:
                    return self._after_failure(who)

    def _after_failure(self, who: "EngineCoreHandle | int") -> int:
        """A child exited unexpectedly: the cores' last words say whether the model failed to load."""
        for core in self.cores:
            try:
                message = core.status.recv() if core.status.poll(_LAST_WORDS_S) else None
            except (EOFError, OSError):  # closed: it said nothing more
                message = None
            if isinstance(message, Failed) and message.while_loading:
                raise ValueError(f"the model failed to load: {message.message}")
        if isinstance(who, EngineCoreHandle):
            rank = f" {self.cores.index(who)}" if len(self.cores) > 1 else ""
            print(f"runtime serve: error: the engine core process{rank} died (exit code {who.process.exitcode}); "
                  f"in-flight requests ended with an error; stopping", file=sys.stderr, flush=True)
            deadline = time.monotonic() + _AFTER_CORE_DEATH_S
            for process in self.api:
                process.join(max(0.0, deadline - time.monotonic()))
        else:
            print(f"runtime serve: error: API process {who} exited with {self.api[who].exitcode}; stopping",
                  file=sys.stderr, flush=True)
        return 1

    def _stop_all(self) -> None:
        for process in self.api:
            if process.is_alive():
                process.terminate()
        for process in self.api:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
        for core in self.cores:
            core.stop()


def check_lora_flags(args: EngineArgs, names: list[str], lora_modules: list[LoRARequest],
                     allow_runtime_lora_updating: bool, api_server_count: int,
                     lora_allowed_dirs: Sequence[str] = ()) -> None:
    """Refuse LoRA flags that cannot work, and adapters that do not fit the model, before starting."""
    if (lora_modules or allow_runtime_lora_updating) and not args.enable_lora:
        flag = "--lora-modules" if lora_modules else "--allow-runtime-lora-updating"
        raise ValueError(f"{flag} needs --enable-lora")
    if allow_runtime_lora_updating and api_server_count > 1:
        raise ValueError("--allow-runtime-lora-updating works with one API process: each would keep its own "
                         "adapter table; drop --api-server-count or load adapters with --lora-modules")
    if lora_allowed_dirs and not allow_runtime_lora_updating:
        raise ValueError("--lora-allowed-dirs confines /v1/load_lora_adapter: it needs --allow-runtime-lora-updating")
    for directory in lora_allowed_dirs:
        if not os.path.isdir(directory):
            raise ValueError(f"--lora-allowed-dirs {directory} is not a directory")
    if allow_runtime_lora_updating and not lora_allowed_dirs:
        logger.warning("/v1/load_lora_adapter loads adapters from any directory this server can read; "
                       "confine it with --lora-allowed-dirs")
    if not lora_modules:
        return
    from runtime.loader.source import open_model
    from runtime.lora.adapter import load_adapter
    from runtime.models import decoder_settings

    settings = decoder_settings(open_model(args.model, args.load_format).hf_config)
    for adapter in lora_modules:
        if adapter.lora_name in names:
            raise ValueError(f"--lora-modules name {adapter.lora_name!r} is the model's own name; choose another")
        load_adapter(adapter.lora_name, adapter.lora_int_id, adapter.lora_path, settings, args.max_lora_rank)


def serve(args: EngineArgs, host: str = "127.0.0.1", port: int = 8000, model_names: Optional[list[str]] = None,
          api_key: Optional[str] = None, max_queue_len: Optional[int] = None, shutdown_timeout: float = 30.0,
          log_level: str = "warning", api_server_count: int = 1, lora_modules: Optional[list[LoRARequest]] = None,
          allow_runtime_lora_updating: bool = False, tool_call_parser: Optional[str] = None,
          enable_auto_tool_choice: bool = False, max_request_body_bytes: int = MAX_BODY_BYTES,
          lora_allowed_dirs: Sequence[str] = ()) -> int:
    """Serve until SIGINT or SIGTERM (exit status 0) or the engine core's death (1).

    ``lora_modules``: LoRA adapters served under their names (``--lora-modules``);
    ``allow_runtime_lora_updating`` adds /v1/load_lora_adapter and /v1/unload_lora_adapter, which
    load only from under ``lora_allowed_dirs`` (``--lora-allowed-dirs``) when given.
    ``max_request_body_bytes`` (``--max-request-body-bytes``): larger bodies are a 413.
    ``tool_call_parser`` (``--tool-call-parser``) reads the calls of ``tool_choice`` auto, which
    needs ``enable_auto_tool_choice`` (``--enable-auto-tool-choice``).
    Raises ValueError when the model or an adapter fails to load, the address cannot be bound
    or the tool flags do not go together.
    """
    names = model_names or [default_model_name(args)]
    lora_modules = lora_modules or []
    check_lora_flags(args, names, lora_modules, allow_runtime_lora_updating, api_server_count, lora_allowed_dirs)
    if max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be >= 1, got {max_request_body_bytes}")
    ChatParsing(args.reasoning_parser, tool_call_parser, enable_auto_tool_choice)  # refuse bad flags before starting
    config = ApiServerConfig(args, names, api_key, max_queue_len, shutdown_timeout, log_level, lora_modules,
                             allow_runtime_lora_updating, tool_call_parser, enable_auto_tool_choice,
                             max_request_body_bytes, list(lora_allowed_dirs))
    return Supervisor(config, host, port, api_server_count).run()
