"""A real ``runtime serve`` subprocess on a free port of 127.0.0.1, for the API tests."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

from runtime.bench.launch import free_port
from runtime.bench.soak import process_tree

TINY_ARGS = ("--kv-cache-memory", "16MiB", "--max-model-len", "256", "--served-model-name", "tiny")
"""Engine flags for a tiny checkpoint: small KV cache and context, served as ``tiny``."""


class ServerProcess:
    """``runtime serve *args`` bound to 127.0.0.1; ``start()`` returns once /health is 200."""

    def __init__(self, *args: str, env: Optional[dict[str, str]] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.args = [sys.executable, "-m", "runtime.cli", "serve", *args,
                     "--host", "127.0.0.1", "--port", str(self.port)]
        self.env = env
        self.log = tempfile.NamedTemporaryFile(prefix="runtime-serve-", suffix=".log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"runtime serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"runtime serve was not healthy within {timeout} s:\n{self.output()}")

    def children(self) -> dict[str, int]:
        """The server's child processes by name (``runtime-core``, ``runtime-api-0``, ...) -> pid."""
        assert self.proc is not None
        found = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    found[Path(f"/proc/{pid}/comm").read_text().strip()] = int(pid)
                except FileNotFoundError:
                    pass  # exited meanwhile
        return found

    def descendants(self) -> dict[int, str]:
        """Every process under the server (workers of the core too), pid -> name."""
        assert self.proc is not None
        found = {}
        for pid in process_tree(self.proc.pid)[1:]:
            try:
                found[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
            except FileNotFoundError:
                pass  # exited meanwhile
        return found

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether process ``pid`` ends (or is a zombie: it runs nothing) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def metric(url: str, name: str, headers: Optional[dict[str, str]] = None) -> float:
    """The value of one unlabelled-by-us series (``runtime:<name>``) from /metrics."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    match = re.search(rf"^runtime:{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert match, f"runtime:{name} not in /metrics"
    return float(match.group(1))


def wait_for_metric(url: str, name: str, predicate, timeout: float = 10.0) -> float:
    """Poll ``runtime:<name>`` until ``predicate(value)``; returns the last value (asserting on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = metric(url, name)
        if predicate(value) or time.monotonic() > deadline:
            assert predicate(value), f"runtime:{name} = {value} after {timeout} s"
            return value
        time.sleep(0.05)


def assert_error(response: httpx.Response, status: int, param: Optional[str] = None) -> dict:
    """Assert ``response`` is OpenAI's error shape with ``status`` (and ``param``); returns the error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error
