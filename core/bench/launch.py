"""Start a server as a subprocess on 127.0.0.1 and wait until it answers, for the benchmark scripts."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Optional, Sequence

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedServer:
    """``with LaunchedServer(cmd, port, log): ...``: runs ``cmd`` (which must bind 127.0.0.1:``port``),
    returns once ``GET ready_path`` answers 200, and stops it with SIGTERM on exit. Its output
    goes to the file ``log``.

    ``ready_path`` is ``/health`` for runtime and vLLM (200 once a request can be served);
    llama-cpp-python has no /health but loads the model before it listens, so ``/v1/models``
    serves there. ``env`` replaces the environment of ``cmd`` when given.
    """

    def __init__(self, cmd: Sequence[str], port: int, log: str | Path, ready_path: str = "/health",
                 timeout: float = 300.0, env: Optional[dict[str, str]] = None):
        self.cmd = list(cmd)
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.log_path = Path(log)
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen] = None
        self._log: Optional[IO[bytes]] = None

    def __enter__(self) -> "LaunchedServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close()
                raise RuntimeError(f"{self.cmd[0]} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"{' '.join(self.cmd)} did not answer within {self.timeout:.0f} s; see {self.log_path}")

    def __exit__(self, *exc_info) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
