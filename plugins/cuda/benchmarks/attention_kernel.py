"""Time the unified Triton attention alone on Llama-3-8B's head layout (32 query, 8 KV heads of 128, bf16).

Usage: python plugins/cuda/benchmarks/attention_kernel.py [--json results.json]

Decode is memory-bound: the floor is reading every cached K/V once, so the table gives the
achieved bandwidth (compare with a device-to-device copy, about 3 TB/s on an H100). Decode at
batch 1 runs with the backend's own plan (split-K) and without splitting, to show what the split
buys. Prefill is compute-bound: causal FLOPs (4 * T^2 / 2 * H * D) over time, beside torch's
fused SDPA on the same contiguous tensors as a point of comparison.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from runtime.platform import AttentionMetadata
from runtime_triton.tile_plans.nvidia import attention as plan_launch
from runtime_triton.paged_attention import split_workspace, unified_attention

HEADS, KV_HEADS, HEAD, BLOCK = 32, 8, 128, 16


def batch(num_seqs: int, context: int, new: int):
    """Inputs of one step: num_seqs sequences of ``context`` tokens, the last ``new`` of them new."""
    blocks_each = -(-context // BLOCK)
    cache = torch.randn(2, 1 + num_seqs * blocks_each, BLOCK, KV_HEADS, HEAD, device="cuda", dtype=torch.bfloat16)
    table = (torch.randperm(num_seqs * blocks_each, device="cuda") + 1).view(num_seqs, blocks_each).int()
    starts = [i * new for i in range(num_seqs + 1)]
    meta = AttentionMetadata(torch.tensor(starts, dtype=torch.int32, device="cuda"),
                             torch.full((num_seqs,), context, dtype=torch.int32, device="cuda"), table,
                             torch.zeros(num_seqs * new, dtype=torch.int64, device="cuda"), new, context, starts,
                             [context] * num_seqs)
    query = torch.randn(num_seqs * new, HEADS, HEAD, device="cuda", dtype=torch.bfloat16)
    return query, cache, meta


def time_attention(query, cache, meta, num_splits: int | None = None) -> float:
    """Milliseconds of the attention kernel(s) alone (the cache write is left out)."""
    block_m, tile_n, splits, warps = plan_launch(
        num_seqs=meta.num_seqs, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len, num_heads=HEADS,
        num_kv_heads=KV_HEADS, head_size=HEAD, dtype=query.dtype,
        multiprocessors=torch.cuda.get_device_properties(0).multi_processor_count)
    splits = num_splits or splits
    out = torch.empty_like(query)
    workspace = split_workspace(query.shape[0], HEADS, HEAD, splits, query.device) if splits > 1 else None
    return do_bench(lambda: unified_attention(
        query, cache, out, meta.query_start_loc, meta.seq_lens, meta.block_table, meta.num_seqs,
        scale=HEAD ** -0.5, sliding_window=None, soft_cap=None, block_m=block_m, tile_n=tile_n, num_splits=splits,
        workspace=workspace, num_warps=warps), return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = []
    for num_seqs, context in ((1, 1024), (1, 8192), (1, 32768), (64, 1024), (64, 4096)):
        query, cache, meta = batch(num_seqs, context, 1)
        kv_bytes = 2 * num_seqs * context * KV_HEADS * HEAD * 2
        for label, splits in (("plan", None), ("no split", 1)):
            ms = time_attention(query, cache, meta, splits)
            rows.append({"case": f"decode batch {num_seqs} x context {context} ({label})", "ms": round(ms, 4),
                         "TB/s": round(kv_bytes / ms / 1e9, 2)})
            if num_seqs > 1:
                break
    for tokens in (1024, 4096):
        query, cache, meta = batch(1, tokens, tokens)
        flops = 4 * tokens * tokens / 2 * HEADS * HEAD
        ms = time_attention(query, cache, meta)
        rows.append({"case": f"prefill {tokens} tokens (paged)", "ms": round(ms, 4), "TFLOP/s": round(flops / ms / 1e9, 1)})
        q = query.view(1, tokens, HEADS, HEAD).transpose(1, 2)
        k = torch.randn(1, KV_HEADS, tokens, HEAD, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                      return_mode="median")
        rows.append({"case": f"prefill {tokens} tokens (torch SDPA, contiguous)", "ms": round(ms, 4),
                     "TFLOP/s": round(flops / ms / 1e9, 1)})
    print("| case | ms | achieved |\n|---|---:|---:|")
    for r in rows:
        achieved = f"{r['TB/s']} TB/s" if "TB/s" in r else f"{r['TFLOP/s']} TFLOP/s"
        print(f"| {r['case']} | {r['ms']} | {achieved} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
