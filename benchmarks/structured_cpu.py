"""Structured output on the CPU: the embedded model, 16 concurrent requests with a JSON schema
each against the same requests unconstrained, and the time to compile the schemas.

Usage: .venv/bin/python benchmarks/structured_cpu.py [--requests 16] [--tokens 64] [--rounds 3] [--json OUT.json]

Throughput: one LLM, the same 16 chat prompts (asking for a list of people as JSON) with a
JSON schema each (8 schemas, each twice), greedy, ignore_eos, up to --tokens each; a request
ends where its grammar does. Then the same prompts unconstrained, each with max_tokens set to
its constrained output's length (the same batch sizes step by step); alternating constrained
and plain rounds (the best of --rounds each: the machine may be shared); tokens/s count the
tokens produced. ``masked_fraction`` is the share of those tokens whose row was masked. Compile: every schema of
tests/json_schemas.py compiled against the model's vocabulary on a fresh compiler (p50/p99),
then again (cached), and the tokenizer-free check the API process runs on each request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from json_schemas import SCHEMAS  # noqa: E402

from runtime import LLM, SamplingParams  # noqa: E402
from runtime.sample.params import StructuredOutputsParams  # noqa: E402
from runtime.structured.grammar import GrammarCompiler, check, grammar_key  # noqa: E402

STRING = {"type": "string"}
PERSON = {"type": "object", "properties": {"name": STRING, "age": {"type": "integer"}, "city": STRING},
          "required": ["name", "age", "city"]}
THROUGHPUT_SCHEMAS = [
    {"type": "array", "items": PERSON},
    {"type": "object", "properties": {"people": {"type": "array", "items": PERSON}}, "required": ["people"]},
    {"type": "array", "items": {"type": "object", "properties": {"name": STRING, "email": STRING},
                                "required": ["name", "email"]}},
    {"type": "object", "properties": {"title": STRING, "chapters": {"type": "array", "items": STRING}},
     "required": ["title", "chapters"]},
    {"type": "array", "items": {"type": "object", "properties": {"city": STRING, "country": STRING,
                                                                 "population": {"type": "integer"}},
                                "required": ["city", "country", "population"]}},
    {"type": "object", "properties": {"summary": STRING, "points": {"type": "array", "items": STRING}},
     "required": ["summary", "points"]},
    {"type": "array", "items": {"type": "object", "properties": {"product": STRING, "price": {"type": "number"},
                                                                 "in_stock": {"type": "boolean"}},
                                "required": ["product", "price", "in_stock"]}},
    {"type": "array", "items": {"type": "object", "properties": {"step": {"type": "integer"}, "action": STRING},
                                "required": ["step", "action"]}},
]
PROMPT = "List twenty fictional people with their details as JSON. Example {}."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def throughput(llm: LLM, requests: int, tokens: int, rounds: int) -> dict:
    messages = [[{"role": "user", "content": PROMPT.format(i)}] for i in range(requests)]
    constrained = [SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                                  structured_outputs=StructuredOutputsParams(json=THROUGHPUT_SCHEMAS[i % 8]))
                   for i in range(requests)]
    manager = llm.engine.structured
    fill = manager.bitmask
    masked = [0]

    def counted(items):
        out = fill(items)
        masked[0] += 0 if out is None else len(out.rows)
        return out

    manager.bitmask = counted
    llm.chat(messages[:2], SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)  # warm-up
    llm.chat(messages[:2], constrained[:2], use_tqdm=False)
    times = {"plain": [], "constrained": []}
    for _ in range(rounds):
        masked[0] = 0
        start = time.perf_counter()
        outputs = llm.chat(messages, constrained, use_tqdm=False)
        times["constrained"].append(time.perf_counter() - start)
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        # The same lengths unconstrained (a request ends where its grammar did): the same batch sizes step by step.
        plain = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
        start = time.perf_counter()
        llm.chat(messages, plain, use_tqdm=False)
        times["plain"].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    total = sum(lengths)
    return {"requests": requests, "tokens_each": tokens, "output_tokens": total,
            "plain_tokens_per_s": round(total / best["plain"], 1),
            "constrained_tokens_per_s": round(total / best["constrained"], 1),
            "overhead_pct": round(100 * (best["constrained"] / best["plain"] - 1), 2),
            "masked_fraction": round(masked[0] / total, 3),
            "rounds_s": {name: [round(t, 2) for t in values] for name, values in times.items()}}


def compile_times(llm: LLM) -> dict:
    engine = llm.engine
    compiler = GrammarCompiler(engine.source.tokenizer, engine.runner.settings.vocab_size, sorted(engine.eos_token_ids))
    keys = [grammar_key(StructuredOutputsParams(json=schema)) for schema in SCHEMAS.values()]
    first, cached, checks = [], [], []
    for key in keys:
        start = time.perf_counter()
        compiler.compile(key)
        first.append(time.perf_counter() - start)
    for key in keys:
        start = time.perf_counter()
        compiler.compile(key)
        cached.append(time.perf_counter() - start)
    for schema in SCHEMAS.values():
        start = time.perf_counter()
        check(StructuredOutputsParams(json=schema))
        checks.append(time.perf_counter() - start)

    def ms(values: list[float]) -> dict:
        return {"p50_ms": round(1e3 * statistics.median(values), 3), "p99_ms": round(1e3 * percentile(values, 0.99), 3),
                "max_ms": round(1e3 * max(values), 3)}

    return {"schemas": len(keys), "compile": ms(first), "cached_compile": ms(cached), "api_check": ms(checks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    llm = LLM(max_model_len=512)
    result = {"compile": compile_times(llm)}
    print(json.dumps(result), flush=True)
    result["throughput"] = throughput(llm, args.requests, args.tokens, args.rounds)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
