"""GPTQ 4-bit (group 128) against bf16 on a Llama-3-8B shape: runtime's W4A16 GEMM, and vLLM's GPTQ-Marlin.

Usage: python benchmarks/quant_gpu.py PART [--dir /tmp/llama8b] [--out DIR] [--requests 1000] [--load-format dummy]
  PART = write         a random GPTQ checkpoint of the Llama-3-8B shape in DIR-gptq (symmetric, group 128,
                       no act-order, lm_head and embedding random bf16), written on the GPU from the config
                       alone (about 6 GB: no bf16 checkpoint needed)
       = runtime-bf16  runtime.LLM on the bf16 checkpoint in DIR (with --load-format dummy: DIR's config with
                       made-up weights, no checkpoint): batch-1 decode, offline --requests x (512, 128)
       = runtime-gptq  the same on the GPTQ checkpoint (--quantization gptq: the W4A16 Triton GEMM)
       = vllm-gptq     vLLM's LLM on the GPTQ checkpoint (gptq_marlin), same measurements
       = report        the table of what the parts wrote, with the ratios the issue targets
--wna16-plans FILE (runtime-gptq): the W4A16 GEMM takes, per weight shape, the best plan of a
``benchmarks/kernels_gpu.py wna16-sweep --json FILE`` run at the nearest swept row count at or above
its own, ``wna16.plan``'s below the smallest and past the largest (the sweep's plans tried end to end before they go into
``wna16.plan``). --profile (runtime parts): then the kernel time by kernel of one batch-1 decode.
Each part runs in its own process (two 8B models do not share a GPU well) and writes OUT/PART.json.
The bf16 checkpoint is plugins/cuda/benchmarks/decode_llama8b.py's (written if missing, unless
--load-format dummy). Weight values do not change speed; decode step = (time for 128 tokens - time for 1) / 127, as baselines_llama8b.py.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda" / "benchmarks"))

GROUP, BITS = 128, 4
PROMPT_LEN, OUTPUT_LEN = 512, 128


def write_gptq(out: Path) -> None:
    """GPTQ (AutoGPTQ v1 layout) tensors for every projection of the Llama-3-8B shape: random
    nibbles, float16 scales of a 0.02-std weight, stored zero points 7 (a symmetric zero of 8);
    the other tensors as the bf16 checkpoint's (decode_llama8b.py)."""
    from decode_llama8b import random_tensor, shards, write_config_and_tokenizer
    from safetensors.torch import save_file

    config = write_config_and_tokenizer(out)
    quantized = json.loads((out / "config.json").read_text())
    quantized["quantization_config"] = {"quant_method": "gptq", "bits": BITS, "group_size": GROUP, "desc_act": False,
                                        "sym": True, "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(quantized, indent=2))
    per = 32 // BITS
    zero_word = sum(7 << (BITS * j) for j in range(per))
    for file, shapes in shards(config).items():
        tensors = {}
        for name, shape in shapes.items():
            if not name.endswith("_proj.weight"):
                tensors[name] = random_tensor(name, shape)
                continue
            module, (n, k) = name.removesuffix(".weight"), shape
            words = torch.randint(-2 ** 31, 2 ** 31, (k // per, n), dtype=torch.int64, device="cuda")
            tensors[f"{module}.qweight"] = words.to(torch.int32).cpu()
            tensors[f"{module}.qzeros"] = torch.full((k // GROUP, n // per), zero_word, dtype=torch.int64).to(torch.int32)
            tensors[f"{module}.scales"] = (torch.rand(k // GROUP, n, device="cuda") * 0.004 + 0.004).half().cpu()
            tensors[f"{module}.g_idx"] = (torch.arange(k) // GROUP).to(torch.int32)
        save_file(tensors, out / file)
        print(f"wrote {out / file}", flush=True)


def measure(generate, requests: int) -> list[dict]:
    """Batch-1 decode and offline throughput with ``generate(prompts, output_len)`` -> seconds."""
    rng = random.Random(1)

    def run(count: int, output_len: int) -> float:
        prompts = [[rng.randrange(1000, 100000) for _ in range(PROMPT_LEN)] for _ in range(count)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(prompts, output_len)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(16, 4)
    run(1, 4)
    first, total = run(1, 1), run(1, OUTPUT_LEN)
    step = (total - first) / (OUTPUT_LEN - 1)
    results = [{"mode": "batch1", "decode_step_ms": round(step * 1e3, 3), "decode_tokens_per_s": round(1 / step, 1)}]
    print(json.dumps(results[-1]), flush=True)
    if requests:
        seconds = run(requests, OUTPUT_LEN)
        results.append({"mode": "offline", "requests": requests, "seconds": round(seconds, 2),
                        "output_tokens_per_s": round(requests * OUTPUT_LEN / seconds, 1)})
        print(json.dumps(results[-1]), flush=True)
    return results


def use_swept_plans(sweep: Path) -> None:
    """Route ``wna16.plan`` to the sweep's best plans (shapes it did not sweep keep the op's own)."""
    from runtime_triton import wna16

    best: dict[tuple[int, int], list[tuple[int, dict]]] = {}
    for row in json.loads(sweep.read_text()):
        if row["kernel"] == "wna16-sweep":
            best.setdefault((row["n"], row["k"]), []).append((row["rows"], row["best"]))
    own = wna16.plan

    def swept(m: int, n: int, k: int, sm_count: int = 132, element_size: int = 2, pairs_fit: bool = True,
              **device) -> dict:
        if element_size != 2 or (n, k) not in best or not pairs_fit:
            return own(m, n, k, sm_count, element_size, pairs_fit, **device)
        plans = sorted(best[n, k], key=lambda pair: pair[0])
        # Below the smallest swept row count and past the largest the op's own plan: a one-row plan
        # at 8192 rows would be slower by orders of magnitude, a 64-row tile at one row wasteful.
        if m < plans[0][0]:
            return own(m, n, k, sm_count, element_size, pairs_fit, **device)
        return next((tiles for rows, tiles in plans if rows >= m),
                    own(m, n, k, sm_count, element_size, pairs_fit, **device))

    wna16.plan = swept


def runtime_part(path: Path, quantization: str | None, requests: int, load_format: str = "auto",
                 profile: bool = False) -> list[dict]:
    from runtime import LLM, SamplingParams

    llm = LLM(str(path), device="cuda", dtype="bfloat16", max_num_seqs=512, max_num_batched_tokens=8192,
              max_model_len=PROMPT_LEN + OUTPUT_LEN + 64, quantization=quantization, load_format=load_format)
    print(json.dumps({"quantization": llm.engine.quantization, "weight_gib": round(llm.engine.runner.weight_bytes / 2 ** 30, 2)}))

    def generate(prompts, output_len):
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    results = measure(generate, requests)
    if profile:
        from baselines_llama8b import profile_kernels
        prompt = [[1000 + (37 * i) % 99000 for i in range(PROMPT_LEN)]]
        results.append(profile_kernels(lambda: generate(prompt, OUTPUT_LEN), "profile_batch1"))
        print(json.dumps(results[-1]), flush=True)
    return results


def vllm_part(path: Path, requests: int) -> list[dict]:
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(str(path), dtype="bfloat16", max_num_seqs=512, max_num_batched_tokens=8192,
              max_model_len=PROMPT_LEN + OUTPUT_LEN + 64, gpu_memory_utilization=0.9)

    def generate(prompts, output_len):
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    return measure(generate, requests)


def report(out: Path) -> None:
    parts = {p: json.loads((out / f"{p}.json").read_text())["results"] for p in ("runtime-bf16", "runtime-gptq", "vllm-gptq")
             if (out / f"{p}.json").exists()}
    value = {(p, r["mode"]): r.get("decode_tokens_per_s", r.get("output_tokens_per_s")) for p, rs in parts.items() for r in rs}
    print("| engine | batch-1 decode tok/s | offline output tok/s |\n|---|---:|---:|")
    for p in parts:
        print(f"| {p} | {value.get((p, 'batch1'))} | {value.get((p, 'offline'))} |")
    for mode, target in (("batch1", "decode >= 2.5x bf16"), ("offline", "offline >= 0.9x bf16")):
        if ("runtime-gptq", mode) in value and ("runtime-bf16", mode) in value:
            print(f"runtime gptq / bf16 {mode}: {value['runtime-gptq', mode] / value['runtime-bf16', mode]:.2f}x (target {target})")
        if ("runtime-gptq", mode) in value and ("vllm-gptq", mode) in value:
            print(f"runtime gptq / vLLM gptq_marlin {mode}: {value['runtime-gptq', mode] / value['vllm-gptq', mode]:.2f}x (target >= 1.0x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["write", "runtime-bf16", "runtime-gptq", "vllm-gptq", "report"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama8b"), help="the bf16 checkpoint")
    parser.add_argument("--out", type=Path, default=Path("quant-results"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--wna16-plans", type=Path, help="a kernels_gpu.py wna16-sweep JSON (runtime-gptq)")
    parser.add_argument("--load-format", default="auto", help="runtime-bf16: dummy for made-up weights on DIR's config")
    parser.add_argument("--profile", action="store_true", help="runtime parts: then kernel time by kernel of one "
                                                                 "batch-1 decode")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gptq = args.dir.with_name(args.dir.name + "-gptq")
    if args.part == "report":
        return report(args.out)
    if args.part == "write":
        return write_gptq(gptq)
    if args.part == "runtime-bf16":
        from decode_llama8b import ensure_model
        ensure_model(args.dir, args.load_format)
        results = runtime_part(args.dir, None, args.requests, args.load_format, args.profile)
    elif args.part == "runtime-gptq":
        if args.wna16_plans:
            use_swept_plans(args.wna16_plans)
        results = runtime_part(gptq, "gptq", args.requests, profile=args.profile)
    else:
        results = vllm_part(gptq, args.requests)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "part": args.part, "argv": sys.argv}
    (args.out / f"{args.part}.json").write_text(json.dumps(meta | {"results": results}, indent=2))


if __name__ == "__main__":
    main()
