"""Baselines for a Llama-3-8B-shaped model (random bf16 weights): HF generate(), runtime.LLM, copy bandwidth.

Usage: python plugins/cuda/benchmarks/baselines_llama8b.py PART --dir /tmp/llama8b --json OUT.json [options]
  PART = bandwidth  device-to-device copy bandwidth (bytes read + written per second) of a 4 GiB bf16 tensor
       = hf         transformers generate(), greedy, min_new_tokens = max_new_tokens, at --hf-batches
       = runtime    runtime.LLM: offline throughput of --requests requests (max_num_seqs = --requests),
                    then decode at batch 1
Run each part in its own process (two 16 GB models do not share the GPU well). The checkpoint is
written by decode_llama8b.py's write_checkpoint when --dir has none. Prompts are random token ids;
decode step = (time for --output-len tokens - time for 1) / (output-len - 1).
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


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def bandwidth() -> dict:
    n = 4 << 30  # bytes
    src = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    iters = 20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    s = start.elapsed_time(end) / 1000 / iters
    return {"copy_bytes": n, "copy_s": s, "copy_bandwidth_Bps": 2 * n / s}


def hf(args) -> list[dict]:
    import transformers
    from safetensors import safe_open
    index = args.dir / "model.safetensors.index.json"
    if not index.exists():  # decode_llama8b.py writes shards without an index; transformers needs one
        weight_map = {}
        for f in sorted(args.dir.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                weight_map |= {k: f.name for k in sf.keys()}
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    rng = random.Random(0)
    out = []
    for batch in args.hf_batches:
        def run(new_tokens: int) -> float:
            ids = torch.tensor([[rng.randrange(1000, 100000) for _ in range(args.prompt_len)] for _ in range(batch)],
                               device="cuda")
            t0 = sync_time()
            with torch.inference_mode():
                res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            t1 = sync_time()
            assert res.shape[1] == args.prompt_len + new_tokens, res.shape
            return t1 - t0
        run(4)
        first = run(1)
        total = run(args.output_len)
        step = (total - first) / (args.output_len - 1)
        out.append({"engine": "hf", "batch_size": batch, "prompt_len": args.prompt_len, "output_len": args.output_len,
                    "first_token_s": round(first, 4), "e2e_s": round(total, 4), "decode_step_ms": round(step * 1e3, 3),
                    "decode_tokens_per_s": round(batch / step, 1),
                    "output_tokens_per_s": round(batch * args.output_len / total, 1)})
        print(json.dumps(out[-1]), flush=True)
    return out


def runtime_part(args) -> list[dict]:
    from runtime import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(str(args.dir), device="cuda", dtype="bfloat16", max_num_seqs=args.requests,
              max_model_len=args.prompt_len + args.output_len + 64)
    print(f"engine ready in {time.perf_counter() - t0:.0f} s", flush=True)
    rng = random.Random(1)

    def run(n: int, tokens: int) -> float:
        prompts = [{"prompt_token_ids": [rng.randrange(1000, 100000) for _ in range(args.prompt_len)]} for _ in range(n)]
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        t = sync_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        t = sync_time() - t
        assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
        return t

    out = []
    run(16, 4)  # warm-up: Triton compiles
    total = run(args.requests, args.output_len)
    out.append({"engine": "runtime", "mode": "offline_throughput", "requests": args.requests,
                "prompt_len": args.prompt_len, "output_len": args.output_len, "e2e_s": round(total, 4),
                "output_tokens_per_s": round(args.requests * args.output_len / total, 1),
                "total_tokens_per_s": round(args.requests * (args.prompt_len + args.output_len) / total, 1)})
    print(json.dumps(out[-1]), flush=True)
    run(1, 4)
    first = run(1, 1)
    total = run(1, args.output_len)
    step = (total - first) / (args.output_len - 1)
    out.append({"engine": "runtime", "mode": "batch1", "batch_size": 1, "prompt_len": args.prompt_len,
                "output_len": args.output_len, "first_token_s": round(first, 4), "e2e_s": round(total, 4),
                "decode_step_ms": round(step * 1e3, 3), "decode_tokens_per_s": round(1 / step, 1),
                "output_tokens_per_s": round(args.output_len / total, 1)})
    print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["bandwidth", "hf", "runtime"])
    p.add_argument("--dir", type=Path, default=Path("/tmp/llama8b"))
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--requests", type=int, default=256)
    args = p.parse_args()
    if args.part != "bandwidth" and not (args.dir / "config.json").exists():
        from decode_llama8b import write_checkpoint
        t = time.perf_counter()
        write_checkpoint(args.dir)
        print(f"wrote the checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
    res = {"bandwidth": bandwidth, "hf": lambda: hf(args), "runtime": lambda: runtime_part(args)}[args.part]()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "part": args.part,
            "argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if args.part == "hf":
        import transformers
        meta["transformers"] = transformers.__version__
    args.json.write_text(json.dumps(meta | {"results": res}, indent=2))


if __name__ == "__main__":
    main()
