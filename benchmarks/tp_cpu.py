"""Tensor and pipeline parallelism on the CPU: the embedded model split across ranks of 1 thread
each against 1 rank using every core, and how a split decode step divides between compute and
communication.

Usage: .venv/bin/python benchmarks/tp_cpu.py [--layouts 1x1 3x1 1x2] [--tokens 64] [--batch 16] [--json OUT.json]

A layout is TPxPP: tensor-parallel ranks times pipeline stages. The embedded SmolLM2-135M has 9
query and 3 KV heads: it splits 3 ways, not 2; its 30 layers split into any number of stages.
Per layout: batch-1 decode tok/s (a 32-token prompt, --tokens tokens, ignore_eos; the first
token's time left out) and --batch prompts at once (output tok/s). With tensor parallelism,
rank 0 is profiled over one batch-1 generation: the share of its CPU time in gloo collectives.
With pipeline stages, the share of rank 0's wall time spent waiting for the last stage's
results during the --batch run (time in which the first stage has nothing to compute).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from runtime import LLM, SamplingParams

COLLECTIVES = ("allreduce", "all_reduce", "allgather", "all_gather", "gloo")


def decode_rate(llm: LLM, tokens: int, batch: int) -> float:
    prompts = [{"prompt_token_ids": [100 + (7 * i + j) % 4000 for j in range(32)]} for i in range(batch)]

    def run(n: int) -> float:
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    run(2)
    first = run(1)
    return batch * (tokens - 1) / (run(tokens) - first)


def collective_share(llm: LLM, tokens: int) -> float:
    prompt = [{"prompt_token_ids": list(range(200, 232))}]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    comm = sum(e.self_cpu_time_total for e in events if any(w in e.key.lower() for w in COLLECTIVES))
    return comm / total if total else 0.0


def waiting_share(llm: LLM, tokens: int, batch: int) -> float:
    """Share of a --batch run's wall time rank 0 spends waiting for the last stage's results."""
    executor = llm.engine.executor
    receive, waited = executor._receive_result, [0.0]

    def timed(step: int):
        start = time.perf_counter()
        try:
            return receive(step)
        finally:
            waited[0] += time.perf_counter() - start

    executor._receive_result = timed
    prompts = [{"prompt_token_ids": [100 + (7 * i + j) % 4000 for j in range(32)]} for i in range(batch)]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    executor._receive_result = receive
    return waited[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["1x1", "3x1", "1x2"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for layout in args.layouts:
        tp, pp = (int(n) for n in layout.split("x"))
        llm = LLM(tensor_parallel_size=tp, pipeline_parallel_size=pp)
        row = {"tensor_parallel": tp, "pipeline_parallel": pp, "threads_per_rank": torch.get_num_threads(),
               "batch1_tok_s": round(decode_rate(llm, args.tokens, 1), 2),
               f"batch{args.batch}_tok_s": round(decode_rate(llm, args.tokens, args.batch), 2)}
        if tp > 1:
            row["rank0_collective_share"] = round(collective_share(llm, args.tokens), 3)
        if pp > 1:
            row["rank0_waiting_share"] = round(waiting_share(llm, args.tokens, args.batch), 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
        llm.engine.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
