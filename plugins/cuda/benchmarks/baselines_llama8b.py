"""Baselines for a Llama-3-8B-shaped model (random bf16 weights): HF generate(), runtime.LLM, copy bandwidth.

Usage: python plugins/cuda/benchmarks/baselines_llama8b.py PART --dir /tmp/llama8b --json OUT.json [options]
  PART = bandwidth  device-to-device copy bandwidth (bytes read + written per second) of a 4 GiB bf16 tensor
       = hf         transformers generate(), greedy, min_new_tokens = max_new_tokens, at --hf-batches
       = runtime    runtime.LLM: decode at batch 1, offline throughput of --requests requests,
                    --mixed lengths, --profile of decode steps (kernel time against wall time)
Run each part in its own process (two 16 GB models do not share the GPU well). The checkpoint is
written by decode_llama8b.py's write_checkpoint when --dir has none. Prompts are random token ids;
decode step = (time for --output-len tokens - time for 1) / (output-len - 1).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
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
    """runtime.LLM on one engine: batch-1 decode, offline throughput of --requests fixed-length requests,
    then (with --mixed) a mixed-length workload; --profile adds a kernel-time profile of decode steps."""
    from runtime import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(str(args.dir), device="cuda", dtype="bfloat16", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
              max_model_len=max(args.prompt_len + args.output_len, MIXED_PROMPT[1] + MIXED_OUTPUT[1] if args.mixed else 0) + 64,
              kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization)
    engine = llm.engine
    ready = {"engine": "runtime", "mode": "startup", "startup_s": round(time.perf_counter() - t0, 1),
             "enforce_eager": args.enforce_eager, "kv_cache_dtype": args.kv_cache_dtype, "quantization": args.quantization,
             "kv_cache_tokens": engine.num_blocks * engine.block_size, "weight_bytes": engine.runner.weight_bytes,
             "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": engine.max_num_batched_tokens}
    print(json.dumps(ready), flush=True)
    rng = random.Random(1)

    def run(lengths: list[tuple[int, int]]) -> float:
        prompts = [{"prompt_token_ids": [rng.randrange(1000, 100000) for _ in range(p)]} for p, _ in lengths]
        params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in lengths]
        t = sync_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        t = sync_time() - t
        assert all(len(out.outputs[0].token_ids) == o for out, (_, o) in zip(outs, lengths))
        return t

    out = [ready]
    run([(args.prompt_len, 4)] * 16)  # warm-up: Triton compiles the prefill variants
    run([(args.prompt_len, 4)])
    first = run([(args.prompt_len, 1)])
    total = run([(args.prompt_len, args.output_len)])
    step = (total - first) / (args.output_len - 1)
    out.append({"engine": "runtime", "mode": "batch1", "batch_size": 1, "prompt_len": args.prompt_len,
                "output_len": args.output_len, "first_token_s": round(first, 4), "e2e_s": round(total, 4),
                "decode_step_ms": round(step * 1e3, 3), "decode_tokens_per_s": round(1 / step, 1),
                "output_tokens_per_s": round(args.output_len / total, 1)})
    print(json.dumps(out[-1]), flush=True)
    if args.profile:
        host = cProfile.Profile()
        host.enable()
        run([(args.prompt_len, args.output_len)])
        host.disable()
        listing = io.StringIO()
        pstats.Stats(host, stream=listing).sort_stats("tottime").print_stats(25)
        out.append({"engine": "runtime", "mode": "cprofile_generate_batch1", "listing": listing.getvalue().splitlines()[:45]})
        for batch in args.profile_batches:
            out.append(profile_decode(llm, batch, args.prompt_len))
            print(json.dumps(out[-1]), flush=True)

    if not args.requests:
        return out
    with StepTrace(engine) as trace:
        total = run([(args.prompt_len, args.output_len)] * args.requests)
    out.append({"engine": "runtime", "mode": "offline_throughput", "requests": args.requests,
                "prompt_len": args.prompt_len, "output_len": args.output_len, "e2e_s": round(total, 4),
                "output_tokens_per_s": round(args.requests * args.output_len / total, 1),
                "total_tokens_per_s": round(args.requests * (args.prompt_len + args.output_len) / total, 1),
                "steps": trace.summary()})
    print(json.dumps(out[-1]), flush=True)
    if args.profile_offline:
        out.append(profile_kernels(lambda: run([(args.prompt_len, args.output_len)] * args.requests)))
        print(json.dumps(out[-1]), flush=True)
    if args.mixed:
        mix = random.Random(2)
        lengths = [(mix.randint(*MIXED_PROMPT), mix.randint(*MIXED_OUTPUT)) for _ in range(args.requests)]
        total = run(lengths)
        prompt_tokens, output_tokens = sum(p for p, _ in lengths), sum(o for _, o in lengths)
        out.append({"engine": "runtime", "mode": "offline_mixed", "requests": args.requests,
                    "prompt_len_range": MIXED_PROMPT, "output_len_range": MIXED_OUTPUT,
                    "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "e2e_s": round(total, 4),
                    "output_tokens_per_s": round(output_tokens / total, 1),
                    "total_tokens_per_s": round((prompt_tokens + output_tokens) / total, 1)})
        print(json.dumps(out[-1]), flush=True)
    return out


MIXED_PROMPT, MIXED_OUTPUT = (64, 2048), (32, 512)


class StepTrace:
    """Wall time of each engine step by kind (decode only, prefill only, or both), and the time
    the GPU waited for each step to be launched.

    Each ``EngineCore.step`` call collects the oldest launched step, so call i is charged for
    launch i (with look-ahead, launch i + 1 happens inside call i). An event recorded before
    each launch completes when the GPU reaches it: its distance from the event after the
    previous launch's work is GPU idle time (the host had not queued the step yet).
    """

    def __init__(self, engine):
        self.engine, self.kinds, self.walls, self.events = engine, [], [], []
        self.first_add = self.first_launch = None
        self.gc_seconds, self._gc_start = [0.0, 0.0, 0.0], 0.0

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_seconds[info["generation"]] += time.perf_counter() - self._gc_start

    def __enter__(self):
        launch, step, add_request = self.engine.runner.launch, self.engine.step, self.engine.add_request
        gc.callbacks.append(self._gc)

        def traced_add_request(*args, **kw):
            if self.first_add is None:
                self.first_add = time.perf_counter()
            return add_request(*args, **kw)

        def traced_launch(out, *rest, **kw):
            if self.first_launch is None:
                self.first_launch = time.perf_counter()
            prefill = sum(s.num_new_tokens for s in out.scheduled if s.start < s.request.num_prompt_tokens)
            decode = sum(1 for s in out.scheduled if s.start >= s.request.num_prompt_tokens)
            self.kinds.append(("mixed" if prefill and decode else "prefill" if prefill else "decode", prefill, decode))
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record()
            pending = launch(out, *rest, **kw)
            after.record()
            self.events.append((before, after))
            return pending

        def traced_step():
            t = time.perf_counter()
            result = step()
            self.walls.append(time.perf_counter() - t)
            return result

        self.engine.runner.launch, self.engine.step, self.engine.add_request = traced_launch, traced_step, traced_add_request
        return self

    def __exit__(self, *exc):
        del self.engine.runner.launch, self.engine.step, self.engine.add_request
        gc.callbacks.remove(self._gc)

    def summary(self) -> dict:
        torch.cuda.synchronize()
        idle = [0.0] + [max(0.0, after.elapsed_time(before)) / 1e3
                        for (_, after), (before, _) in zip(self.events, self.events[1:])]
        by_kind: dict[str, dict] = {}
        for (kind, prefill, decode), wall, gap in zip(self.kinds, self.walls, idle):
            k = by_kind.setdefault(kind, {"steps": 0, "seconds": 0.0, "gpu_idle_before_s": 0.0, "prefill_tokens": 0,
                                          "decode_tokens": 0})
            k["steps"] += 1
            k["seconds"] += wall
            k["gpu_idle_before_s"] += gap
            k["prefill_tokens"] += prefill
            k["decode_tokens"] += decode
        for k in by_kind.values():
            k["ms_per_step"] = round(k["seconds"] * 1e3 / k["steps"], 2)
            k["seconds"], k["gpu_idle_before_s"] = round(k["seconds"], 3), round(k["gpu_idle_before_s"], 3)
        return by_kind | {"first_add_to_first_launch_s": round(self.first_launch - self.first_add, 3),
                          "gc_seconds_by_generation": [round(s, 3) for s in self.gc_seconds]}


def profile_kernels(fn, mode: str = "profile_offline") -> dict:
    """Kernel time of one call of ``fn`` by kernel, the 25 longest (CUDA activity only: the host runs at
    its own speed), labelled ``mode``."""
    from torch.profiler import ProfilerActivity, profile
    t = sync_time()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = sync_time() - t
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total_us = sum(e.self_device_time_total for e in kernels)
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    return {"engine": "runtime", "mode": mode, "wall_s": round(wall, 3), "kernel_s": round(total_us / 1e6, 3),
            "gpu_busy_fraction": round(total_us / 1e6 / wall, 3),
            "top_kernels_s": {e.key[:100]: [round(e.self_device_time_total / 1e6, 3), e.count] for e in top}}


def profile_decode(llm, batch: int, prompt_len: int) -> dict:
    """Kernel time against wall time over 32 decode steps of ``batch`` sequences (after their prefill)."""
    from torch.profiler import ProfilerActivity, profile

    from runtime import SamplingParams
    rng = random.Random(3)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"profile-{batch}-{i}", [rng.randrange(1000, 100000) for _ in range(prompt_len)], params)
    decoding: set[str] = set()
    while len(decoding) < batch:  # every prompt prefilled: the steps profiled below are pure decode
        decoding |= {o.request_id for o in engine.step() if o.new_token_ids}
    steps = 32
    t = sync_time()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    wall = sync_time() - t
    host = cProfile.Profile()
    t = sync_time()
    host.enable()
    for _ in range(steps):
        engine.step()
    host.disable()
    wall_unprofiled = sync_time() - t
    listing = io.StringIO()
    pstats.Stats(host, stream=listing).sort_stats("tottime").print_stats(25)
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    top = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)[:8]
    while engine.has_unfinished_requests():
        engine.step()
    return {"engine": "runtime", "mode": "profile_decode", "batch_size": batch, "steps": steps,
            "wall_ms_per_step_profiled": round(wall * 1e3 / steps, 3),
            "wall_ms_per_step_cprofiled": round(wall_unprofiled * 1e3 / steps, 3),
            "host_profile_by_tottime": listing.getvalue().splitlines()[:45],
            "kernel_ms_per_step": round(kernel_us / 1e3 / steps, 3),
            "gpu_busy_fraction": round(kernel_us / 1e6 / wall, 3),
            "top_kernels_ms_per_step": {e.key[:80]: round(e.self_device_time_total / 1e3 / steps, 3) for e in top}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["bandwidth", "hf", "runtime"])
    p.add_argument("--dir", type=Path, default=Path("/tmp/llama8b"))
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--requests", type=int, default=1000, help="0: batch-1 decode (and --profile) only")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--quantization", default=None)
    p.add_argument("--mixed", action="store_true", help=f"also prompts {MIXED_PROMPT} x outputs {MIXED_OUTPUT}, uniform")
    p.add_argument("--profile", action="store_true", help="profile decode steps at --profile-batches")
    p.add_argument("--profile-batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--profile-offline", action="store_true", help="run the offline workload again under the kernel profiler")
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
