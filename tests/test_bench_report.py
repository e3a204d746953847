"""Tables, JSON and charts of benchmark results."""

from __future__ import annotations

import json
import math

import pytest

from runtime.bench.metrics import RequestRecord, summarize
from runtime.bench.report import key_values, load_of, save_json, serve_table


def run(concurrency, slo=None):
    records = [RequestRecord(prompt_len=8, output_tokens=3, success=True, ttft=0.1, latency=0.3, itl=[0.1, 0.1],
                             chunks=3)]
    return {"request_rate": "inf", "max_concurrency": concurrency, "model": "m", **summarize(records, 1.0, slo=slo)}


def test_serve_table_has_one_row_per_load_point():
    text = serve_table([run(1), run(8)])
    lines = text.splitlines()
    assert len(lines) == 4
    assert "TTFT p50 ms" in lines[0] and "TTFT p99 ms" in lines[0] and "goodput" not in lines[0]
    assert lines[2].split()[0] == "c=1" and lines[3].split()[0] == "c=8"
    assert "goodput req/s" in serve_table([run(1, slo={"ttft": 1.0})])


def test_load_labels():
    assert load_of({"request_rate": 4.0, "max_concurrency": 16}) == "4 req/s, c=16"
    assert load_of({"request_rate": "inf", "max_concurrency": None}) == "all at once"


def test_json_keeps_infinities_readable(tmp_path):
    path = tmp_path / "r.json"
    save_json({"rate": math.inf, "nan": math.nan, "runs": [{"x": 1.5}]}, str(path))
    assert json.loads(path.read_text()) == {"rate": "inf", "nan": "nan", "runs": [{"x": 1.5}]}


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from runtime.bench.plot import plot_serve

    path = tmp_path / "chart.png"
    plot_serve({"a": [run(1), run(4)], "b": [run(1), run(4)]}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_key_values_puts_a_distribution_on_one_line():
    text = key_values({"benchmark": "latency", "prefill_latency_ms": {"mean": 12.34, "p99": 20.0}})
    assert text.splitlines() == ["benchmark           latency", "prefill_latency_ms  mean 12.3  p99 20.0"]
