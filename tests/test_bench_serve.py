"""``runtime bench serve`` against a real ``runtime serve`` of a tiny model: the JSON schema, and
that the counts add up (tokens received equal the usage the server reported)."""

from __future__ import annotations

import json
import math

import pytest

from runtime.cli import main

from api_server import TINY_ARGS, ServerProcess
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("bench")

PROMPTS, OUTPUT_LEN = 6, 12
RUN_KEYS = {"base_url", "endpoint", "model", "num_prompts", "request_rate", "burstiness", "max_concurrency",
            "duration_s", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
            "output_throughput", "total_token_throughput", "slo_ms", "good_requests", "request_goodput",
            "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "requests"}
REQUEST_KEYS = {"prompt_tokens", "output_tokens", "chunks", "success", "ttft_s", "latency_s", "itl_s", "usage", "error"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    checkpoint = make_tiny_checkpoint(tmp, "llama")
    out = tmp / "serve.json"
    with ServerProcess(str(checkpoint), *TINY_ARGS) as server:
        status = main(["bench", "serve", "--base-url", server.url, "--tokenizer", str(checkpoint),
                       "--num-prompts", str(PROMPTS), "--random-input-len", "24",
                       "--random-output-len", str(OUTPUT_LEN), "--max-concurrency", "1", "3",
                       "--goodput", "ttft:60000", "--save-detailed", "--disable-tqdm", "--output-json", str(out)])
    assert status == 0
    return json.loads(out.read_text())


def test_json_schema(result):
    assert result["benchmark"] == "serve" and result["dataset"] == "random"
    assert [run["max_concurrency"] for run in result["runs"]] == [1, 3]
    for run in result["runs"]:
        assert set(run) == RUN_KEYS
        assert run["model"] == "tiny" and run["request_rate"] == "inf"
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(run[metric]) == {"mean", "median", "std", "p50", "p90", "p99"}
            assert all(math.isfinite(v) and v >= 0 for v in run[metric].values())
        assert run["ttft_ms"]["p50"] <= run["e2el_ms"]["p50"]
        assert all(set(r) == REQUEST_KEYS for r in run["requests"])


def test_counts_add_up(result):
    for run in result["runs"]:
        requests = run["requests"]
        assert run["completed"] == len(requests) == PROMPTS and run["failed"] == 0
        for r in requests:
            assert r["success"] and not r["error"]
            # Tokens counted off the stream = what the server's final usage says = what was asked.
            assert r["output_tokens"] == r["usage"]["completion_tokens"] == OUTPUT_LEN
            assert r["prompt_tokens"] == r["usage"]["prompt_tokens"]
            assert len(r["itl_s"]) == r["chunks"] - 1
            assert r["ttft_s"] + sum(r["itl_s"]) <= r["latency_s"]
        assert run["total_output_tokens"] == sum(r["output_tokens"] for r in requests) == PROMPTS * OUTPUT_LEN
        assert run["total_input_tokens"] == sum(r["usage"]["prompt_tokens"] for r in requests)
        assert run["output_throughput"] == pytest.approx(run["total_output_tokens"] / run["duration_s"])
        assert run["good_requests"] == PROMPTS  # a one-minute TTFT SLO holds for every request
