"""``/metrics`` engine counters from a stub engine: speculative decoding's, only where it is configured,
and the sum over data-parallel cores."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.api.metrics import Metrics
from runtime.engine.args import EngineArgs
from runtime.engine.async_engine import AsyncEngine, _CoreLink
from runtime.engine.messages import EngineStats

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}
SPEC_NAMES = ("runtime:spec_decode_num_drafts_total", "runtime:spec_decode_num_draft_tokens_total",
              "runtime:spec_decode_num_accepted_tokens_total", "runtime:spec_decode_num_accepted_tokens_per_pos_total")


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def scrape(args: EngineArgs, stats: EngineStats) -> dict[str, list]:
    """Sample name -> [(labels, value)] of what /metrics shows for an engine with these args and counters."""
    engine = SimpleNamespace(args=args, stats=lambda: stats)
    text = Metrics(engine, "tiny").render().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_spec_decode_counters_under_vllms_names():
    stats = EngineStats(spec_num_drafts=10, spec_num_draft_tokens=30, spec_num_accepted_tokens=17,
                        spec_accepted_per_position=[9, 6, 2])
    samples = scrape(EngineArgs(speculative_config=NGRAM), stats)
    assert samples["runtime:spec_decode_num_drafts_total"] == [({"model_name": "tiny"}, 10.0)]
    assert samples["runtime:spec_decode_num_draft_tokens_total"] == [({"model_name": "tiny"}, 30.0)]
    assert samples["runtime:spec_decode_num_accepted_tokens_total"] == [({"model_name": "tiny"}, 17.0)]
    assert samples["runtime:spec_decode_num_accepted_tokens_per_pos_total"] == [
        ({"model_name": "tiny", "position": "0"}, 9.0), ({"model_name": "tiny", "position": "1"}, 6.0),
        ({"model_name": "tiny", "position": "2"}, 2.0)]


def test_every_position_has_a_sample_before_the_first_draft():
    samples = scrape(EngineArgs(speculative_config=NGRAM), EngineStats())
    per_pos = samples["runtime:spec_decode_num_accepted_tokens_per_pos_total"]
    assert [(labels["position"], value) for labels, value in per_pos] == [("0", 0.0), ("1", 0.0), ("2", 0.0)]
    assert samples["runtime:spec_decode_num_drafts_total"] == [({"model_name": "tiny"}, 0.0)]


def test_no_spec_decode_metrics_without_speculative_decoding():
    samples = scrape(EngineArgs(), EngineStats(spec_num_drafts=4, spec_accepted_per_position=[1]))
    assert not [name for name in samples if "spec_decode" in name]
    assert samples["runtime:num_preemptions_total"] == [({"model_name": "tiny"}, 0.0)]


def test_stats_sum_spec_counters_over_data_parallel_cores():
    engine = AsyncEngine(EngineArgs(speculative_config=NGRAM, data_parallel_size=2))
    engine._links = [_CoreLink(None, None), _CoreLink(None, None), _CoreLink(None, None)]
    engine._links[0].stats = EngineStats(num_running=1, spec_num_drafts=5, spec_num_draft_tokens=15,
                                         spec_num_accepted_tokens=7, spec_accepted_per_position=[4, 2, 1])
    engine._links[1].stats = EngineStats(num_running=2, spec_num_drafts=2, spec_num_draft_tokens=6,
                                         spec_num_accepted_tokens=3, spec_accepted_per_position=[2, 1])
    total = engine.stats()  # the third core has drafted nothing yet: an empty per-position list
    assert (total.num_running, total.spec_num_drafts, total.spec_num_draft_tokens,
            total.spec_num_accepted_tokens) == (3, 7, 21, 10)
    assert total.spec_accepted_per_position == [6, 3, 1]


def test_host_tier_prefix_cache_counters_beside_the_devices_and_summed_over_cores():
    engine = AsyncEngine(EngineArgs(data_parallel_size=2))
    engine._links = [_CoreLink(None, None), _CoreLink(None, None)]
    engine._links[0].stats = EngineStats(prefix_cache_queries=100, prefix_cache_hits=40, cpu_prefix_cache_queries=60,
                                         cpu_prefix_cache_hits=32)
    engine._links[1].stats = EngineStats(prefix_cache_queries=50, prefix_cache_hits=10, cpu_prefix_cache_queries=40,
                                         cpu_prefix_cache_hits=16)
    samples = scrape(EngineArgs(), engine.stats())
    assert samples["runtime:prefix_cache_hits_total"] == [({"model_name": "tiny"}, 50.0)]
    assert samples["runtime:cpu_prefix_cache_queries_total"] == [({"model_name": "tiny"}, 100.0)]
    assert samples["runtime:cpu_prefix_cache_hits_total"] == [({"model_name": "tiny"}, 48.0)]
