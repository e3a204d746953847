"""How many engine steps a workload takes, from the scheduler alone: no model, no device.

Replays an offline workload (N requests of P prompt tokens, O output tokens each, all added at
once) through the real ``Scheduler`` and ``KVCacheManager`` as ``EngineCore.step`` drives them,
with look-ahead (the next step scheduled while this one is in flight, as with CUDA graphs) and
without, every sampled token accepted. On a model whose step costs about the same at 100 rows as
at 1000 (an MoE layer reads every expert either way) offline throughput follows the step count,
so a scheduling regression shows here in seconds on a CPU.

    .venv/bin/python benchmarks/scheduler_replay.py --cache-tokens 123456      # Qwen3-30B-A3B on an H100
"""

from __future__ import annotations

import argparse
import json
import random

from runtime.kv.manager import KVCacheManager
from runtime.sample.params import SamplingParams
from runtime.sched.request import Request
from runtime.sched.scheduler import Scheduler


def replay(args: argparse.Namespace, look_ahead: bool) -> dict:
    scheduler = Scheduler(KVCacheManager(args.cache_tokens // args.block_size, args.block_size),
                          args.max_num_seqs, args.max_num_batched_tokens)
    rng = random.Random(0)  # distinct prompts: no prefix-cache hits
    for i in range(args.requests):
        prompt = [rng.randrange(100_000) for _ in range(args.prompt_len)]
        scheduler.add_request(Request(str(i), prompt, SamplingParams(max_tokens=args.output_len, ignore_eos=True),
                                      max_model_len=args.prompt_len + args.output_len))
    steps = tokens = decode_rows = 0
    in_flight = None
    while scheduler.has_unfinished_requests() or in_flight is not None:
        out, in_flight = in_flight or scheduler.schedule(), None
        if look_ahead:
            in_flight = scheduler.look_ahead(out)
        scheduler.update(out, {s.request.request_id: [7] for s in out.scheduled if s.sample})
        steps += 1
        tokens += out.num_batched_tokens
        decode_rows += sum(s.num_new_tokens == 1 for s in out.scheduled)
    return {"look_ahead": look_ahead, "steps": steps, "tokens": tokens,
            "workload_tokens": args.requests * (args.prompt_len + args.output_len),
            "preemptions": scheduler.num_preemptions, "tokens_per_step": round(tokens / steps, 1),
            "decode_rows_per_step": round(decode_rows / steps, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-tokens", type=int, required=True, help="the KV cache's size in tokens (the engine logs it)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = parser.parse_args()
    for look_ahead in (True, False):
        print(json.dumps(replay(args, look_ahead)))


if __name__ == "__main__":
    main()
