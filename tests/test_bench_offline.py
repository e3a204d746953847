"""``runtime bench throughput`` and ``runtime bench latency`` on a tiny model: results and their counts."""

from __future__ import annotations

import json

import pytest

from runtime.cli import main

from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("bench")

ENGINE = ["--kv-cache-memory", "16MiB", "--max-model-len", "256", "--disable-tqdm"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("bench-offline"), "llama"))


@pytest.mark.parametrize("dataset", ["random", "prefix"])
def test_throughput(checkpoint, tmp_path, dataset, capsys):
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--model", checkpoint, "--dataset-name", dataset, "--num-prompts", "4",
                 "--random-input-len", "16", "--random-output-len", "8", "--prefix-len", "32", *ENGINE,
                 "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "throughput" and result["dataset"] == dataset
    assert result["num_requests"] == 4 and result["total_output_tokens"] == 32
    assert result["total_input_tokens"] >= 4 * (16 if dataset == "random" else 48)
    assert result["output_throughput"] == pytest.approx(32 / result["elapsed_s"])
    assert "output_throughput" in capsys.readouterr().out


def test_latency(checkpoint, tmp_path):
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--model", checkpoint, "--batch-size", "2", "--input-len", "8",
                 "--output-len", "4", "--num-iters", "2", "--num-iters-warmup", "1", *ENGINE,
                 "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["batch_size"], result["input_len"], result["output_len"], result["iterations"]) == (2, 8, 4, 2)
    for key in ("prefill_latency_ms", "decode_step_latency_ms", "e2e_latency_ms"):
        assert set(result[key]) == {"mean", "p50", "p90", "p99"} and result[key]["mean"] > 0
    assert result["e2e_latency_ms"]["mean"] > result["prefill_latency_ms"]["mean"]
