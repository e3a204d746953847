"""Benchmark workloads: random lengths, the shared prefix, and ShareGPT files."""

from __future__ import annotations

import json

import pytest

from runtime.bench.datasets import make_requests

from tiny_models import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def test_random_prompts_have_the_requested_token_counts(tokenizer):
    requests = make_requests("random", tokenizer, 6, input_len=40, output_len=8, seed=3)
    assert [len(r.prompt_token_ids) for r in requests] == [40] * 6
    assert [r.output_len for r in requests] == [8] * 6
    for r in requests:
        assert r.prompt_token_ids and not set(r.prompt_token_ids) & set(tokenizer.all_special_ids)
        # The text re-encodes to (nearly) the ids, so a server sees about the same prompt length.
        assert abs(len(tokenizer.encode(r.prompt, add_special_tokens=False)) - 40) <= 2
    assert make_requests("random", tokenizer, 6, input_len=40, output_len=8, seed=3) == requests


def test_random_lengths_spread_by_the_range_ratio(tokenizer):
    requests = make_requests("random", tokenizer, 50, input_len=20, output_len=10, range_ratio=0.5)
    inputs = {len(r.prompt_token_ids) for r in requests}
    outputs = {r.output_len for r in requests}
    assert min(inputs) >= 10 and max(inputs) <= 30 and len(inputs) > 5
    assert min(outputs) >= 5 and max(outputs) <= 15 and len(outputs) > 3


def test_prefix_requests_share_one_long_prefix(tokenizer):
    requests = make_requests("prefix", tokenizer, 5, prefix_len=64, input_len=8, output_len=4)
    prefix = requests[0].prompt.split("\n\n")[0]
    assert all(r.prompt.startswith(prefix + "\n\n") for r in requests)
    assert len({r.prompt for r in requests}) == 5
    shared = min(next((i for i, (a, b) in enumerate(zip(requests[0].prompt_token_ids, r.prompt_token_ids)) if a != b),
                      len(r.prompt_token_ids)) for r in requests[1:])
    assert shared >= 60


def test_sharegpt_takes_first_turns_and_reply_lengths(tokenizer, tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "Tell me about the sea and its waves."},
                           {"from": "gpt", "value": "The sea is large and blue, with waves."}]},
        {"conversations": [{"from": "human", "value": "Only one turn here, so it is skipped."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Too short a prompt."}]},
        {"conversations": [{"from": "human", "value": "What is a quick brown fox?"},
                           {"from": "gpt", "value": "An animal in a sentence that uses every letter."}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    requests = make_requests("sharegpt", tokenizer, 2, dataset_path=str(path))
    prompts = sorted(r.prompt for r in requests)
    assert prompts == ["Tell me about the sea and its waves.", "What is a quick brown fox?"]
    for r in requests:
        reply = next(d["conversations"][1]["value"] for d in data if d["conversations"][0]["value"] == r.prompt)
        assert r.output_len == len(tokenizer.encode(reply, add_special_tokens=False))
    forced = make_requests("sharegpt", tokenizer, 2, dataset_path=str(path), sharegpt_output_len=7)
    assert [r.output_len for r in forced] == [7, 7]
    with pytest.raises(ValueError, match="only 2 usable"):
        make_requests("sharegpt", tokenizer, 3, dataset_path=str(path))
    with pytest.raises(ValueError, match="--dataset-path"):
        make_requests("sharegpt", tokenizer, 1)
