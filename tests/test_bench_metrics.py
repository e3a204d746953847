"""The serve benchmark's metric computations on synthetic timings: percentiles, TPOT, ITL,
throughput and goodput, and the client's per-chunk token counting."""

from __future__ import annotations

import math

import pytest

from runtime.bench.client import _chunk_tokens, completion_body
from runtime.bench.datasets import BenchRequest
from runtime.bench.metrics import RequestRecord, meets_slo, parse_slo, percentile, summarize
from runtime.bench.serve import arrival_gaps


def record(ttft: float, itl: list[float], tokens_per_chunk: int = 1, prompt_len: int = 10) -> RequestRecord:
    """A successful request whose chunks arrive ``ttft`` then ``itl`` apart."""
    chunks = 1 + len(itl)
    return RequestRecord(prompt_len=prompt_len, output_tokens=chunks * tokens_per_chunk, success=True, ttft=ttft,
                         latency=ttft + sum(itl), itl=itl, chunks=chunks)


@pytest.mark.parametrize("q, expected", [(0, 1.0), (50, 2.5), (100, 4.0), (25, 1.75), (99, 3.97)])
def test_percentile_interpolates_linearly_between_ranks(q, expected):
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(expected)


def test_percentile_edges():
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_tpot_excludes_the_first_token():
    r = record(ttft=0.5, itl=[0.1, 0.1, 0.1, 0.1])  # 5 tokens, 4 gaps
    assert r.latency == pytest.approx(0.9)
    assert r.tpot == pytest.approx(0.1)
    assert record(ttft=0.5, itl=[]).tpot is None  # one token: no time per output token


def test_tpot_counts_tokens_not_chunks():
    # 3 chunks of 2 tokens: 6 tokens over 0.4 s after the first chunk.
    r = record(ttft=0.2, itl=[0.2, 0.2], tokens_per_chunk=2)
    assert r.tpot == pytest.approx(0.4 / 5)


def test_summary_counts_throughput_and_distributions():
    records = [record(0.1, [0.02, 0.04]), record(0.3, [0.06]),
               RequestRecord(prompt_len=10, error="HTTP 500")]
    s = summarize(records, duration=2.0, percentiles=(50, 99))
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["total_input_tokens"] == 20
    assert s["total_output_tokens"] == 5
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(2.5)
    assert s["total_token_throughput"] == pytest.approx(12.5)
    assert s["ttft_ms"]["mean"] == pytest.approx(200)
    assert s["ttft_ms"]["p50"] == pytest.approx(200)
    assert s["ttft_ms"]["p99"] == pytest.approx(100 + 200 * 0.99)
    # ITL pools every gap of every request: 20, 40, 60 ms.
    assert s["itl_ms"]["median"] == pytest.approx(40)
    assert s["itl_ms"]["std"] == pytest.approx(math.sqrt(800 / 3))
    # TPOT is per request: 30 ms (60 ms over 2 tokens) and 60 ms.
    assert s["tpot_ms"]["mean"] == pytest.approx(45)
    assert s["e2el_ms"]["p50"] == pytest.approx((160 + 360) / 2)
    assert "request_goodput" not in s


def test_goodput_counts_requests_meeting_every_slo():
    slo = parse_slo(["ttft:200", "tpot:50"])
    assert slo == {"ttft": pytest.approx(0.2), "tpot": pytest.approx(0.05)}
    fast = record(0.1, [0.02, 0.02])
    slow_first = record(0.3, [0.02])
    slow_decode = record(0.1, [0.08, 0.08])
    one_token = record(0.15, [])
    failed = RequestRecord(prompt_len=10, error="timeout")
    assert [meets_slo(r, slo) for r in (fast, slow_first, slow_decode, one_token, failed)] == \
        [True, False, False, True, False]
    s = summarize([fast, slow_first, slow_decode, one_token, failed], duration=4.0, slo=slo)
    assert s["good_requests"] == 2
    assert s["request_goodput"] == pytest.approx(0.5)
    assert s["slo_ms"] == {"ttft": pytest.approx(200), "tpot": pytest.approx(50)}


@pytest.mark.parametrize("bad", ["ttft", "itl:5", "ttft:fast"])
def test_bad_slo_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="SLO"):
        parse_slo([bad])


def test_chunk_tokens_from_running_usage_or_one_per_chunk():
    running = {"choices": [{"text": "ab", "finish_reason": None}], "usage": {"completion_tokens": 7}}
    assert _chunk_tokens(running, seen=4) == (3, "ab", True)
    assert _chunk_tokens({"choices": [{"text": "x", "finish_reason": None}]}, seen=4) == (1, "x", False)
    # Without running usage: a token still waiting for its character's other bytes counts;
    # a chunk that only closes the stream does not; a last token with the finish reason does.
    assert _chunk_tokens({"choices": [{"text": "", "finish_reason": None}]}, seen=4) == (1, "", False)
    assert _chunk_tokens({"choices": [{"text": "", "finish_reason": "length"}]}, seen=4) == (0, "", False)
    assert _chunk_tokens({"choices": [{"text": "y", "finish_reason": "length"}]}, seen=4) == (1, "y", False)
    final_usage = {"choices": [], "usage": {"completion_tokens": 7}}
    assert _chunk_tokens(final_usage, seen=7) == (0, "", False)


def test_completion_body_asks_every_server_for_the_full_length_and_usage():
    body = completion_body("m", BenchRequest("hi", [1], 32), ignore_eos=True)
    assert body["stream"] and body["max_tokens"] == body["min_tokens"] == 32 and body["ignore_eos"]
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "ignore_eos" not in completion_body("m", BenchRequest("hi", [1], 32), ignore_eos=False)


def test_arrival_gaps_have_the_requested_mean_rate():
    gaps = arrival_gaps(4000, rate=8.0, burstiness=1.0, seed=1)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8, rel=0.05)
    regular = arrival_gaps(4000, rate=8.0, burstiness=50.0, seed=1)
    assert max(regular) < 0.25  # a high gamma shape is nearly periodic
    assert arrival_gaps(3, rate=math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_gaps(3, rate=0)
