"""``runtime serve`` as processes: several API processes in front of one engine core give each
request the output it gets alone and one metrics view; killing the core ends every stream with
an error event and the whole server, leaving no process behind."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from runtime import LLM, SamplingParams

from api_server import TINY_ARGS, ServerProcess, gone, metric
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("engine-processes")

PROMPTS = [f"Story {i}: once upon a time" if i % 2 else f"{i} bright stars over the sea" for i in range(64)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream_text(url: str, prompt: str, max_tokens: int) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text = []
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


def test_two_api_processes_serve_64_streams_as_each_alone(checkpoint):
    llm = LLM(str(checkpoint), kv_cache_memory="16MiB", max_model_len=256)
    alone = [llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
             .outputs[0].text for p in PROMPTS]
    with ServerProcess(str(checkpoint), *TINY_ARGS, "--api-server-count", "2") as server:
        api = [pid for name, pid in server.children().items() if name.startswith("runtime-api-")]
        assert len(api) == 2 and "runtime-core" in server.children()
        before = [cpu_seconds(pid) for pid in api]
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            served = list(pool.map(lambda p: stream_text(server.base_url, p, 12), PROMPTS))
        assert served == alone
        # Both processes took part (an idle one spends no CPU), and /metrics, whichever process
        # answers it, counts the requests of both.
        assert all(cpu_seconds(pid) - b > 0.05 for pid, b in zip(api, before))
        tokenizer = llm.get_tokenizer()
        prompt_tokens = sum(len(tokenizer.encode(p)) for p in PROMPTS)
        for _ in range(6):
            assert metric(server.url, "prompt_tokens_total") == prompt_tokens
            assert metric(server.url, "generation_tokens_total") == 64 * 12


def test_killing_the_core_ends_streams_with_an_error_and_stops_the_server(checkpoint):
    server = ServerProcess(str(checkpoint), *TINY_ARGS, "--api-server-count", "2").start()
    children = server.children()
    results = {}

    def stream(i):
        lines = []
        body = {"prompt": f"{i} once", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
        results[i] = lines

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, i) for i in range(4)]
            deadline = time.monotonic() + 30
            while metric(server.url, "num_requests_running") < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(children["runtime-core"], signal.SIGKILL)
            for future in futures:
                future.result(timeout=30)
        code = server.proc.wait(timeout=15)
    finally:
        if server.proc.poll() is None:
            server.stop()
    assert code != 0, server.output()
    for lines in results.values():
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == "engine_dead" and "exited" in error["message"]
    assert "engine core process died" in server.output()
    for name, pid in children.items():
        assert gone(pid), f"{name} (pid {pid}) outlived the server"


def test_a_model_that_fails_to_load_stops_the_server_with_the_reason(tmp_path):
    server = ServerProcess(str(tmp_path / "missing-model"), "--api-server-count", "2")
    server.proc = subprocess.Popen(server.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = server.proc.communicate(timeout=120)
    assert server.proc.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("runtime serve: error: the model failed to load:"), err
    assert "not found" in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("flags,message", [
    (["--api-server-count", "0"], "--api-server-count must be >= 1"),
    (["--port", "{busy}"], "cannot listen on 127.0.0.1:"),
    (["--lora-modules", "a=/nowhere"], "--lora-modules needs --enable-lora"),
    (["--enable-lora", "--lora-modules", "a"], "give name=path or a JSON object with name and path"),
    (["--enable-lora", "--lora-modules", "a=/nowhere"], "/nowhere/adapter_config.json not found"),
    (["--enable-lora", "--allow-runtime-lora-updating", "--api-server-count", "2"], "works with one API process"),
    (["--enable-lora", "--lora-allowed-dirs", "/"], "--lora-allowed-dirs confines /v1/load_lora_adapter: it needs"),
    (["--enable-lora", "--allow-runtime-lora-updating", "--lora-allowed-dirs", "/nowhere"],
     "--lora-allowed-dirs /nowhere is not a directory"),
    (["--max-request-body-bytes", "0"], "--max-request-body-bytes must be >= 1"),
    (["--enable-lora", "-tp", "2"], "LoRA adapters with --tensor-parallel-size or --pipeline-parallel-size above 1"),
    # (each flag goes through str.format: braces are doubled)
    (["--speculative-config", "{{method: ngram}}"], "--speculative-config is not valid JSON"),
    (["--speculative-config", '{{"method": "ngram"}}'], 'needs "method" and "num_speculative_tokens"'),
])
def test_serve_flag_errors_are_one_line(checkpoint, flags, message):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        flags = [f.format(busy=busy.getsockname()[1]) for f in flags]
        out = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", str(checkpoint), "--host", "127.0.0.1",
                              *flags], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("runtime serve: error: ") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_tensor_and_data_parallel_servers_give_each_request_its_solo_output(checkpoint):
    """-tp 2 (worker processes under the core) and -dp 2 (two cores, requests balanced): 64
    concurrent streams each equal the one-rank engine's output for that prompt alone."""
    llm = LLM(str(checkpoint), kv_cache_memory="16MiB", max_model_len=256)
    prompts = PROMPTS
    alone = [llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
             .outputs[0].text for p in prompts]
    for flags, busy in ((["-tp", "2"], ["runtime-core"]), (["-dp", "2"], ["runtime-core-0", "runtime-core-1"])):
        with ServerProcess(str(checkpoint), *TINY_ARGS, *flags) as server:
            children = server.children()
            assert all(name in children for name in busy), children
            if flags[0] == "-tp":
                workers = Path(f"/proc/{children['runtime-core']}/task")
                assert any(Path(f"/proc/{pid}/comm").read_text().strip() == "runtime-rank-1"
                           for task in workers.iterdir() for pid in (task / "children").read_text().split())
            before = [cpu_seconds(children[name]) for name in busy]
            with concurrent.futures.ThreadPoolExecutor(64) as pool:
                served = list(pool.map(lambda p: stream_text(server.base_url, p, 12), prompts))
            assert served == alone, flags
            # Under -dp both cores computed (an idle one spends no CPU).
            assert all(cpu_seconds(children[name]) - b > 0.05 for name, b in zip(busy, before)), flags
