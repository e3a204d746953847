"""Speculative-decoding acceptance over one benchmark run, from the engine's cumulative counters
read before and after it: the engine's stats offline, ``GET /metrics`` against a server (ours,
``runtime:spec_decode_*``, or vLLM's, ``vllm:spec_decode_*``).

Definitions follow vLLM's: acceptance rate = accepted / draft tokens; mean acceptance length =
1 + accepted / drafts (the tokens a verification step yields: the accepted drafts plus the one the
target model samples itself); acceptance rate at position i = drafts whose (i+1)-th token was
accepted / drafts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("runtime:", "vllm:")


@dataclass(frozen=True)
class SpecCounters:
    """The engine's speculative-decoding counters at one moment (cumulative since start)."""

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_position: tuple[int, ...]


def engine_counters(llm: Any) -> Optional[SpecCounters]:
    """An offline ``LLM``'s counters, from its engine's stats; None without speculative decoding."""
    if llm.engine_args.speculative is None:
        return None
    stats = llm.engine.stats()
    return SpecCounters(stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens,
                        tuple(stats.spec_accepted_per_position))


def counters_from_metrics(text: str) -> Optional[SpecCounters]:
    """The counters in a Prometheus text exposition, summed over label sets (model names,
    vLLM's ``engine``), per ``position`` for the per-position one; None where they are absent
    (a server without speculative decoding, or without ``/metrics``) or the text is not one."""
    totals: dict[str, float] = {}
    per_position: dict[int, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                prefix = next((p for p in PREFIXES if sample.name.startswith(p)), None)
                if prefix is None or not sample.name.endswith("_total"):
                    continue
                name = sample.name[len(prefix):-len("_total")]
                if name == "spec_decode_num_accepted_tokens_per_pos":
                    position = int(sample.labels["position"])
                    per_position[position] = per_position.get(position, 0.0) + sample.value
                elif name in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                              "spec_decode_num_accepted_tokens"):
                    totals[name] = totals.get(name, 0.0) + sample.value
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    if "spec_decode_num_drafts" not in totals:
        return None
    positions = tuple(int(per_position.get(i, 0)) for i in range(max(per_position, default=-1) + 1))
    return SpecCounters(int(totals["spec_decode_num_drafts"]), int(totals.get("spec_decode_num_draft_tokens", 0)),
                        int(totals.get("spec_decode_num_accepted_tokens", 0)), positions)


def scrape_counters(base_url: str, headers: Optional[dict[str, str]] = None) -> Optional[SpecCounters]:
    """The counters a server's ``/metrics`` shows now; None where it has none or does not answer."""
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/metrics", headers=headers, timeout=30)
    except httpx.HTTPError:
        return None
    return counters_from_metrics(response.text) if response.status_code == 200 else None


def acceptance(before: Optional[SpecCounters], after: Optional[SpecCounters]) -> Optional[dict[str, Any]]:
    """What the run between two readings drafted and accepted, and the rates derived from it;
    None unless both readings have the counters. A rate with no draft to divide by is NaN."""
    if before is None or after is None:
        return None
    drafts = after.num_drafts - before.num_drafts
    draft_tokens = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    per_position = [a - b for a, b in zip_longest(after.accepted_per_position, before.accepted_per_position,
                                                  fillvalue=0)]
    return {
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else math.nan,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else math.nan,
        "accepted_per_position": per_position,
        "acceptance_rate_per_position": [count / drafts if drafts else math.nan for count in per_position],
    }


def acceptance_text(spec: dict[str, Any], label: str = "") -> str:
    """Two readable lines of :func:`acceptance`'s result (``label``: e.g. the load point)."""
    head = f"speculative decoding{f' ({label})' if label else ''}"
    per_position = " ".join(f"{rate:.1%}" for rate in spec["acceptance_rate_per_position"]) or "-"
    return (f"{head}: acceptance rate {spec['acceptance_rate']:.1%}, mean acceptance length "
            f"{spec['mean_acceptance_length']:.2f} ({spec['num_accepted_tokens']} of {spec['num_draft_tokens']} "
            f"draft tokens accepted, {spec['num_drafts']} drafts)\n  acceptance by position: {per_position}")
