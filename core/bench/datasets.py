"""Benchmark workloads: each request is a prompt (text and token ids) and how many tokens to generate.

- ``random``: prompts of random tokens with lengths drawn uniformly from
  ``[len * (1 - range_ratio), len * (1 + range_ratio)]`` (vLLM's random dataset).
- ``sharegpt``: the first human turn of each conversation in a ShareGPT-format JSON file, with
  the reply's length as the output length unless one is forced.
- ``prefix``: many requests behind one long shared system prompt, each with its own short
  random question: the workload that prefix caching speeds up.

Token ids serve the offline benchmarks exactly; servers get the text, which a server's own
tokenizer may split a few tokens differently, so the serve benchmark counts prompt tokens from
the usage the server reports.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DATASETS = ("random", "sharegpt", "prefix")


@dataclass
class BenchRequest:
    prompt: str
    prompt_token_ids: list[int]
    output_len: int


def load_tokenizer(name: Optional[str]) -> Any:
    """The HF tokenizer of a model as ``runtime serve`` would load it (None: the embedded model);
    a directory's weights are not needed (a server may run it with ``--load-format dummy``)."""
    from ..loader.source import open_model

    if name is not None and Path(name).expanduser().is_dir():
        from ..loader.safetensors import open_tokenizer

        return open_tokenizer(Path(name).expanduser())
    return open_model(name).tokenizer


def _lengths(rng: random.Random, count: int, mean: int, range_ratio: float) -> list[int]:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low, high = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(count)]


def _normal_token_ids(tokenizer: Any) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def random_text(tokenizer: Any, rng: random.Random, length: int, vocab: list[int]) -> tuple[str, list[int]]:
    """Text of ``length`` tokens: random ids, decoded, re-encoded and cut, so the text encodes
    back to (nearly) the same ids instead of drifting by whatever the decode merged or split."""
    ids = [rng.choice(vocab) for _ in range(length)]
    for _ in range(3):
        ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)[:length]
        while len(ids) < length:
            ids.append(rng.choice(vocab))
    return tokenizer.decode(ids), ids


def random_requests(tokenizer: Any, num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    seed: int = 0) -> list[BenchRequest]:
    """``num`` requests of random tokens (lengths per the module docstring)."""
    rng = random.Random(seed)
    vocab = _normal_token_ids(tokenizer)
    inputs = _lengths(rng, num, input_len, range_ratio)
    outputs = _lengths(rng, num, output_len, range_ratio)
    return [BenchRequest(*random_text(tokenizer, rng, n_in, vocab), n_out) for n_in, n_out in zip(inputs, outputs)]


def prefix_requests(tokenizer: Any, num: int, prefix_len: int, input_len: int, output_len: int,
                    seed: int = 0) -> list[BenchRequest]:
    """``num`` requests sharing one ``prefix_len``-token prompt, each followed by its own
    ``input_len`` random tokens."""
    rng = random.Random(seed)
    vocab = _normal_token_ids(tokenizer)
    prefix, _ = random_text(tokenizer, rng, prefix_len, vocab)
    requests = []
    for _ in range(num):
        suffix, _ = random_text(tokenizer, rng, input_len, vocab)
        text = f"{prefix}\n\n{suffix}"
        requests.append(BenchRequest(text, tokenizer.encode(text, add_special_tokens=False), output_len))
    return requests


def sharegpt_requests(path: str, tokenizer: Any, num: int, output_len: Optional[int] = None, seed: int = 0,
                      max_prompt_len: int = 1024, max_total_len: int = 2048) -> list[BenchRequest]:
    """``num`` requests from a ShareGPT JSON file (a list of ``{"conversations": [{"from", "value"}, ...]}``).

    Conversations are shuffled with ``seed``; as in vLLM, those with fewer than two turns, a
    prompt or reply under 4 tokens, a prompt over ``max_prompt_len`` or a total over
    ``max_total_len`` are skipped. ``output_len`` forces every output length.
    """
    with open(Path(path).expanduser(), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    conversations = [d["conversations"] for d in data
                     if isinstance(d, dict) and len(d.get("conversations") or []) >= 2]
    random.Random(seed).shuffle(conversations)
    requests = []
    for conv in conversations:
        if len(requests) == num:
            break
        prompt, reply = conv[0]["value"], conv[1]["value"]
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        reply_len = output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        if len(ids) < 4 or reply_len < 4 or len(ids) > max_prompt_len or len(ids) + reply_len > max_total_len:
            continue
        requests.append(BenchRequest(prompt, ids, reply_len))
    if len(requests) < num:
        raise ValueError(f"{path}: only {len(requests)} usable conversations, {num} requested")
    return requests


def make_requests(name: str, tokenizer: Any, num: int, *, input_len: int = 128, output_len: int = 128,
                  range_ratio: float = 0.0, prefix_len: int = 512, dataset_path: Optional[str] = None,
                  sharegpt_output_len: Optional[int] = None, seed: int = 0) -> list[BenchRequest]:
    """The workload ``name`` (one of ``DATASETS``) with the given shape; see each maker."""
    if num < 1:
        raise ValueError(f"number of prompts must be >= 1, got {num}")
    if name == "random":
        return random_requests(tokenizer, num, input_len, output_len, range_ratio, seed)
    if name == "prefix":
        return prefix_requests(tokenizer, num, prefix_len, input_len, output_len, seed)
    if name == "sharegpt":
        if not dataset_path:
            raise ValueError("the sharegpt dataset needs --dataset-path FILE.json")
        return sharegpt_requests(dataset_path, tokenizer, num, sharegpt_output_len, seed)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
