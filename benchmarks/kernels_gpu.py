"""The CUDA plugin's newer kernels alone on a GPU, each against what it replaces or its roofline.

- ``wna16``: the W4A16 GEMM (4-bit, group 128) on Llama-3-8B's projection shapes against the
  bf16 ``torch.matmul`` of the same shape, and against the time to read its packed weight once;
  the whole weight's dequantization (the path past 64 rows) against the copy bandwidth.
- ``wna16-sweep``: the same shapes at 1 to 8192 rows, every tile plan of a grid (``SWEEP``) timed,
  the best and the op's own plan side by side: what ``wna16.plan`` is tuned from.
- ``deterministic-sweep``: the batch-invariant matmul of ``--deterministic`` on the same shapes
  (and the bf16 lm_head) at 1 to 2048 rows, its own plan and a grid of others against cuBLAS; a
  plan counts only if its result is bitwise the own plan's (the same sum in the same order: the
  own plans are the ones test_cuda_deterministic.py proves batch-invariant).
- ``lora-sweep``: ``lora_add`` (one shrink and one expand launch per projection) on Llama-3-8B's
  fused projections with 8 rank-16 adapters at 1 to 256 tokens, each token another adapter, with the
  shrink cut into 16 to 128 programs (``DECODE_SHRINK_PROGRAMS``, ``SHRINK_TARGET_PROGRAMS``), and
  with the same slots grouped as the scheduler orders a step's rows, beside the projection's own
  bf16 matmul: whether a decode step's LoRA cost is the launches' floor or their work; up to 16
  tokens also ``linear_lora`` against the skinny matmul alone and followed by ``lora_add``.
- ``lora-trace``: eight Llama-3-8B layers' projections at one token chained as a decode step runs
  them (qkv, o, gate/up, down, each reading the one before), the skinny matmul alone against
  ``linear_lora`` with an adapter (its shrink split into 16, 8, 32 and 64 programs, letting the
  projection launch at its start or after its products), and each chain's kernels from the profiler: every kernel's
  mean duration and the mean gap before it (negative: it overlapped the kernel before it), so the
  adapter's cost a projection splits into the shrink, the waits and the projection's own time.
- ``moe-sweep``: ``fused_moe`` on one layer of Mixtral-8x7B's (or ``--moe-shape``'s) experts at
  1 to 2048 tokens: each of its two launches (gate/up, down) under a grid of tile plans while the
  other keeps its own plan, then both best plans together, beside the op's own plans: what
  ``runtime_triton.moe.plans_for`` is tuned from.
- ``bitmask``: ``apply_token_bitmask`` on 64 rows of a 128,256-token vocabulary, against
  reading and writing those logits once.

Every figure is a CUDA graph of 50 calls replayed, divided by 50. One JSON line per case.
(``benchmarks/moe_gpu.py kernel`` measures ``fused_moe`` the same way.)
Usage: python3 benchmarks/kernels_gpu.py [wna16] [wna16-sweep] [deterministic-sweep] [lora-sweep] [lora-trace] [moe-sweep] [bitmask] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe_gpu import captured, copy_bandwidth, graph_us, replay_seconds  # noqa: E402

LLAMA8B_LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
"""Output and input width of each projection of one layer."""


def gptq_weight(n: int, k: int):
    """A random 4-bit, group-128 weight of [n, k] packed for the kernel, and its bf16 dequantized copy."""
    from runtime.platform.packed import GroupQuantData
    from runtime_triton import wna16

    g = torch.Generator().manual_seed(n + k)
    data = GroupQuantData(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                          (torch.rand(n, k // 128, generator=g) * 0.02 + 0.001).to(torch.bfloat16),
                          torch.randint(0, 16, (n, k // 128), generator=g).float(), 4, 128, None)
    return (wna16.repack(data, torch.bfloat16, torch.device("cuda")),
            data.dequantize(torch.float32).to(device="cuda", dtype=torch.bfloat16))


def wna16_cases(bandwidth: float) -> list[dict]:
    from runtime_triton import wna16

    out = []
    for name, (n, k) in LLAMA8B_LINEARS.items():
        weight, dense = gptq_weight(n, k)
        packed_bytes = n * k / 2 + 2 * 2 * n * (k // 128)
        # The dense path's step cost past 64 rows beside the library GEMM: the whole weight
        # dequantized (packed bytes read, bf16 written) against the copy bandwidth.
        dequantize_us = graph_us(lambda: wna16.dequantize(weight, torch.bfloat16))
        exact = torch.equal(wna16.dequantize(weight, torch.bfloat16).T, dense)
        out.append({"kernel": "wna16-dequantize", "linear": name, "n": n, "k": k, "us": round(dequantize_us, 1),
                    "of_copy_bandwidth": round((packed_bytes + 2 * n * k) / bandwidth * 1e6 / dequantize_us, 3),
                    "equals_reference": exact})
        print(json.dumps(out[-1]), flush=True)
        for rows in (1, 16, 64, 256, 512):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            error = (wna16.matmul(weight, x).float() - x @ dense.T).abs().max().item()
            quant_us = graph_us(lambda: wna16.matmul(weight, x))
            dense_us = graph_us(lambda: x @ dense.T)
            out.append({"kernel": "wna16", "linear": name, "n": n, "k": k, "rows": rows, "w4a16_us": round(quant_us, 1),
                        "bf16_us": round(dense_us, 1), "speedup_vs_bf16": round(dense_us / quant_us, 2),
                        "of_roofline": round(packed_bytes / bandwidth * 1e6 / quant_us, 3),
                        "max_abs_diff_vs_bf16": round(error, 4)})
            print(json.dumps(out[-1]), flush=True)
    return out


def sweep_plans(rows: int) -> list[dict]:
    """The tile plans tried at ``rows``: split-K tiles for decode, square-ish tiles for prefill, each
    reading each word once (``words_once``) or once per row it holds (the transposed tile, the
    weight as the first operand, is gone: it raced on Hopper, docs/quantization.md); for one row also on the vector
    units (``gemv``); two values a register (``pairs``); from 65 rows also the weight dequantized
    once and multiplied by the library (``dense``)."""
    import itertools

    if rows <= 16:
        grid = itertools.product([16], [64, 128], [128, 256], [1, 4, 8], [False, True], [4])
    elif rows <= 64:
        grid = itertools.product([16, 64], [64, 128], [64], [1, 2, 4], [False], [3])
    else:
        grid = itertools.product([64, 128, 256], [128, 256], [32, 64], [1], [False, True], [3])
    # A 256 x 256 float32 accumulator alone is 256 registers a thread at 8 warps: not tried.
    plans = [dict(block_m=m, block_n=n, block_k=k, split_k=split, words_once=once,
                  num_warps=8 if m >= 128 else 4, num_stages=stages)
             for m, n, k, split, once, stages in grid if m * n <= 256 * 128]
    if rows == 1:
        # The tensor-core tiles lost to the vector units by 1.4-2.2x at one row (H100, 2026-12-06),
        # when their dequantization still converted every integer with I2F. Without it, and with
        # their loads pipelined (asynchronous copies, which the vector kernel does not get), a few
        # 16-row tiles are tried again; the compile time goes mostly to the kernel below.
        plans = [dict(block_m=16, block_n=n, block_k=k, split_k=split, words_once=True, num_warps=4, num_stages=4)
                 for n, k, split in itertools.product([64, 128], [128, 256], [8, 16])]
    if rows <= 4:
        # The vector-unit kernel, a row a program. At 64-256 columns and K tiles of at most 128
        # rows it read the weight at 24-39% of the bandwidth (H200, 2026-12-06): deeper tiles
        # (one scale row per word row past a group) and finer splits put more of a program's
        # loads in flight at once (Triton does not pipeline loads that feed no tl.dot).
        # (256 columns by 512 rows would need 255 registers and spill; 256-column tiles never won.)
        # Each with exact levels and with levels biased by 2**bits (zero_from_sums: compiled for
        # sm_90, 341 instead of 413 instructions a 64 x 256 tile's iteration, whose issue bounded it).
        plans += [dict(block_n=n, block_k=k, split_k=split, gemv=True, num_warps=warps, num_stages=1,
                       zero_from_sums=sums)
                  for (n, k), split, warps, sums in itertools.product([(64, 128), (64, 256), (64, 512), (128, 256)],
                                                                       [4, 8, 16], [4, 8], [False, True])]
        # Each K tile requested a tile ahead (two in flight a thread): compiled for sm_90, 64 x 128
        # tiles keep 128 registers at 4 warps (the same occupancy), 64 x 256 at 8 warps take 168
        # instead of 127 (half the programs a multiprocessor).
        plans += [dict(block_n=64, block_k=k, split_k=split, gemv=True, num_warps=warps, num_stages=1, prefetch=True,
                       zero_from_sums=sums)
                  for k, split, warps, sums in itertools.product([128, 256], [4, 8, 16], [4, 8], [False, True])]
        # Two rows' levels a shift and x read in pairs (bfloat16, 4 bits): compiled for sm_90, 3.84
        # instructions a weight at the op's one-row tile against 4.83 (benchmarks/wna16_sass.py).
        plans += [{**plan, "shared_shifts": True} for plan in plans if plan.get("zero_from_sums")]
    # Two values a register in bfloat16 (4-bit weights): K split for few rows (the shapes that won
    # in its first form, H100 2026-12-07: docs/quantization.md), square-ish tiles for many.
    if rows <= 16:
        plans += [dict(pairs=True, block_m=16, block_n=n, block_k=k, split_k=split, num_warps=4, num_stages=4)
                  for n, k, split in itertools.product([64, 128], [128, 256], [4, 8]) if not (n == 128 and k == 256)]
    elif rows <= 64:
        plans += [dict(pairs=True, block_m=64, block_n=n, block_k=k, split_k=split, num_warps=4, num_stages=3)
                  for n, k, split in itertools.product([64, 128], [64, 128], [1, 2, 4])]
    else:
        plans += [dict(pairs=True, block_m=m, block_n=n, block_k=k, split_k=split, num_warps=warps, num_stages=stages)
                  for m, n, k, split, warps, stages in itertools.product([64, 128, 256], [128, 256], [64, 128], [1, 2],
                                                                         [4, 8], [3, 4])
                  if m * n <= 256 * 128 and not (m == 64 and warps == 8) and not (k == 128 and stages == 4)
                  and not (split == 2 and m > 64)]
    # Each pairs plan also with the weight as the first operand, from registers (each K tile's
    # matrix instructions waited for in full, so the next tile's registers are free: wna16.py).
    plans += [{**plan, "weight_first": True} for plan in plans if plan.get("pairs")]
    if rows <= 16:
        # The weight-first Gluon kernel (below) with the matrix instructions' narrowest second operand,
        # 8 or 16 rows: its dequantization straight into their registers, no FFMA a weight as on the
        # vector units (compiled for sm_90: no spills, serialization or pending-register writes).
        plans += [dict(wgmma=True, weight_first=True, block_m=8 if rows <= 8 else 16, block_n=n, block_k=k,
                       split_k=split, num_warps=n // 16, num_stages=stages)
                  for n, k, split, stages in itertools.product([64, 128], [64, 128], [2, 4, 8], [4, 5])]
    if rows > 16:
        # The Gluon kernel (wna16_wgmma.py: dequantization beside the previous tile's matrix
        # instructions), on Hopper: a warpgroup per 64 rows of the tile, shared memory under 227 KB.
        # K split 2 or 4 ways up to 256 rows, where a layer's narrower outputs fill few multiprocessors.
        plans += [dict(wgmma=True, block_m=m, block_n=n, block_k=k, split_k=split, num_warps=4 if m == 64 else 8,
                       num_stages=stages)
                  for m, n, k, stages, split in itertools.product([64, 128, 256], [64, 128, 256], [64, 128], [3, 4],
                                                                  [1, 2, 4])
                  if m * n <= 256 * 128 and (m > 64 or rows <= 128) and (m < 256 or rows > 128)
                  and (split == 1 or rows <= 256) and stages * (m * k * 2 + k // 8 * n * 4) + 2 * n * k * 2 <= 220 * 1024]
        # Each also with its first K tile apart, so that ptxas keeps the matrix instructions asynchronous.
        plans += [{**plan, "overlap": True} for plan in plans if plan.get("wgmma")]
        # The weight as the first operand, dequantized into registers (a warpgroup per 64 columns;
        # 256-row tiles spill at 255 registers when compiled for sm_90).
        plans += [dict(wgmma=True, weight_first=True, block_m=m, block_n=n, block_k=k, split_k=split,
                       num_warps=n // 16, num_stages=stages)
                  for m, n, k, stages, split in itertools.product([64, 128], [64, 128], [64, 128], [4, 5], [1, 2])
                  if (split == 1 or rows <= 256) and stages * (m * k * 2 + k // 8 * n * 4) <= 220 * 1024]
        # Four warpgroups sharing each activation tile (a 64-column tile reads the activations once
        # per 64 output columns: at 512 rows, gate/up's 448 times, 1.9 GB against 0.2 of packed
        # weight); at 16 warps a thread has 128 registers, which 64-row, 64-deep tiles fit.
        plans += [dict(wgmma=True, weight_first=True, block_m=64, block_n=256, block_k=64, split_k=1, num_warps=16,
                       num_stages=stages) for stages in (4, 5) if rows >= 128]
    return plans + ([dict(dense=True)] if rows > 64 else [])


def wna16_sweep(bandwidth: float, rows_tried: tuple[int, ...] = (1, 64, 256, 512, 2048, 8192),
                only: str | None = None) -> list[dict]:
    """Every plan of :func:`sweep_plans` at each number of rows (``only``: the plans with that option,
    e.g. ``pairs`` or ``shared_shifts``, or with each of options joined by ``+``, and the dense
    path, a shorter run), the best beside the op's own plan and bf16."""
    from triton.runtime.errors import OutOfResources

    from runtime_triton import wna16

    out = []
    for name, (n, k) in LLAMA8B_LINEARS.items():
        weight, dense = gptq_weight(n, k)
        packed_bytes = n * k / 2 + 2 * 2 * n * (k // 128)
        for rows in rows_tried:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            expected = (x @ dense.T).float()

            def checked_us(call) -> float:
                """The call's time, once its result matches bf16's (a launch that failed would look fast)."""
                torch.cuda.synchronize()
                difference = (call().float() - expected).abs().max().item()
                if not difference <= 1e-2 * expected.abs().max().item():
                    raise ValueError(f"result differs from bf16's by {difference}")
                return graph_us(call)

            timed, failed = [], []
            for tiles in sweep_plans(rows):
                if only and not (all(tiles.get(option) for option in only.split("+")) or tiles.get("dense")):
                    continue
                try:
                    timed.append((checked_us(lambda: wna16.matmul(weight, x, **tiles)), tiles))
                except OutOfResources:
                    continue
                except Exception as error:  # a plan this GPU or Triton cannot run: named in the row
                    failed.append([tiles, f"{type(error).__name__}: {str(error)[:200]}"])
            own_us = checked_us(lambda: wna16.matmul(weight, x))
            own_plan = wna16.plan(rows, n, k, torch.cuda.get_device_properties(0).multi_processor_count,
                                  hopper=wna16._hopper(x.device))
            if only:
                # The op's own plan competes too: quant_gpu.py --wna16-plans takes the best end to end.
                timed.append((own_us, own_plan))
            timed.sort(key=lambda pair: pair[0])
            best_us, best = timed[0]
            error = (wna16.matmul(weight, x, **best).float() - expected).abs().max().item()
            dense_us = graph_us(lambda: x @ dense.T)
            out.append({"kernel": "wna16-sweep", "linear": name, "n": n, "k": k, "rows": rows, "plans": len(timed),
                        "best_us": round(best_us, 1), "best": best, "own_plan_us": round(own_us, 1),
                        "own_plan": own_plan,
                        "bf16_us": round(dense_us, 1), "best_vs_bf16": round(dense_us / best_us, 2),
                        "best_of_roofline": round(packed_bytes / bandwidth * 1e6 / best_us, 3),
                        "runners_up": [[round(us, 1), t] for us, t in timed[1:4]], "failed": failed[:3],
                        "max_abs_diff_vs_bf16": round(error, 4)})
            print(json.dumps(out[-1]), flush=True)
    return out


def deterministic_plans(rows: int) -> list[dict]:
    """Plans tried for the batch-invariant matmul at ``rows``: narrower and wider tiles, more
    pipeline stages, 8 warps, K steps of 128 and 256 (the tensor cores add each 16-deep slice into
    the accumulator in order, so a deeper step may sum the same way: the bitwise check decides),
    past 256 rows each on pointer loads and as the persistent variant."""
    import itertools

    if rows <= 64:
        # Weight-bound: what is in flight per multiprocessor (stages x the weight tile) sets the rate.
        grid = itertools.product([64], [16, 32, 64], [64, 128, 256], [4], [3, 4, 6])
    else:
        grid = itertools.product([64, 128], [128, 256], [64, 128], [4, 8], [3, 4])
    plans = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=warps, num_stages=stages)
             for m, n, k, warps, stages in grid if m * n <= 128 * 256 and not (m * n >= 128 * 128 and warps == 4)]
    # Past 256 rows each also as the persistent variant (tensor descriptors, one program per multiprocessor).
    return plans + ([{**plan, "persistent": True} for plan in plans] if rows > 256 else [])


def deterministic_sweep(bandwidth: float, rows_tried: tuple[int, ...] = (1, 16, 64, 256, 2048)) -> list[dict]:
    from triton.runtime.errors import OutOfResources

    from runtime_triton import batch_invariant

    out = []
    for name, (n, k) in {**LLAMA8B_LINEARS, "lm_head": (128256, 4096)}.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for rows in rows_tried:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            own = batch_invariant.linear(x, weight)
            timed, differ = [], []
            for plan in deterministic_plans(rows):
                batch_invariant.FITTED_TILES.clear()
                try:
                    if not torch.equal(batch_invariant.linear(x, weight, plan=plan), own):
                        differ.append(plan)
                        continue
                except OutOfResources:
                    continue
                if batch_invariant.FITTED_TILES:  # it ran as a smaller plan: that one is tried on its own
                    continue
                timed.append((graph_us(lambda: batch_invariant.linear(x, weight, plan=plan)), plan))
            timed.sort(key=lambda pair: pair[0])
            own_us = graph_us(lambda: batch_invariant.linear(x, weight))
            cublas_us = graph_us(lambda: x @ weight.T)
            best_us, best = timed[0] if timed else (own_us, None)
            out.append({"kernel": "deterministic-sweep", "linear": name, "n": n, "k": k, "rows": rows,
                        "own_plan": batch_invariant.tiles(rows, x.dtype, n, k, batch_invariant.multiprocessors(x.device)), "own_us": round(own_us, 1),
                        "best": best, "best_us": round(best_us, 1), "cublas_us": round(cublas_us, 1),
                        "own_vs_cublas": round(cublas_us / own_us, 2), "best_vs_cublas": round(cublas_us / best_us, 2),
                        "best_of_roofline": round(2 * n * k / bandwidth * 1e6 / best_us, 3),
                        "runners_up": [[round(us, 1), p] for us, p in timed[1:4]], "plans_same_sum": len(timed),
                        "plans_other_sum": differ})
            print(json.dumps(out[-1]), flush=True)
    return out


def lora_sweep(bandwidth: float) -> list[dict]:
    from runtime_triton import lora, skinny_matmul

    projections = {"qkv": ([4096, 1024, 1024], 4096), "o": ([4096], 4096), "gate_up": ([14336, 14336], 4096),
                   "down": ([4096], 14336)}
    slots_count, rank, out = 8, 16, []
    defaults = lora.DECODE_SHRINK_PROGRAMS, lora.SHRINK_TARGET_PROGRAMS
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (slices, k) in projections.items():
        n = sum(slices)
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        lora_a = torch.randn(slots_count, len(slices) * rank, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        lora_b = torch.randn(slots_count, n, rank, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        for tokens in (1, 8, 64, 256):
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=g)
            interleaved = torch.arange(tokens, device="cuda", dtype=torch.int32) % slots_count
            y = x @ weight.T
            row = {"kernel": "lora-sweep", "projection": name, "tokens": tokens, "rank": rank,
                   "base_matmul_us": round(graph_us(lambda: x @ weight.T), 1)}
            for programs in (16, 32, 64, 128):
                lora.DECODE_SHRINK_PROGRAMS = lora.SHRINK_TARGET_PROGRAMS = programs
                row[f"lora_add_us_{programs}_programs"] = round(
                    graph_us(lambda: lora.lora_add(y, x, lora_a, lora_b, interleaved, slices, 0.5)), 1)
            lora.DECODE_SHRINK_PROGRAMS, lora.SHRINK_TARGET_PROGRAMS = defaults
            # The scheduler puts each adapter's rows side by side: the same slots, grouped.
            grouped = interleaved.sort().values
            row["lora_add_us_grouped_slots"] = round(
                graph_us(lambda: lora.lora_add(y, x, lora_a, lora_b, grouped, slices, 0.5)), 1)
            if tokens <= skinny_matmul.MAX_ROWS:
                # What a decode step runs for the projection with adapters: linear_lora (the shrink,
                # then the skinny matmul adding the products), against the skinny matmul alone and
                # against it followed by lora_add (the two-launch add, before contract 1.14).
                row["skinny_us"] = round(graph_us(lambda: skinny_matmul.linear(x, weight)), 1)
                row["skinny_then_lora_add_us"] = round(graph_us(lambda: lora.lora_add(
                    skinny_matmul.linear(x, weight), x, lora_a, lora_b, grouped, slices, 0.5)), 1)
                row["linear_lora_us"] = round(graph_us(lambda: lora.linear_lora(
                    x, weight, None, lora_a, lora_b, grouped, slices, 0.5)), 1)
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def kernel_timeline(graph: torch.cuda.CUDAGraph) -> list[dict]:
    """Each kernel name of one replay of ``graph``: launches, mean duration and mean gap from the end
    of the kernel before it to its start (us), from the profiler's CUDA events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    by_name: dict[str, dict] = {}
    for before, kernel in zip([None] + kernels[:-1], kernels):
        row = by_name.setdefault(kernel.name[:60], {"kernel": kernel.name[:60], "launches": 0, "us": 0.0, "gap_us": 0.0})
        row["launches"] += 1
        row["us"] += kernel.time_range.elapsed_us()
        if before is not None:
            row["gap_us"] += kernel.time_range.start - before.time_range.end
    return [{**row, "us": round(row["us"] / row["launches"], 2), "gap_us": round(row["gap_us"] / row["launches"], 2)}
            for row in by_name.values()]


def lora_trace(bandwidth: float, layers: int = 8) -> list[dict]:
    from runtime_triton import lora, skinny_matmul

    slices = {"qkv": [4096, 1024, 1024], "o": [4096], "gate_up": [14336, 14336], "down": [4096]}
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = []
    for _ in range(layers):
        for name, (n, k) in LLAMA8B_LINEARS.items():
            parts, rank = slices[name], 16
            weights.append((torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02,
                            torch.randn(8, len(parts) * rank, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02,
                            torch.randn(8, n, rank, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02, parts))
    x0 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    slots = torch.zeros(1, device="cuda", dtype=torch.int32)

    def chain(adapted: bool):
        x = x0
        for weight, lora_a, lora_b, parts in weights:
            # Each projection reads its predecessor's output cut to its input width (never wider than
            # that output in this order), so it starts when the one before has finished, as in a layer.
            x = x[:, :weight.shape[1]]
            x = (lora.linear_lora(x, weight, None, lora_a, lora_b, slots, parts, 0.5) if adapted
                 else skinny_matmul.linear(x, weight))
        return x

    # The shrink's tile (bytes of a row a reduction step reads), warps, programs (splits of the
    # input features) and when it lets the projection launch (lora.RELEASE_AFTER_PRODUCTS), as
    # linear_lora launches it at one token: ptxas gives 242 registers a thread at 256 bytes and 8
    # warps; 64 and 128 bytes on 4 warps were slower on an H100 (docs/lora.md).
    knobs = ("SHRINK_STEP_BYTES", "ADD_WARPS", "DECODE_SHRINK_PROGRAMS", "RELEASE_AFTER_PRODUCTS")
    defaults = {name: getattr(lora, name) for name in knobs}
    variants = [None] + [dict(defaults, DECODE_SHRINK_PROGRAMS=programs, RELEASE_AFTER_PRODUCTS=late)
                         for late in (False, True) for programs in (16, 8, 32, 64)]
    out = []
    for variant in variants:
        for name, value in (variant or defaults).items():
            setattr(lora, name, value)
        graph = captured(lambda: chain(variant is not None), calls=1)
        for name, value in defaults.items():
            setattr(lora, name, value)
        row = {"kernel": "lora-trace", "adapter": variant is not None,
               **{name.lower(): variant[name] for name in knobs if variant is not None},
               "layers": layers, "us_per_layer": round(replay_seconds(graph, 20) / layers * 1e6, 2),
               "timeline": kernel_timeline(graph)}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def moe_plans(block_m: int) -> list:
    """Tile plans tried for ``fused_moe``'s launches: for 16-row blocks (the smallest tl.dot takes)
    narrow to wide column tiles and deep K steps (the weights dominate), else square tiles."""
    import itertools

    from runtime_triton.moe import MoEPlan

    if block_m == 16:
        grid = itertools.product([16], [16, 32, 64], [128, 256], [4, 8], [3, 4, 5])
    else:
        # 256 columns too: vLLM's tuned table for Qwen3-30B-A3B's experts on an H100 (E=128, N=768)
        # uses 128 x 256 x 64 tiles, 8 warps, 4 stages from 1,536 tokens on, 64 x 256 at 1,024.
        grid = [*itertools.product([64, 128], [64, 128], [64, 128], [8], [3, 4]), (64, 64, 64, 4, 3), (64, 64, 64, 4, 4),
                *itertools.product([64, 128], [256], [64], [8], [3, 4, 5])]
    return [MoEPlan(*values) for values in grid]


def moe_sweep(bandwidth: float, shape: str, token_counts: tuple[int, ...]) -> list[dict]:
    from triton.runtime.errors import OutOfResources

    from moe_gpu import config_of
    from runtime.models import decoder_settings
    from runtime_triton import moe

    s = decoder_settings(config_of(shape, 1))
    experts, top_k, h, width = s.moe.num_experts, s.moe.top_k, s.hidden_size, s.moe.intermediate_size
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(experts, 2 * width, h, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w2 = torch.randn(experts, h, width, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    out = []
    for tokens in token_counts:
        x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16, generator=g)
        logits = torch.randn(tokens, experts, device="cuda", generator=g)
        own_plans = moe.plans_for(tokens * top_k, experts, x.dtype)
        own = moe.fused_moe(x, logits, w13, w2, top_k, s.moe.renormalize).float()

        def timed(plans) -> float | None:
            """The op's time under (gate/up, down) plans; None where they do not fit or differ from the own."""
            try:
                got = moe.fused_moe(x, logits, w13, w2, top_k, s.moe.renormalize, plans=plans).float()
            except OutOfResources:
                return None
            if not (got - own).abs().max().item() <= 2e-2 * own.abs().max().item():
                return None
            return graph_us(lambda: moe.fused_moe(x, logits, w13, w2, top_k, s.moe.renormalize, plans=plans))

        own_us = graph_us(lambda: moe.fused_moe(x, logits, w13, w2, top_k, s.moe.renormalize))
        row = {"kernel": "moe-sweep", "shape": shape, "tokens": tokens, "own_plans": own_plans, "own_us": round(own_us, 1)}
        best = []
        for side in (0, 1):
            tried = []
            for plan in moe_plans(own_plans[side].block_m):
                if plan.block_m != own_plans[side].block_m:
                    continue
                plans = (plan, own_plans[1]) if side == 0 else (own_plans[0], plan)
                us = timed(plans)
                if us is not None:
                    tried.append((us, plan))
            tried.sort(key=lambda pair: pair[0])
            name = ("gate_up", "down")[side]
            row[f"{name}_best"] = [round(tried[0][0], 1), tried[0][1]]
            row[f"{name}_runners_up"] = [[round(us, 1), plan] for us, plan in tried[1:4]]
            row[f"{name}_plans"] = len(tried)
            best.append(tried[0][1])
        both_us = timed(tuple(best))
        row["both_best_us"] = both_us and round(both_us, 1)
        # Square blocks of another height than the own plans' change the sort's padding: both launches take them.
        other_heights = [(timed((plan, plan)), plan) for plan in moe_plans(64)
                         if plan.block_m != own_plans[0].block_m and tokens >= 256]
        other_heights = sorted((pair for pair in other_heights if pair[0] is not None), key=lambda pair: pair[0])
        row["other_block_m_best"] = [[round(us, 1), plan] for us, plan in other_heights[:3]]
        read = torch.topk(logits, top_k).indices.unique().numel() * 3 * h * width * 2
        row["own_of_roofline"] = round(read / bandwidth * 1e6 / own_us, 3)
        row["both_best_of_roofline"] = both_us and round(read / bandwidth * 1e6 / both_us, 3)
        out.append(row)
        print(json.dumps(row, default=str), flush=True)
    return out


def bitmask_cases(bandwidth: float) -> list[dict]:
    from runtime_triton.bitmask import apply_token_bitmask

    vocab, out = 128256, []
    for rows in (1, 64, 256):
        logits = torch.randn(rows, vocab, device="cuda")
        bitmask = torch.randint(-2**31, 2**31 - 1, (rows, (vocab + 31) // 32), device="cuda", dtype=torch.int64)
        bitmask = bitmask.to(torch.int32)
        index = torch.arange(rows, device="cuda")
        us = graph_us(lambda: apply_token_bitmask(logits, bitmask, index))
        moved = 2 * logits.numel() * 4 + bitmask.numel() * 4
        out.append({"kernel": "apply_token_bitmask", "vocab": vocab, "rows": rows, "us": round(us, 1),
                    "of_roofline": round(moved / bandwidth * 1e6 / us, 3)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="*", help="wna16, wna16-sweep, deterministic-sweep, lora-sweep, lora-trace, moe-sweep, bitmask (default: wna16 and bitmask)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sweep-rows", type=int, nargs="+", default=[1, 64, 256, 512, 2048, 8192],
                        help="wna16-sweep: the numbers of rows tried")
    parser.add_argument("--only", metavar="OPTION",
                        help="wna16-sweep: only the plans with this option (pairs, shared_shifts, gemv; options joined "
                             "by + for plans with all of them, as wgmma+weight_first; and the dense path), beside the "
                             "op's own plan, which competes for the best")
    parser.add_argument("--det-rows", type=int, nargs="+", default=[1, 16, 64, 256, 2048],
                        help="deterministic-sweep: the numbers of rows tried")
    parser.add_argument("--moe-shape", default="mixtral-8x7b", help="moe-sweep: a shape of benchmarks/moe_gpu.py")
    parser.add_argument("--moe-tokens", type=int, nargs="+", default=[1, 8, 32, 256, 2048],
                        help="moe-sweep: the numbers of tokens tried")
    args = parser.parse_args()
    cases = {"wna16": wna16_cases,
             "wna16-sweep": lambda bandwidth: wna16_sweep(bandwidth, tuple(args.sweep_rows), args.only),
             "deterministic-sweep": lambda bandwidth: deterministic_sweep(bandwidth, tuple(args.det_rows)),
             "lora-sweep": lora_sweep, "lora-trace": lora_trace,
             "moe-sweep": lambda bandwidth: moe_sweep(bandwidth, args.moe_shape, tuple(args.moe_tokens)),
             "bitmask": bitmask_cases}
    unknown = set(args.kernels) - set(cases)
    if unknown:
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {sorted(cases)}")
    bandwidth = copy_bandwidth()
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_GBps": round(bandwidth / 1e9)}), flush=True)
    results = [row for name in args.kernels or ["wna16", "bitmask"] for row in cases[name](bandwidth)]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
