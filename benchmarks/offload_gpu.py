"""KV offload and preemption by swap on a GPU, the Llama-3-8B shape (random bf16 weights).

Usage: python3 benchmarks/offload_gpu.py PART --dir /tmp/llama8b --json OUT.json
  PART = offload   a shared-prefix workload whose prefixes need --prefix-factor (4) times the device KV
                   cache: runtime without, then with --kv-offloading-size (enough for every prefix).
                   Target: >= 1.5x throughput with the host tier, and a higher prefix hit rate.
       = swap      --swap-requests long requests on a KV cache that holds a fraction of them, so the
                   scheduler preempts: --preemption-mode recompute, then swap (and auto).
       = report    read the parts' JSON files beside OUT.json and print the comparisons.
Run each part in its own process (gpu_serve.sh's `offload` stage does, with timeouts).

The offload workload: --prefixes distinct prefixes of --prefix-len tokens, each shared by --uses
requests (a --suffix-len suffix of their own, --output-len tokens, greedy, ignore_eos), submitted
round-robin over the prefixes, so by the time a prefix comes back every other prefix has passed
through the device cache, which holds a 1/--prefix-factor share of them. The cache is sized with
--kv-cache-memory to that share; the host tier gets room for all prefixes and a margin.
Throughput = (prompt + output tokens) / wall time of one LLM.generate over all requests, after a
warm-up generate on other prompts. Prefix hit rate = prefix-cache hits / queries (device), and
the host tier's hits over the tokens the device missed.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

import torch

KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2
"""Llama-3-8B in bf16: 32 layers x K/V x 8 KV heads x head size 128 x 2 bytes (128 KiB)."""
GIB = 1 << 30


def engine(args, **options):
    from runtime import LLM

    return LLM(str(args.dir), dtype="bfloat16", max_model_len=args.max_model_len, seed=0, **options)


def timed(llm, prompts, output_len: int) -> tuple[float, list[list[int]]]:
    from runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [7] * 32}] * 4, params, use_tqdm=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outputs]


def result(name: str, llm, prompts, seconds: float, output_len: int) -> dict:
    kv, sched = llm.engine.kv_manager, llm.engine.scheduler
    tokens = sum(len(p) for p in prompts) + output_len * len(prompts)
    row = {"run": name, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
           "output_tokens_per_s": round(output_len * len(prompts) / seconds, 1),
           "prefix_hit_rate": round(kv.prefix_cache_hits / max(1, kv.prefix_cache_queries), 4),
           "cpu_prefix_hit_rate": round(kv.cpu_prefix_cache_hits / max(1, kv.cpu_prefix_cache_queries), 4),
           "overall_hit_rate": round((kv.prefix_cache_hits + kv.cpu_prefix_cache_hits)
                                     / max(1, kv.prefix_cache_queries), 4),
           "preemptions": sched.num_preemptions, "swaps": sched.num_swaps,
           "device_blocks": llm.engine.num_blocks, "host_blocks": llm.engine.runner.num_host_blocks}
    print(json.dumps(row), flush=True)
    return row


def release(llm) -> None:
    llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def offload(args) -> list[dict]:
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000, 120000) for _ in range(args.prefix_len)] for _ in range(args.prefixes)]
    prompts = [prefixes[i] + [rng.randrange(1000, 120000) for _ in range(args.suffix_len)]
               for _ in range(args.uses) for i in range(args.prefixes)]
    prefix_bytes = args.prefixes * args.prefix_len * KV_BYTES_PER_TOKEN
    device_bytes = prefix_bytes // args.prefix_factor
    host_gib = prefix_bytes * 1.25 / GIB
    rows = []
    for name, options in (("without", {}), ("with", {"kv_offloading_size": host_gib})):
        llm = engine(args, kv_cache_memory=device_bytes, **options)
        seconds, _ = timed(llm, prompts, args.output_len)
        rows.append(result(f"offload-{name}", llm, prompts, seconds, args.output_len))
        release(llm)
    return rows


def swap(args) -> list[dict]:
    rng = random.Random(1)
    prompts = [[rng.randrange(1000, 120000) for _ in range(args.swap_prompt_len)] for _ in range(args.swap_requests)]
    need = args.swap_requests * (args.swap_prompt_len + args.swap_output_len) * KV_BYTES_PER_TOKEN
    device_bytes = int(need * args.swap_cache_share)
    rows, outputs = [], {}
    for mode in ("recompute", "swap", "auto"):
        options = {} if mode == "recompute" else {"kv_offloading_size": need / GIB, "preemption_mode": mode}
        llm = engine(args, kv_cache_memory=device_bytes, enable_prefix_caching=False, **options)
        seconds, outputs[mode] = timed(llm, prompts, args.swap_output_len)
        row = result(f"preempt-{mode}", llm, prompts, seconds, args.swap_output_len)
        row["resolved_mode"] = llm.engine.preemption_mode
        row["same_tokens_as_recompute"] = sum(a == b for a, b in zip(outputs[mode], outputs["recompute"])) / len(prompts)
        rows.append(row)
        release(llm)
    return rows


def report(args) -> list[dict]:
    rows = {row["run"]: row for path in sorted(args.json.parent.glob("*.json")) if path != args.json
            for row in json.loads(path.read_text()) if "run" in row}
    summary = []
    if {"offload-with", "offload-without"} <= rows.keys():
        with_, without = rows["offload-with"], rows["offload-without"]
        speedup = with_["tokens_per_s"] / without["tokens_per_s"]
        summary.append({"comparison": "offload", "speedup": round(speedup, 2), "target": 1.5,
                        "met": speedup >= 1.5 and with_["overall_hit_rate"] > without["overall_hit_rate"],
                        "hit_rate_without": without["overall_hit_rate"], "hit_rate_with": with_["overall_hit_rate"]})
    if {"preempt-swap", "preempt-recompute"} <= rows.keys():
        summary.append({"comparison": "swap vs recompute",
                        "speedup": round(rows["preempt-swap"]["tokens_per_s"] / rows["preempt-recompute"]["tokens_per_s"], 2),
                        "auto_chose": rows.get("preempt-auto", {}).get("resolved_mode")})
    for row in summary:
        print(json.dumps(row))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["offload", "swap", "report"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama8b"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--prefixes", type=int, default=128,
                        help="distinct prefixes (128: a device cache of 8 GiB at factor 4; 32, the first runs' "
                             "2 GiB, holds only 7 requests, so decoding at batch 7 bounds any gain to ~1.4x)")
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--suffix-len", type=int, default=64)
    parser.add_argument("--uses", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prefix-factor", type=int, default=4)
    parser.add_argument("--swap-requests", type=int, default=64)
    parser.add_argument("--swap-prompt-len", type=int, default=1024)
    parser.add_argument("--swap-output-len", type=int, default=512)
    parser.add_argument("--swap-cache-share", type=float, default=0.25,
                        help="the device KV cache as a share of what every swap request needs at its end")
    args = parser.parse_args()
    rows = {"offload": offload, "swap": swap, "report": report}[args.part](args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
