"""``GET /metrics``: Prometheus metrics under vLLM's names with a ``runtime:`` prefix.

Engine state (running and waiting requests, KV-cache usage, prefix-cache and preemption
counters, and with speculative decoding configured its draft and acceptance counters) is read from the engine core's last step when scraped: every API process receives it.
Request latencies and token counts are observed by the handlers as outputs arrive, in whichever
API process serves the request; under ``runtime serve`` (``PROMETHEUS_MULTIPROC_DIR`` set by the
supervisor) prometheus_client keeps them in files that a scrape of any API process sums, so
``/metrics`` is one view of the whole server. Otherwise each app has its own registry, so
several apps in one process (tests) never share counters.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.messages import EngineStats
from runtime.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so dashboards built for it read the same.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


class _EngineStats(Collector):
    """Engine gauges and counters, read at scrape time from the engine's last step."""

    def __init__(self, engine: AsyncEngine, model_name: str, adapter_name: Optional[Callable[[int], str]]):
        self.engine = engine
        self.model_name = model_name
        self.adapter_name = adapter_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        if self.adapter_name is not None:
            yield self._lora_info(stats)
        for name, field, doc, family in (
            ("num_requests_running", "num_running", "Requests in the running batch.", GaugeMetricFamily),
            ("num_requests_waiting", "num_waiting", "Requests waiting to be scheduled.", GaugeMetricFamily),
            ("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV-cache blocks in use (1 = full).",
             GaugeMetricFamily),
            ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             CounterMetricFamily),
            ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache.", CounterMetricFamily),
            ("num_preemptions", "num_preemptions", "Requests preempted for lack of KV-cache blocks.",
             CounterMetricFamily),
            ("cpu_prefix_cache_queries", "cpu_prefix_cache_queries",
             "Prompt tokens looked up in the KV cache's host tier (those the device's prefix cache missed).",
             CounterMetricFamily),
            ("cpu_prefix_cache_hits", "cpu_prefix_cache_hits", "Prompt tokens found in the KV cache's host tier.",
             CounterMetricFamily),
            ("encoder_cache_queries", "encoder_cache_queries",
             "Images whose encoder output a scheduled prompt chunk needed (vision-language models).", CounterMetricFamily),
            ("encoder_cache_hits", "encoder_cache_hits", "Of those, images whose encoder output was cached already.",
             CounterMetricFamily),
        ):
            metric = family(f"runtime:{name}", doc, labels=["model_name"])
            metric.add_metric([self.model_name], float(getattr(stats, field)))
            yield metric
        speculative = self.engine.args.speculative
        if speculative is not None:
            yield from self._spec_decode(stats, speculative.num_speculative_tokens)

    def _spec_decode(self, stats: EngineStats, num_speculative_tokens: int) -> Iterator[Metric]:
        """vLLM's speculative-decoding counters; the per-position one has a sample for every
        proposed position (``position`` 0 is the first proposed token) from the start."""
        for name, field, doc in (
            ("spec_decode_num_drafts", "spec_num_drafts", "Draft proposals verified."),
            ("spec_decode_num_draft_tokens", "spec_num_draft_tokens", "Draft tokens proposed and verified."),
            ("spec_decode_num_accepted_tokens", "spec_num_accepted_tokens", "Draft tokens accepted."),
        ):
            metric = CounterMetricFamily(f"runtime:{name}", doc, labels=["model_name"])
            metric.add_metric([self.model_name], float(getattr(stats, field)))
            yield metric
        per_position = CounterMetricFamily("runtime:spec_decode_num_accepted_tokens_per_pos",
                                           "Draft tokens accepted, by position in the proposal.",
                                           labels=["model_name", "position"])
        accepted = stats.spec_accepted_per_position
        for position in range(max(num_speculative_tokens, len(accepted))):
            count = accepted[position] if position < len(accepted) else 0
            per_position.add_metric([self.model_name, str(position)], float(count))
        yield per_position

    def _lora_info(self, stats: EngineStats) -> Metric:
        """vLLM's lora_requests_info: the adapters in use as labels, the time of reading as value."""
        info = GaugeMetricFamily("runtime:lora_requests_info", "Running and waiting LoRA adapters (labels).",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        running, waiting = (",".join(map(self.adapter_name, ids)) for ids in (stats.running_lora_ids,
                                                                                 stats.waiting_lora_ids))
        info.add_metric([str(self.engine.args.max_loras), running, waiting], time.time())
        return info


class Metrics:
    """The app's metrics; ``render()`` is the /metrics body."""

    def __init__(self, engine: AsyncEngine, model_name: str, adapter_name: Optional[Callable[[int], str]] = None):
        """``adapter_name``: a LoRA adapter's name by id, where adapters are served."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        # Across processes the values live in files: the metrics are read back through the
        # multiprocess collector, not registered here (that would count this process twice).
        shared = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        registry = None if shared else self.registry
        if shared:
            multiprocess.MultiProcessCollector(self.registry)
        labels = ["model_name"]
        self.prompt_tokens = Counter("runtime:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=registry).labels(model_name)
        self.generation_tokens = Counter("runtime:generation_tokens", "Tokens generated.", labels,
                                         registry=registry).labels(model_name)
        self.request_success = Counter("runtime:request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=registry)
        self.ttft = Histogram("runtime:time_to_first_token_seconds", "Time from arrival to the first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=registry).labels(model_name)
        self.itl = Histogram("runtime:inter_token_latency_seconds", "Time between two steps' tokens of a request.",
                             labels, buckets=_ITL_BUCKETS, registry=registry).labels(model_name)
        self.e2e = Histogram("runtime:e2e_request_latency_seconds", "Time from arrival to the last token.", labels,
                             buckets=_E2E_BUCKETS, registry=registry).labels(model_name)
        self.registry.register(_EngineStats(engine, model_name, adapter_name))

    def request(self) -> "RequestTimer":
        """Start timing a request that arrives now."""
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one engine request's outputs: first-token, inter-token and end-to-end latency, token counts."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: float | None = None

    def embedded(self, num_prompt_tokens: int, num_inputs: int) -> None:
        """An embeddings request's inputs are all computed: their tokens, one success each, its latency."""
        m = self.metrics
        m.prompt_tokens.inc(num_prompt_tokens)
        m.request_success.labels(m.model_name, "stop").inc(num_inputs)
        m.e2e.observe(time.perf_counter() - self.start)

    def observe(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        m = self.metrics
        new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
        if new_tokens:
            if self.last is None:
                m.ttft.observe(now - self.start)
                m.prompt_tokens.inc(len(out.prompt_token_ids))
            else:
                m.itl.observe(now - self.last)
            self.last = now
            m.generation_tokens.inc(new_tokens)
        for completion in out.outputs:
            if completion.finish_reason is not None:
                m.request_success.labels(m.model_name, completion.finish_reason).inc()
        if out.finished:
            m.e2e.observe(now - self.start)
