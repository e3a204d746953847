"""``runtime serve``: the app on uvicorn, the engine loading in the background.

The socket opens at once and ``/health`` answers 503 until the model is loaded; a model that
fails to load stops the server with the reason. SIGTERM stops accepting connections, lets
in-flight requests finish for up to ``shutdown_timeout`` seconds (then aborts them), stops the
engine and exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Optional

import uvicorn

from runtime.engine.args import EngineArgs
from runtime.engine.async_engine import AsyncEngine, EngineDeadError

from .app import create_app

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_name(args: EngineArgs) -> str:
    """The name a model is served under without --served-model-name: the MODEL argument, as vLLM does."""
    return str(args.model) if args.model else EMBEDDED_MODEL_NAME


def _exit_cleanly(signum: int, frame: object) -> None:
    # uvicorn handles SIGTERM while it runs, shuts down gracefully, then re-raises the signal so
    # the process ends as it would have; an orderly stop on SIGTERM is a success: exit 0.
    raise SystemExit(0)


def serve(args: EngineArgs, host: str = "127.0.0.1", port: int = 8000, model_names: Optional[list[str]] = None,
          api_key: Optional[str] = None, max_queue_len: Optional[int] = None, shutdown_timeout: float = 30.0,
          log_level: str = "warning") -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status. Raises ValueError when the model fails to load."""
    names = model_names or [default_model_name(args)]
    engine = AsyncEngine(args, max_queue_len=max_queue_len)
    app = create_app(engine, names, api_key)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level.lower(),
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    server = uvicorn.Server(config)

    def report_when_loaded() -> None:
        try:
            engine.wait_ready()
        except EngineDeadError:
            server.should_exit = True
            return
        print(f"runtime serve: {names[0]} ready at http://{host}:{port}/v1", file=sys.stderr, flush=True)

    threading.Thread(target=report_when_loaded, name="runtime-load-watch", daemon=True).start()
    signal.signal(signal.SIGTERM, _exit_cleanly)
    print(f"runtime serve: listening on http://{host}:{port}; loading {names[0]}", file=sys.stderr, flush=True)
    logging.getLogger("runtime").info("serving %s as %s", args.model or "the embedded model", ", ".join(names))
    server.run()
    if engine.core is None and engine.error is not None:
        raise ValueError(f"the model failed to load: {engine.error}")
    return 0
