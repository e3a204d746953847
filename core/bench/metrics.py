"""From per-request timings to a summary: TTFT, TPOT, ITL and end-to-end latency percentiles,
request and token throughput, and goodput under an SLO.

Definitions follow vLLM's ``benchmark_serving`` so numbers compare across tools:

- TTFT: request sent to the first chunk that carries generated tokens.
- TPOT: per request, ``(e2e latency - TTFT) / (output tokens - 1)``; undefined for one token.
- ITL: every gap between two successive token-carrying chunks, over all requests. A chunk may
  carry several tokens (the server held back an incomplete character, or speculative decoding
  accepted several), so ITL and TPOT differ when it does.
- E2EL: request sent to its last byte.
- goodput: requests per second that met every SLO given.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What the client saw of one request. Times are seconds (``time.perf_counter``)."""

    prompt_len: int
    """Prompt tokens: the server's usage when it reported one, else the client's own count."""
    output_tokens: int = 0
    """Generated tokens received: the sum of per-chunk token counts."""
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    """End-to-end: request sent to stream end."""
    itl: list[float] = field(default_factory=list)
    """Gaps between successive token-carrying chunks."""
    chunks: int = 0
    """Token-carrying chunks received."""
    usage: Optional[dict] = None
    """The final usage object the server sent, if any."""
    text: str = ""
    error: str = ""

    @property
    def tpot(self) -> Optional[float]:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float], percentiles: Iterable[float]) -> dict[str, float]:
    """mean, median, std and each percentile of ``values`` (seconds), in milliseconds."""
    ms = [v * 1000 for v in values]
    out = {"mean": statistics.fmean(ms) if ms else math.nan,
           "median": statistics.median(ms) if ms else math.nan,
           "std": statistics.pstdev(ms) if ms else math.nan}
    for q in percentiles:
        out[f"p{q:g}"] = percentile(ms, q)
    return out


def parse_slo(items: Iterable[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` (milliseconds, vLLM's ``--goodput`` syntax) -> seconds per metric."""
    slo = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"SLO {item!r}: expected METRIC:MILLISECONDS with METRIC one of {', '.join(SLO_METRICS)}")
        try:
            slo[name] = float(value) / 1000
        except ValueError:
            raise ValueError(f"SLO {item!r}: {value!r} is not a number of milliseconds") from None
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether a successful request met every SLO; a TPOT SLO holds for a one-token request."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot, "e2el": record.latency}
    return all(values[name] is None or values[name] <= limit for name, limit in slo.items())


def summarize(records: Sequence[RequestRecord], duration: float, percentiles: Sequence[float] = (50, 90, 99),
              slo: Optional[dict[str, float]] = None) -> dict:
    """The summary of one run: counts, throughputs and, per metric, ``{metric}_ms`` distributions.

    ``duration`` is the wall time of the run in seconds; throughputs are per second of it.
    """
    ok = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per_metric = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    summary = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else math.nan,
        "output_throughput": output_tokens / duration if duration > 0 else math.nan,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else math.nan,
    }
    if slo:
        good = sum(meets_slo(r, slo) for r in records)
        summary["slo_ms"] = {name: limit * 1000 for name, limit in slo.items()}
        summary["good_requests"] = good
        summary["request_goodput"] = good / duration if duration > 0 else math.nan
    for name in METRICS:
        summary[f"{name}_ms"] = distribution(per_metric[name], percentiles)
    return summary
