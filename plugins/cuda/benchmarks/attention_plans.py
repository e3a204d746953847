"""Sweep the unified attention kernel's launch parameters on the steps of the offline benchmark.

Usage: python plugins/cuda/benchmarks/attention_plans.py --out plans.json

Llama-3-8B's head layout (32 query, 8 KV heads of 128, bf16, 16-token blocks). Cases: a decode
step of 512 sequences at context 576 (the offline run's decode phase) and the prefill of 32
fresh 512-token prompts (its prefill chunks). For each: the time of ``plan_launch``'s choice
(what the backend runs), then every (block_m, tile_n, num_warps, num_stages) of a small grid,
best first, with the largest difference of the best one's output from the plan's.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from attention_kernel import HEAD, HEADS, KV_HEADS, batch
from runtime_triton.tile_plans.nvidia import attention as plan_launch
from runtime_triton.paged_attention import unified_attention

CASES = {"decode 512 x context 576": (512, 576, 1), "prefill 32 x 512": (32, 512, 512)}
GRIDS = {
    "decode 512 x context 576": itertools.product((16,), (32, 64, 128), (2, 4, 8), (2, 3, 4, 5)),
    "prefill 32 x 512": itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)),
}


def run(query, cache, meta, out, block_m, tile_n, num_warps, num_stages):
    return unified_attention(query, cache, out, meta.query_start_loc, meta.seq_lens, meta.block_table, meta.num_seqs,
                             scale=HEAD ** -0.5, sliding_window=None, soft_cap=None, block_m=block_m, tile_n=tile_n,
                             num_warps=num_warps, num_stages=num_stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {}
    for case, (num_seqs, context, new) in CASES.items():
        query, cache, meta = batch(num_seqs, context, new)
        block_m, tile_n, splits, warps = plan_launch(
            num_seqs=num_seqs, max_query_len=new, max_seq_len=context, num_heads=HEADS, num_kv_heads=KV_HEADS,
            head_size=HEAD, dtype=query.dtype, multiprocessors=torch.cuda.get_device_properties(0).multi_processor_count)
        assert splits == 1, "the cases are sized to need no split"
        plan = (block_m, tile_n, warps, 2)
        reference = run(query, cache, meta, torch.empty_like(query), *plan)
        timed = []
        for config in [plan, *GRIDS[case]]:
            out = torch.empty_like(query)
            try:
                ms = do_bench(lambda: run(query, cache, meta, out, *config), return_mode="median")
            except OutOfResources:
                continue
            timed.append((ms, config, (out.float() - reference.float()).abs().max().item()))
        plan_ms = timed[0][0]
        kv_bytes = 2 * num_seqs * context * KV_HEADS * HEAD * 2
        flops = 4 * num_seqs * (context * new - new * (new - 1) / 2) * HEADS * HEAD
        ranked = sorted(timed[1:])
        results[case] = {
            "plan": {"config": plan, "ms": round(plan_ms, 4)},
            "best": [{"config": c, "ms": round(ms, 4), "vs_plan": round(plan_ms / ms, 3), "max_abs_diff": diff}
                     for ms, c, diff in ranked[:8]],
            "kv_bytes": kv_bytes, "flops": flops,
            "plan_TBps": round(kv_bytes / plan_ms / 1e9, 2), "plan_TFLOPs": round(flops / plan_ms / 1e9, 1),
            "best_TBps": round(kv_bytes / ranked[0][0] / 1e9, 2), "best_TFLOPs": round(flops / ranked[0][0] / 1e9, 1)}
        print(case, json.dumps(results[case]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
