"""pairs plans against the dense path and bf16 at many rows (symmetric 4-bit, group 128, Llama-3-8B shapes)."""
import itertools, json, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
from kernels_gpu import LLAMA8B_LINEARS
from moe_gpu import graph_us
from runtime.platform.packed import GroupQuantData
from runtime_triton import wna16

out_path = Path(sys.argv[1])
rows_tried = [int(r) for r in sys.argv[2].split(",")] if len(sys.argv) > 2 else [128, 256, 512, 2048]
many = [dict(pairs=True, block_m=m, block_n=n, block_k=k, num_warps=w, num_stages=s)
        for m, n, k, w, s in itertools.product([64, 128, 256], [128, 256], [64, 128], [4, 8], [3, 4])
        if m * n <= 256 * 128 and not (m == 64 and w == 8) and not (k == 128 and s == 4)]
few = [dict(pairs=True, block_m=16, block_n=n, block_k=k, split_k=sp, num_warps=4, num_stages=4)
       for n, k, sp in itertools.product([64, 128], [128, 256], [4, 8]) if not (n == 128 and k == 256)]
mid = [dict(pairs=True, block_m=64, block_n=n, block_k=k, split_k=sp, num_warps=4, num_stages=3)
       for n, k, sp in itertools.product([64, 128], [64, 128], [1, 2, 4])]
def plans_for(rows):
    return few if rows <= 16 else mid if rows <= 64 else many
plans = many
print(len(plans), "plans", flush=True)
results = []
for name, (n, k) in LLAMA8B_LINEARS.items():
    g = torch.Generator().manual_seed(n + k)
    for zero_kind in ("symmetric", "zeros"):
        zeros = torch.full((n, k // 128), 8.0) if zero_kind == "symmetric" else torch.randint(0, 16, (n, k // 128), generator=g).float()
        data = GroupQuantData(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                              (torch.rand(n, k // 128, generator=g) * 0.02 + 0.001).to(torch.bfloat16), zeros, 4, 128, None)
        weight = wna16.repack(data, torch.bfloat16, torch.device("cuda"))
        dense = data.dequantize(torch.float32).to(device="cuda", dtype=torch.bfloat16)
        for rows in rows_tried:
            if zero_kind == "zeros" and rows not in (16, 256):
                continue
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            expected = (x @ dense.T).float()
            timed, failed = [], []
            for tiles in plans_for(rows):
                try:
                    t0 = time.time()
                    got = wna16.matmul(weight, x, **tiles).float()
                    torch.cuda.synchronize()
                    diff = (got - expected).abs().max().item()
                    if not diff <= 1e-2 * expected.abs().max().item():
                        failed.append([tiles, f"differs by {diff}"]); continue
                    timed.append((graph_us(lambda: wna16.matmul(weight, x, **tiles)), tiles))
                except Exception as error:
                    failed.append([tiles, f"{type(error).__name__}: {str(error)[:160]}"])
            timed.sort(key=lambda p: p[0])
            dense_path = graph_us(lambda: wna16.matmul(weight, x, dense=True))
            own = graph_us(lambda: wna16.matmul(weight, x))
            bf16 = graph_us(lambda: x @ dense.T)
            row = {"linear": name, "zeros": zero_kind, "n": n, "k": k, "rows": rows, "bf16_us": round(bf16, 1),
                   "dense_path_us": round(dense_path, 1), "own_plan_us": round(own, 1),
                   "best_pairs_us": round(timed[0][0], 1) if timed else None, "best": timed[0][1] if timed else None,
                   "pairs_vs_dense": round(dense_path / timed[0][0], 2) if timed else None,
                   "pairs_vs_bf16": round(bf16 / timed[0][0], 2) if timed else None,
                   "runners_up": [[round(u, 1), t] for u, t in timed[1:5]], "failed": failed[:4], "n_failed": len(failed)}
            print(json.dumps(row), flush=True)
            results.append(row)
            out_path.write_text(json.dumps(results, indent=1))
