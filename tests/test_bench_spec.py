"""Speculative-decoding acceptance in ``runtime bench``: the derivation, reading ``/metrics`` text
(ours and vLLM's), and the offline and serve benchmarks reading counters before and after a run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from runtime.api.metrics import Metrics
from runtime.bench import offline, serve
from runtime.bench.cli import _offline_text
from runtime.bench.datasets import BenchRequest
from runtime.bench.metrics import RequestRecord
from runtime.bench.spec import SpecCounters, acceptance, acceptance_text, counters_from_metrics
from runtime.engine.args import EngineArgs
from runtime.engine.messages import EngineStats

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


def test_acceptance_over_a_run_follows_vllms_definitions():
    before = SpecCounters(10, 30, 12, (7, 4, 1))
    after = SpecCounters(50, 150, 97, (37, 34, 26))
    spec = acceptance(before, after)
    assert (spec["num_drafts"], spec["num_draft_tokens"], spec["num_accepted_tokens"]) == (40, 120, 85)
    assert spec["acceptance_rate"] == pytest.approx(85 / 120)
    assert spec["mean_acceptance_length"] == pytest.approx(1 + 85 / 40)
    assert spec["accepted_per_position"] == [30, 30, 25]
    assert spec["acceptance_rate_per_position"] == pytest.approx([0.75, 0.75, 0.625])


def test_acceptance_with_positions_first_reached_during_the_run():
    spec = acceptance(SpecCounters(0, 0, 0, ()), SpecCounters(4, 8, 5, (3, 2)))
    assert spec["accepted_per_position"] == [3, 2]
    assert spec["acceptance_rate_per_position"] == pytest.approx([0.75, 0.5])


def test_acceptance_needs_both_readings_and_is_nan_without_drafts():
    counters = SpecCounters(3, 9, 4, (2, 1, 1))
    assert acceptance(None, counters) is None and acceptance(counters, None) is None
    idle = acceptance(counters, counters)
    assert idle["num_drafts"] == 0 and idle["accepted_per_position"] == [0, 0, 0]
    assert math.isnan(idle["acceptance_rate"]) and math.isnan(idle["mean_acceptance_length"])
    assert all(math.isnan(rate) for rate in idle["acceptance_rate_per_position"])


OURS = """\
# HELP runtime:num_preemptions_total Requests preempted for lack of KV-cache blocks.
# TYPE runtime:num_preemptions_total counter
runtime:num_preemptions_total{model_name="m"} 3.0
# HELP runtime:spec_decode_num_drafts_total Draft proposals verified.
# TYPE runtime:spec_decode_num_drafts_total counter
runtime:spec_decode_num_drafts_total{model_name="m"} 12.0
# HELP runtime:spec_decode_num_draft_tokens_total Draft tokens proposed and verified.
# TYPE runtime:spec_decode_num_draft_tokens_total counter
runtime:spec_decode_num_draft_tokens_total{model_name="m"} 48.0
# HELP runtime:spec_decode_num_accepted_tokens_total Draft tokens accepted.
# TYPE runtime:spec_decode_num_accepted_tokens_total counter
runtime:spec_decode_num_accepted_tokens_total{model_name="m"} 21.0
# HELP runtime:spec_decode_num_accepted_tokens_per_pos_total Draft tokens accepted, by position in the proposal.
# TYPE runtime:spec_decode_num_accepted_tokens_per_pos_total counter
runtime:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 6.0
runtime:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"} 10.0
runtime:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="3"} 1.0
runtime:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"} 4.0
"""

# vLLM's: prometheus_client counters (with _created samples), one label set per engine core.
VLLM = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 5.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 7.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.7e+09
vllm:spec_decode_num_drafts_created{engine="1",model_name="m"} 1.7e+09
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="m"} 14.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 6.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="m"} 9.0
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 4.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="m",position="0"} 6.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="m",position="1"} 3.0
"""


def test_counters_from_our_metrics_text():
    assert counters_from_metrics(OURS) == SpecCounters(12, 48, 21, (10, 6, 4, 1))


def test_counters_from_vllms_metrics_text_sum_over_engines():
    assert counters_from_metrics(VLLM) == SpecCounters(12, 24, 15, (10, 5))


@pytest.mark.parametrize("text", [
    "",
    '# TYPE runtime:num_preemptions_total counter\nruntime:num_preemptions_total{model_name="m"} 3.0\n',
    "<html><body>404 Not Found</body></html>",
])
def test_no_counters_where_the_server_has_none(text):
    assert counters_from_metrics(text) is None


def test_counters_read_back_from_our_metrics_endpoint(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    stats = EngineStats(spec_num_drafts=9, spec_num_draft_tokens=27, spec_num_accepted_tokens=11,
                        spec_accepted_per_position=[6, 4, 1])
    engine = SimpleNamespace(args=EngineArgs(speculative_config=NGRAM), stats=lambda: stats)
    assert counters_from_metrics(Metrics(engine, "m").render().decode()) == SpecCounters(9, 27, 11, (6, 4, 1))


def test_acceptance_text():
    spec = acceptance(SpecCounters(0, 0, 0, ()), SpecCounters(4, 12, 6, (3, 2, 1)))
    assert acceptance_text(spec, "c=4") == (
        "speculative decoding (c=4): acceptance rate 50.0%, mean acceptance length 2.50 "
        "(6 of 12 draft tokens accepted, 4 drafts)\n  acceptance by position: 75.0% 50.0% 25.0%")


# -- the benchmarks read the counters before and after the measured runs -------------------------

class FakeLLM:
    """An ``LLM`` whose every generate call drafts 2 tokens per request and has the first accepted."""

    def __init__(self, speculative_config=None):
        self.engine_args = EngineArgs(speculative_config=speculative_config)
        self.counters = EngineStats(spec_accepted_per_position=[0, 0])
        self.engine = SimpleNamespace(stats=lambda: EngineStats(**{f: getattr(self.counters, f)
                                                                   for f in self.counters.__struct_fields__}))

    def generate(self, prompts, params, use_tqdm=True):
        c = self.counters
        c.spec_num_drafts += len(prompts)
        c.spec_num_draft_tokens += 2 * len(prompts)
        c.spec_num_accepted_tokens += len(prompts)
        c.spec_accepted_per_position = [c.spec_accepted_per_position[0] + len(prompts), 0]
        max_tokens = (params[0] if isinstance(params, list) else params).max_tokens
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[0] * max_tokens)]) for _ in prompts]


REQUESTS = [BenchRequest("p", [1, 2, 3], 4) for _ in range(3)]


def test_offline_throughput_reports_the_runs_acceptance():
    llm = FakeLLM(NGRAM)
    llm.generate(REQUESTS, [SimpleNamespace(max_tokens=1)])  # drafts before the run do not count
    result = offline.run_throughput(llm, REQUESTS, progress=False)
    assert result["spec_decode"]["num_drafts"] == 3 and result["spec_decode"]["acceptance_rate"] == 0.5
    assert result["spec_decode"]["mean_acceptance_length"] == 2.0
    assert result["spec_decode"]["acceptance_rate_per_position"] == [1.0, 0.0]
    text = _offline_text({"benchmark": "throughput", **result})
    assert text.splitlines()[-2].startswith("speculative decoding: acceptance rate 50.0%")
    assert "spec_decode" not in text


def test_offline_latency_counts_the_timed_runs_only():
    llm = FakeLLM(NGRAM)
    batches = [REQUESTS[:2]] * offline.latency_batches_needed(iters=2, warmup=1)
    result = offline.run_latency(llm, batches, output_len=4, iters=2, warmup=1, progress=False)
    assert result["spec_decode"]["num_drafts"] == 2 * 2 * 2  # 2 iterations x (prefill + e2e run) x 2 requests


def test_offline_without_speculative_decoding_has_no_spec_result():
    result = offline.run_throughput(FakeLLM(), REQUESTS, progress=False)
    assert "spec_decode" not in result and "spec_decode" not in _offline_text(result)


@pytest.mark.parametrize("readings,reported", [
    ([SpecCounters(1, 3, 2, (1, 1, 0)), SpecCounters(11, 33, 17, (9, 5, 3))], True),
    ([None, None], False),
])
def test_serve_scrapes_metrics_before_and_after_the_run(monkeypatch, readings, reported):
    scraped = iter(readings)
    monkeypatch.setattr(serve, "scrape_counters", lambda base_url, headers: next(scraped))

    async def fake_run(requests, config, model):
        return [RequestRecord(prompt_len=3, output_tokens=4, success=True, ttft=0.1, latency=0.4)], 1.0

    monkeypatch.setattr(serve, "_run", fake_run)
    summary = serve.run_serve(REQUESTS[:1], serve.ServeConfig(model="m"))
    assert next(scraped, "all read") == "all read"
    if not reported:
        assert "spec_decode" not in summary
        return
    spec = summary["spec_decode"]
    assert (spec["num_drafts"], spec["num_draft_tokens"], spec["num_accepted_tokens"]) == (10, 30, 15)
    assert spec["mean_acceptance_length"] == 2.5 and spec["accepted_per_position"] == [8, 4, 3]
