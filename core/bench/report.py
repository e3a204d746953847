"""Readable tables of benchmark results, and the JSON file they are saved to."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, numbers right-aligned and rounded for reading."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table in Markdown, for docs/benchmarks.md."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" ---: " for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return "-" if value is None else str(value)


def load_of(summary: dict[str, Any]) -> str:
    """The load point of a serve run as a short label, e.g. ``c=16`` or ``4 req/s, c=16``."""
    parts = [] if summary["request_rate"] == "inf" else [f"{summary['request_rate']:g} req/s"]
    if summary["max_concurrency"]:
        parts.append(f"c={summary['max_concurrency']}")
    return ", ".join(parts) or "all at once"


def serve_table(summaries: Sequence[dict[str, Any]]) -> str:
    """One row per load point: counts, throughputs and, per latency metric, median and top percentile."""
    top = next((k for k in reversed(summaries[0]["ttft_ms"]) if k.startswith("p")), "p99") if summaries else "p99"
    headers = ["load", "ok", "failed", "req/s", "out tok/s"]
    for metric in ("TTFT", "TPOT", "ITL", "E2EL"):
        headers += [f"{metric} p50 ms", f"{metric} {top} ms"]
    with_goodput = any("request_goodput" in s for s in summaries)
    if with_goodput:
        headers.append("goodput req/s")
    rows = []
    for s in summaries:
        row = [load_of(s), s["completed"], s["failed"], s["request_throughput"], s["output_throughput"]]
        for metric in ("ttft", "tpot", "itl", "e2el"):
            dist = s[f"{metric}_ms"]
            row += [dist.get("p50", dist["median"]), dist.get(top, math.nan)]
        if with_goodput:
            row.append(s.get("request_goodput"))
        rows.append(row)
    return table(headers, rows)


def key_values(result: dict[str, Any]) -> str:
    """``key  value`` lines for a result (the offline benchmarks); a dict value goes on one line."""
    width = max(len(k) for k in result)

    def value(v: Any) -> str:
        return "  ".join(f"{k} {_cell(x)}" for k, x in v.items()) if isinstance(v, dict) else _cell(v)

    return "\n".join(f"{k:<{width}}  {value(v)}" for k, v in result.items())


def save_json(result: Any, path: str) -> None:
    """Write ``result`` as indented JSON (infinite and NaN numbers as strings, so any parser reads it)."""
    Path(path).expanduser().write_text(json.dumps(_finite(result), indent=2) + "\n", encoding="utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
