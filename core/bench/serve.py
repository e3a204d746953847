"""Drive an OpenAI-compatible server with a workload at a request rate and/or a concurrency cap.

Requests are released on a Poisson process (``burstiness`` 1; lower is burstier, higher more
regular: gamma-distributed gaps, as vLLM) or all at once for an infinite rate; at most
``max_concurrency`` are in flight. Each run returns :func:`runtime.bench.metrics.summarize`'s
summary with the run's settings added.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import httpx
from tqdm.auto import tqdm

from .client import completion_body, stream_completion
from .datasets import BenchRequest
from .metrics import RequestRecord, summarize
from .spec import acceptance, scrape_counters


@dataclass
class ServeConfig:
    """Where to send requests and how; one load point (rate, concurrency) per run."""

    base_url: str = "http://127.0.0.1:8000"
    model: Optional[str] = None
    """The served model name; None: the first one ``GET /v1/models`` lists."""
    endpoint: str = "/v1/completions"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None
    ignore_eos: bool = True
    temperature: float = 0.0
    percentiles: Sequence[float] = (50, 90, 99)
    slo: dict[str, float] = field(default_factory=dict)
    """Seconds per metric (ttft, tpot, e2el); goodput counts requests that meet all of them."""
    api_key: Optional[str] = None
    timeout: float = 600.0
    """Seconds one request may take."""
    seed: int = 0
    progress: bool = True

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def arrival_gaps(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before each request: 0 for an infinite rate, else gamma-distributed with
    mean ``1 / rate`` (shape ``burstiness``; 1 is a Poisson process)."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be > 0, got {rate} and {burstiness}")
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1 / (rate * burstiness)) for _ in range(count)]


def served_model(config: ServeConfig) -> str:
    """``config.model``, or the first model the server lists."""
    if config.model:
        return config.model
    response = httpx.get(f"{config.base_url}/v1/models", headers=config.headers(), timeout=30)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError(f"{config.base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


async def _run(requests: Sequence[BenchRequest], config: ServeConfig, model: str) -> tuple[list[RequestRecord], float]:
    url = config.base_url.rstrip("/") + config.endpoint
    limit = asyncio.Semaphore(config.max_concurrency or len(requests))
    pool = httpx.Limits(max_connections=config.max_concurrency or len(requests), max_keepalive_connections=None)
    bar = tqdm(total=len(requests), desc=_load_label(config), disable=not config.progress, leave=False)

    async def one(client: httpx.AsyncClient, request: BenchRequest) -> RequestRecord:
        async with limit:
            body = completion_body(model, request, config.ignore_eos, config.temperature)
            record = await stream_completion(client, url, body, len(request.prompt_token_ids), config.headers())
        bar.update(1)
        return record

    async with httpx.AsyncClient(timeout=httpx.Timeout(config.timeout, connect=30), limits=pool) as client:
        tasks = []
        start = time.perf_counter()
        for request, gap in zip(requests, arrival_gaps(len(requests), config.request_rate, config.burstiness,
                                                        config.seed)):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(client, request)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(records), duration


def _load_label(config: ServeConfig) -> str:
    rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}"
    return f"rate {rate} req/s, concurrency {config.max_concurrency or 'unbounded'}"


def warm_up(requests: Sequence[BenchRequest], config: ServeConfig, max_tokens: int = 16) -> None:
    """One short request, not measured, so a first-request cost (compilation, allocation) stays out."""
    first = requests[0]
    short = BenchRequest(first.prompt, first.prompt_token_ids, min(first.output_len, max_tokens))
    quiet = dataclasses.replace(config, max_concurrency=1, request_rate=math.inf, progress=False)
    records, _ = asyncio.run(_run([short], quiet, served_model(config)))
    if not records[0].success:
        raise RuntimeError(f"the warm-up request failed: {records[0].error}")


def run_serve(requests: Sequence[BenchRequest], config: ServeConfig, keep_requests: bool = False) -> dict[str, Any]:
    """Send ``requests`` to the server at one load point and summarize.

    Where the server's ``/metrics`` has speculative-decoding counters, read before and after,
    the summary holds ``spec_decode``: the run's drafts and acceptance (``runtime.bench.spec``).
    With ``keep_requests`` the summary also holds ``requests``: each request's prompt and
    output tokens, TTFT, latency, ITLs, the usage the server reported and any error.
    """
    model = served_model(config)
    counters_before = scrape_counters(config.base_url, config.headers())
    records, duration = asyncio.run(_run(requests, config, model))
    spec = acceptance(counters_before, scrape_counters(config.base_url, config.headers()))
    summary = {
        "base_url": config.base_url,
        "endpoint": config.endpoint,
        "model": model,
        "num_prompts": len(requests),
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        **summarize(records, duration, config.percentiles, config.slo),
    }
    if spec is not None:
        summary["spec_decode"] = spec
    errors = sorted({r.error for r in records if r.error})
    if errors:
        summary["errors"] = errors[:10]
    if keep_requests:
        summary["requests"] = [{"prompt_tokens": r.prompt_len, "output_tokens": r.output_tokens, "chunks": r.chunks,
                                "success": r.success, "ttft_s": r.ttft, "latency_s": r.latency, "itl_s": r.itl,
                                "usage": r.usage, "error": r.error} for r in records]
    return summary
