"""Tensor- and pipeline-parallel scaling on a machine with several GPUs (issue 21 runs it; nothing
here needs more than one GPU to start, it skips layouts the machine cannot hold).

Usage: python3 benchmarks/multi_gpu.py --model DIR --json OUT.json [--layouts 1x1 2x1 4x1 8x1 1x2 2x2 4x2]
           [--requests 1000] [--prompt-len 512] [--output-len 128] [--load-format dummy --shape 8b|70b]
           [--engine runtime|vllm]

A layout is TPxPP (tensor-parallel ranks times pipeline stages). Per layout, one engine (its own
process tree; the previous one is shut down first): batch-1 decode tok/s (prompt --prompt-len,
--output-len tokens, the mean step time between the first token and the last), then offline
throughput on --requests random prompts of --prompt-len with --output-len tokens each
(ignore_eos), and the share of a batch-1 decode step spent in collectives (torch profiler:
communication kernels' time over all kernels' time, rank 0).
Model: a Llama-3-8B-shaped (or 70B-shaped) directory of random bf16 weights
(plugins/cuda/benchmarks/decode_llama8b.py writes the 8B one), or with --load-format dummy made-up
weights at load from DIR's config and tokenizer, written there for --shape when DIR has no config
(a 70B checkpoint, 140 GB, need not be written: speed does not depend on weight values).

--engine vllm measures vLLM (0.22.1, ../shared/anchors/vllm.md) the same way, one layout a run
(its engine's processes are not all gone when its LLM is): no collectives' share (its ranks run in
processes this one does not profile). Keep NCCL_NVLS_ENABLE=0 in the environment for both.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from runtime import LLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda" / "benchmarks"))
from decode_llama8b import timed, write_config_and_tokenizer  # noqa: E402

# Llama-3-70B's shape (issue 21), beside the 8B one decode_llama8b.py writes by default.
SHAPES = {"8b": {}, "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                num_attention_heads=64, num_key_value_heads=8)}

COMMUNICATION = ("nccl", "allreduce", "all_reduce", "allgather", "all_gather", "ncclDevKernel")


def communication_share(llm: LLM, prompt: list[int], tokens: int) -> float:
    """Collective kernels' share of all kernel time over a batch-1 decode (rank 0's view)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        timed(llm, [prompt], tokens)
    total = comm = 0.0
    for event in prof.key_averages():
        cuda = getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
        total += cuda
        if any(word.lower() in event.key.lower() for word in COMMUNICATION):
            comm += cuda
    return comm / total if total else 0.0


def open_engine(engine: str, args: argparse.Namespace, tp: int, pp: int):
    """(generate(prompts, max_tokens) -> seconds, the collectives' share of a batch-1 decode of a
    prompt or None, close) for ``engine`` at ``tp`` x ``pp``."""
    settings = dict(dtype="bfloat16", tensor_parallel_size=tp, pipeline_parallel_size=pp, load_format=args.load_format,
                    max_num_seqs=512, max_num_batched_tokens=16384,
                    max_model_len=args.prompt_len + args.output_len + 64)
    if engine == "runtime":
        llm = LLM(args.model, device="cuda", **settings)
        share = (lambda prompt: communication_share(llm, prompt, 32)) if tp > 1 else (lambda prompt: 0.0)
        return (lambda prompts, max_tokens: timed(llm, prompts, max_tokens)), share, llm.engine.shutdown
    from vllm import LLM as VllmLLM, SamplingParams, TokensPrompt

    llm = VllmLLM(args.model, gpu_memory_utilization=0.9, **settings)

    def generate(prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()  # returns once every output is back, so the GPUs are done
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start

    return generate, lambda prompt: None, lambda: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "4x1", "8x1", "1x2", "2x2", "4x2"])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: made-up weights at load, from --model's config and tokenizer")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b",
                        help="with --load-format dummy: the config written when --model has none")
    parser.add_argument("--engine", choices=["runtime", "vllm"], default="runtime")
    args = parser.parse_args()
    if args.engine == "vllm" and len(args.layouts) > 1:
        parser.error("--engine vllm measures one layout a run: run it once for each of --layouts")
    model = Path(args.model)
    if args.load_format == "dummy" and not (model / "config.json").exists():
        write_config_and_tokenizer(model, **SHAPES[args.shape])
    rng = random.Random(0)
    results = []
    for layout in args.layouts:
        tp, pp = (int(n) for n in layout.split("x"))
        size = tp * pp
        if size > torch.cuda.device_count():
            print(f"{layout}: skipped, {torch.cuda.device_count()} GPUs here", flush=True)
            continue
        started = time.perf_counter()
        generate, collectives_share, close = open_engine(args.engine, args, tp, pp)
        ready_s = time.perf_counter() - started

        def prompts(count: int) -> list[list[int]]:  # fresh ids, so nothing hits the prefix cache
            return [[rng.randrange(1000, 100000) for _ in range(args.prompt_len)] for _ in range(count)]

        generate(prompts(1), 8)
        first = generate(prompts(1), 1)
        whole = generate(prompts(1), args.output_len)
        step = (whole - first) / (args.output_len - 1)
        share = collectives_share(prompts(1)[0])
        offline = generate(prompts(args.requests), args.output_len)
        row = {"engine": args.engine, "tp": tp, "pp": pp, "ready_s": round(ready_s, 1),
               "decode_step_ms": round(step * 1000, 3), "batch1_tok_s": round(1 / step, 1),
               "communication_share": None if share is None else round(share, 3),
               "offline_output_tok_s": round(args.requests * args.output_len / offline, 1),
               "requests": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len}
        print(json.dumps(row), flush=True)
        results.append(row)
        close()
        del generate, collectives_share, close
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
