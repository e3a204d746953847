"""Faults while serving: a device out of memory in a step (the RUNTIME_INJECT_OOM_AT_STEP hook)
and a tensor-parallel worker killed. Every client gets an error, nothing hangs, the server exits 1
naming the cause and leaves no process behind. (The engine core killed: tests/test_serve_processes.py.)"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time

import httpx
import pytest

from runtime.platform.faults import ENV as INJECT_OOM

from api_server import TINY_ARGS, ServerProcess, gone
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("engine-processes")

STREAMS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


def stream_until_it_ends(url: str, i: int, streaming: threading.Event) -> tuple[list[str], float]:
    """The stream's lines and when it ended; ``streaming`` is set once its first line arrived."""
    body = {"prompt": f"{i} once upon a time", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        if response.status_code != 200:
            streaming.set()
            return [f"status {response.status_code}", response.read().decode()], time.monotonic()
        lines = []
        for line in response.iter_lines():
            if line:
                lines.append(line)
                streaming.set()
        return lines, time.monotonic()


def fail_while_streaming(server: ServerProcess, fault) -> tuple[list[list[str]], int, float]:
    """Run STREAMS streams, call ``fault()`` once each has streamed a token (running is not enough:
    a loaded machine may still be computing a prompt); (each stream's lines, exit status, seconds
    from the first stream's end to the server's exit)."""
    processes = server.descendants()
    try:
        with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
            streaming = [threading.Event() for _ in range(STREAMS)]
            futures = [pool.submit(stream_until_it_ends, server.url, i, streaming[i]) for i in range(STREAMS)]
            deadline = time.monotonic() + 60
            for event in streaming:
                event.wait(max(0.0, deadline - time.monotonic()))
            fault()
            results = [future.result(timeout=60) for future in futures]
        code = server.proc.wait(timeout=45)
        took = time.monotonic() - min(ended for _, ended in results)
    finally:
        if server.proc.poll() is None:
            server.stop()
    assert not [f"{name} ({pid})" for pid, name in processes.items() if not gone(pid)], "processes outlived the server"
    return [lines for lines, _ in results], code, took


def assert_streams_failed(results: list[list[str]]) -> list[dict]:
    errors = []
    for lines in results:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == "engine_dead", error
        assert len(lines) >= 3  # it had streamed a token before the fault, then the error and [DONE]
        errors.append(error)
    return errors


def test_device_out_of_memory_in_a_step_fails_every_stream_and_exits_1(checkpoint):
    # Step 100: the four streams have been running for a while (they ask for 240 tokens each).
    server = ServerProcess(str(checkpoint), *TINY_ARGS, env={**os.environ, INJECT_OOM: "100"}).start()
    results, code, took = fail_while_streaming(server, lambda: None)
    errors = assert_streams_failed(results)
    assert code == 1 and took < 30, (code, took)
    assert any("OutOfMemoryError" in e["message"] for e in errors), errors
    log = server.output()
    assert "OutOfMemoryError: out of memory in step 100" in log, log[-2000:]


def test_a_killed_tensor_parallel_worker_fails_every_stream_and_exits_1(checkpoint):
    server = ServerProcess(str(checkpoint), *TINY_ARGS, "--tensor-parallel-size", "2").start()
    worker = next(pid for pid, name in server.descendants().items() if name == "runtime-rank-1")
    results, code, took = fail_while_streaming(server, lambda: os.kill(worker, signal.SIGKILL))
    errors = assert_streams_failed(results)
    assert code == 1 and took < 30, (code, took)
    assert any("rank 1" in e["message"] for e in errors), errors
    assert f"worker rank 1 (pid {worker}) exited with code -9" in server.output()
