"""Embeddings throughput on a GPU: the Llama-3-8B-shaped random checkpoint used as an embedder
(last-token pooling, normalized), runtime against vLLM 0.22.1, offline, in sequences per second.

Usage: python3 benchmarks/embed_gpu.py PART --json OUT.json [--dir /tmp/llama8b]
  PART = runtime   runtime.LLM(task="embed").embed
       = vllm      vllm.LLM(runner="pooling").embed, the same pooling
       = report    both parts' JSON side by side (reads the runtime.json and vllm.json beside OUT.json),
                   with the cosine between the two engines' vectors of the first prompts
Run each engine part in its own process (gpu_serve.sh's `embed` stage does, with timeouts).

--requests prompts of --prompt-len random token ids, embedded in one call, the best of --rounds
after a warm-up call; both engines get the same step budget (--max-num-batched-tokens) and the
same most sequences a step (--max-num-seqs).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from gpu_parts import run_part

KEPT_VECTORS = 4
"""Vectors of the first prompts each part keeps, for the report's cross-check."""


def prompts(args) -> list[list[int]]:
    """Random ids of ordinary tokens (past the first 1000, where special tokens live, on the 8B shape's vocabulary)."""
    vocab = json.loads((args.dir / "config.json").read_text())["vocab_size"]
    low, high = min(1000, vocab // 4), min(100000, vocab)
    rng = random.Random(0)
    return [[rng.randrange(low, high) for _ in range(args.prompt_len)] for _ in range(args.requests)]


def measure(engine: str, embed, args) -> list[dict]:
    """``embed(prompts) -> vectors`` for either engine: the best of --rounds, in sequences/s."""
    batch = prompts(args)
    embed(batch[:64])
    times, vectors = [], None
    for _ in range(args.rounds):
        start = time.perf_counter()
        vectors = embed(batch)
        times.append(time.perf_counter() - start)
    assert len(vectors) == len(batch)
    best = min(times)
    row = {"engine": engine, "requests": len(batch), "prompt_len": args.prompt_len, "best_s": round(best, 3),
           "sequences_per_s": round(len(batch) / best, 1), "tokens_per_s": round(len(batch) * args.prompt_len / best),
           "dims": len(vectors[0]), "first_vectors": [list(map(float, v)) for v in vectors[:KEPT_VECTORS]]}
    print(json.dumps({k: v for k, v in row.items() if k != "first_vectors"}), flush=True)
    return [row]


def runtime_part(args) -> list[dict]:
    from runtime import LLM
    t0 = time.perf_counter()
    llm = LLM(str(args.dir), device=args.device, dtype="bfloat16", task="embed", max_model_len=args.prompt_len + 64,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              pooler_config={"pooling_type": "LAST", "use_activation": True})
    ready = {"engine": "runtime", "part": "startup", "startup_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(ready), flush=True)
    embed = lambda batch: [o.outputs.embedding for o in llm.embed(batch, use_tqdm=False)]  # noqa: E731
    return [ready] + measure("runtime", embed, args)


def vllm_part(args) -> list[dict]:
    from vllm import LLM
    from vllm.config import PoolerConfig
    t0 = time.perf_counter()
    # A causal LM under runner pooling becomes an embedder that normalizes (use_activation) by default.
    llm = LLM(model=str(args.dir), dtype="bfloat16", runner="pooling", max_model_len=args.prompt_len + 64,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              pooler_config=PoolerConfig(pooling_type="LAST"))
    ready = {"engine": "vllm", "part": "startup", "startup_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(ready), flush=True)

    def embed(batch):
        return [o.outputs.embedding for o in llm.embed([{"prompt_token_ids": p} for p in batch], use_tqdm=False)]

    return [ready] + measure("vllm", embed, args)


def report(args) -> list[dict]:
    parts = {name: json.loads((args.json.parent / f"{name}.json").read_text()) for name in ("runtime", "vllm")}
    rows = {name: next(r for r in part if "sequences_per_s" in r) for name, part in parts.items()}
    ours, theirs = np.array(rows["runtime"]["first_vectors"]), np.array(rows["vllm"]["first_vectors"])
    cosine = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    summary = {"part": "report", "runtime_sequences_per_s": rows["runtime"]["sequences_per_s"],
               "vllm_sequences_per_s": rows["vllm"]["sequences_per_s"],
               "ratio": round(rows["runtime"]["sequences_per_s"] / rows["vllm"]["sequences_per_s"], 3),
               "min_cosine_runtime_vs_vllm": round(float(cosine.min()), 5)}
    print(json.dumps(summary), flush=True)
    return [summary]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["runtime", "vllm", "report"])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama8b"))
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="the runtime part's platform (cpu: a smoke run of the script)")
    run_part({"runtime": runtime_part, "vllm": vllm_part, "report": report}, parser.parse_args())


if __name__ == "__main__":
    main()
