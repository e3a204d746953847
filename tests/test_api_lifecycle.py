"""Disconnects abort generation and free the KV cache; overload is a 503 with Retry-After; the API
key guards everything but the probes; /health follows loading and engine death; SIGTERM exits 0."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import socket
import threading
import time

import httpx
import openai
import pytest
from litestar.testing import TestClient

from runtime.api.app import create_app
from runtime.engine.args import EngineArgs
from runtime.engine.async_engine import AsyncEngine

from api_server import TINY_ARGS, ServerProcess, assert_error, metric, wait_for_metric
from engine_builds import build_failing_after_three_steps, build_when_released
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("api")

LONG = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(str(checkpoint), "--kv-cache-memory", "16MiB", "--max-model-len", "512",
                       "--served-model-name", "tiny") as srv:
        yield srv


def idle(url):
    return metric(url, "num_requests_running") == 0 and metric(url, "num_requests_waiting") == 0


def test_dropped_streams_abort_and_free_the_cache(server):
    assert idle(server.url)
    idle_usage = metric(server.url, "kv_cache_usage_perc")
    client = httpx.Client(timeout=30)
    streams = []
    for i in range(6):
        body = {**LONG, "prompt": f"{i} Once upon a time", "stream": True}
        stream = client.send(client.build_request("POST", f"{server.base_url}/completions", json=body), stream=True)
        lines = stream.iter_lines()  # kept: dropping the iterator would close the response
        assert next(line for line in lines if line).startswith("data: ")
        streams.append((stream, lines))
    assert metric(server.url, "num_requests_running") == 6
    assert metric(server.url, "kv_cache_usage_perc") > idle_usage
    generated = metric(server.url, "generation_tokens_total")
    for stream, _ in streams:
        stream.close()
    client.close()
    wait_for_metric(server.url, "num_requests_running", lambda v: v == 0, timeout=5)
    assert metric(server.url, "kv_cache_usage_perc") == idle_usage
    stopped_at = metric(server.url, "generation_tokens_total")
    assert stopped_at - generated < 6 * 100  # far from the 6 * 400 a finished run would make
    time.sleep(0.3)
    assert metric(server.url, "generation_tokens_total") == stopped_at


def test_hanging_up_on_a_non_streaming_request_aborts_it(server):
    generated = metric(server.url, "generation_tokens_total")
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for_metric(server.url, "num_requests_running", lambda v: v == 1, timeout=10)
    wait_for_metric(server.url, "num_requests_running", lambda v: v == 0, timeout=5)
    assert metric(server.url, "generation_tokens_total") - generated < 400
    assert metric(server.url, "kv_cache_usage_perc") == 0


def test_metrics_names_and_counts(server):
    before = metric(server.url, "prompt_tokens_total")
    out = httpx.post(f"{server.base_url}/completions", json={"prompt": "Hello", "max_tokens": 3}).json()
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "num_preemptions_total", "request_success_total"):
        assert f"runtime:{name}{{" in text, name
    assert metric(server.url, "prompt_tokens_total") - before == out["usage"]["prompt_tokens"]


# -- a server with an API key and a tiny queue ----------------------------------------------------

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded(checkpoint):
    env = {**os.environ, "RUNTIME_API_KEY": KEY}
    srv = ServerProcess(str(checkpoint), *TINY_ARGS, "--max-num-seqs", "1", "--max-queue-len", "2", env=env)
    srv.start()
    yield srv
    srv.stop()


def test_api_key(guarded):
    url = f"{guarded.base_url}/completions"
    body = {"prompt": "a", "max_tokens": 2}
    assert_error(httpx.post(url, json=body), 401)
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.post(url, content=b"{bad", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(f"{guarded.base_url}/models"), 401)
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    for open_path in ("/health", "/version", "/metrics", "/openapi.json"):
        assert httpx.get(guarded.url + open_path).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.base_url, api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=guarded.base_url, api_key=KEY, max_retries=0)
    assert ok.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens == 2
    assert KEY not in guarded.output()


def test_overload_is_503_with_retry_after(guarded):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True}

    def send(_):
        return httpx.post(f"{guarded.base_url}/completions", json=body, headers=headers, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"]
            assert r.json()["error"]["code"] == "overloaded"
    assert send(0).status_code == 200


def test_sigterm_finishes_in_flight_requests_and_exits_0(guarded):
    """Last in this module: it stops the guarded server."""
    headers = {"Authorization": f"Bearer {KEY}"}
    result = {"lines": []}
    streaming = threading.Event()

    def stream():
        # Long enough to be in flight when the signal comes: the first chunk starts the stop.
        with httpx.stream("POST", f"{guarded.base_url}/completions", headers=headers, timeout=60,
                          json={"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    result["lines"].append(line)
                    streaming.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert streaming.wait(30), "the stream sent nothing in 30 s"
    assert guarded.stop() == 0
    thread.join(30)
    assert result["lines"][-1] == "data: [DONE]"
    finals = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in result["lines"][:-1]]
    assert finals[-1] == "length"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{guarded.url}/health")


# -- in-process: loading and engine death ----------------------------------------------------------


def wait_healthy(client, timeout=60.0) -> bool:
    deadline = time.monotonic() + timeout
    while client.get("/health").status_code != 200:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_every_route_is_503_while_loading(checkpoint, tmp_path):
    release = tmp_path / "release"
    engine = AsyncEngine(EngineArgs(model=str(checkpoint), kv_cache_memory="16MiB", max_model_len=128),
                         build=functools.partial(build_when_released, release))
    with TestClient(create_app(engine, ["tiny"])) as client:
        response = client.get("/health")
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_loading"
        for method, path, body in (("POST", "/v1/completions", {"prompt": "a"}), ("GET", "/v1/models", None),
                                   ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
                                   ("POST", "/tokenize", {"prompt": "a"})):
            response = client.request(method, path, json=body)
            assert response.status_code == 503 and response.headers["Retry-After"], (path, response.text)
            assert response.json()["error"]["code"] == "model_loading"
        release.touch()
        assert wait_healthy(client)
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 128
        assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_engine_death_fails_requests_and_health(checkpoint):
    engine = AsyncEngine(EngineArgs(model=str(checkpoint), kv_cache_memory="16MiB", max_model_len=128),
                         build=build_failing_after_three_steps)
    with TestClient(create_app(engine, ["tiny"])) as client:
        assert wait_healthy(client)
        response = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 20, "ignore_eos": True})
        assert response.status_code == 503
        assert "engine died" in response.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        with client.stream("POST", "/v1/completions", json={"prompt": "a", "stream": True}) as r:
            assert r.status_code == 503
