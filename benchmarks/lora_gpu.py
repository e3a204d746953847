"""Multi-LoRA on a GPU: the Llama-3-8B-shaped model with 8 random rank-16 adapters on every
projection, this runtime against vLLM ``--enable-lora`` on the same adapters and requests.

Usage: python3 benchmarks/lora_gpu.py PART --dir /tmp/llama8b --json OUT.json [--adapters 8] [--rank 16]
  PART = runtime   runtime.LLM; with --adapters 0 LoRA is off (the base model's figures)
       = vllm      vllm.LLM(enable_lora=True) (vLLM 0.22.1 importable: ../shared/anchors/vllm.md)
Run each part in its own process. Adapters are written once to --adapter-dir (random A and B,
seed = adapter index; PEFT layout). Both parts measure batch-1 decode without an adapter and
(LoRA on) with adapter 0, then --requests random (--prompt-len, --output-len)
requests spread round-robin over the adapters, greedy, ignore_eos; the same prompts for both.
decode step = (time for --output-len tokens - time for 1) / (output-len - 1).
--lora-kernel NAME=INT sets a tuning constant of the CUDA plugin's LoRA kernels (runtime_triton.lora,
e.g. DECODE_SHRINK_PROGRAMS=32 RELEASE_AFTER_PRODUCTS=1) before the engine captures its graphs: what
benchmarks/kernels_gpu.py lora-trace times alone, measured end to end.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))

from lora_cpu import write_adapter


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def adapter_dirs(args) -> list[Path]:
    from runtime.models import decoder_settings
    settings = decoder_settings(transformers.AutoConfig.from_pretrained(args.dir))
    dirs = [args.adapter_dir / f"a{i}" for i in range(args.adapters)]
    for i, directory in enumerate(dirs):
        if not (directory / "adapter_model.safetensors").exists():
            write_adapter(settings, args.rank, directory, seed=i)
    return dirs


def measure(generate, args, engine: str, adapters: int) -> list[dict]:
    """Batch-1 decode and offline throughput through ``generate(prompts, max_tokens, adapter_index)``,
    where adapter_index None means no adapter and "spread" means round-robin over the adapters."""
    vocab = transformers.AutoConfig.from_pretrained(args.dir).vocab_size
    rng = random.Random(1)
    prompts = [[rng.randrange(min(1000, vocab // 4), min(100000, vocab)) for _ in range(args.prompt_len)]
               for _ in range(args.requests)]

    def run(batch: list[list[int]], max_tokens: int, which) -> float:
        t = sync_time()
        generate(batch, max_tokens, which)
        return sync_time() - t

    out = []
    run(prompts[:16], 4, "spread" if adapters else None)
    run(prompts[:1], 4, None)
    for which, label in [(None, "none")] + ([(0, "adapter 0")] if adapters else []):
        # The best of two: a first one-token run of a cached prompt compiled a kernel once (the
        # LoRA-on run's adapter-free row came out negative, H100, docs/cuda-results/h100-2026-12-07-b).
        first = min(run(prompts[:1], 1, which) for _ in range(2))
        total = min(run(prompts[:1], args.output_len, which) for _ in range(2))
        step = (total - first) / (args.output_len - 1)
        out.append({"engine": engine, "mode": "batch1", "adapter": label, "decode_step_ms": round(step * 1e3, 3),
                    "decode_tokens_per_s": round(1 / step, 1)})
        print(json.dumps(out[-1]), flush=True)
    total = run(prompts, args.output_len, "spread" if adapters else None)
    out.append({"engine": engine, "mode": "offline_throughput", "adapters": adapters, "rank": args.rank,
                "requests": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
                "e2e_s": round(total, 3), "output_tokens_per_s": round(args.requests * args.output_len / total, 1)})
    print(json.dumps(out[-1]), flush=True)
    return out


def adapter_generate(llm, sampling_params, requests):
    """``generate(prompts, max_tokens, which)`` for ``measure`` on either engine's LLM: which is
    None (no adapter), an adapter's index, or "spread" (round-robin over the adapters)."""
    def generate(prompts, max_tokens, which):
        chosen = (None if which is None else requests[which] if which != "spread"
                  else [requests[i % len(requests)] for i in range(len(prompts))])
        params = sampling_params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=chosen)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return generate


def set_lora_kernel_constants(settings: list[str]) -> dict:
    from runtime_triton import lora as lora_kernels
    chosen = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if not name.isupper() or not hasattr(lora_kernels, name) or not value.lstrip("-").isdigit():
            raise SystemExit(f"--lora-kernel {setting!r}: give NAME=INT with NAME a constant of runtime_triton.lora")
        kind = type(getattr(lora_kernels, name))
        chosen[name] = kind(int(value))
        setattr(lora_kernels, name, chosen[name])
    return chosen


def runtime_part(args, dirs: list[Path]) -> list[dict]:
    from runtime import LLM, LoRARequest, SamplingParams
    kernel_constants = set_lora_kernel_constants(args.lora_kernel)
    t0 = time.perf_counter()
    lora = {"enable_lora": True, "max_loras": len(dirs), "max_lora_rank": args.rank} if dirs else {}
    llm = LLM(str(args.dir), device="cuda", dtype="bfloat16", load_format=args.load_format, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.prompt_len + args.output_len + 64,
              **lora)
    requests = [LoRARequest(f"a{i}", i + 1, str(d)) for i, d in enumerate(dirs)]
    ready = {"engine": "runtime", "mode": "startup", "startup_s": round(time.perf_counter() - t0, 1),
             "lora_kernel": kernel_constants}
    print(json.dumps(ready), flush=True)

    return [ready] + measure(adapter_generate(llm, SamplingParams, requests), args, "runtime", len(dirs))


def vllm_part(args, dirs: list[Path]) -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    t0 = time.perf_counter()
    llm = LLM(model=str(args.dir), dtype="bfloat16", load_format=args.load_format, skip_tokenizer_init=True, enable_lora=True,
              max_loras=len(dirs), max_lora_rank=args.rank, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.prompt_len + args.output_len + 64)
    requests = [LoRARequest(f"a{i}", i + 1, str(d)) for i, d in enumerate(dirs)]
    ready = {"engine": "vllm", "mode": "startup", "startup_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(ready), flush=True)

    return [ready] + measure(adapter_generate(llm, SamplingParams, requests), args, "vllm", len(dirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["runtime", "vllm"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama8b"))
    parser.add_argument("--adapter-dir", type=Path, default=Path("/tmp/lora-adapters"))
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: made-up base weights in both engines (--dir needs only config.json and a tokenizer)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--adapters", type=int, default=8, help="0: LoRA off (runtime only)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--lora-kernel", nargs="*", default=[], metavar="NAME=INT",
                        help="runtime part: tuning constants of runtime_triton.lora set before start-up")
    args = parser.parse_args()
    if args.part == "vllm" and not args.adapters:
        parser.error("the vllm part measures LoRA: give --adapters 1 or more")
    dirs = adapter_dirs(args)
    rows = (runtime_part if args.part == "runtime" else vllm_part)(args, dirs)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
