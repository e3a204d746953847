"""Speculative decoding on a GPU: n-gram proposals on real weights against vLLM's, and the cost
of verification on the Llama-3-8B shape.

Usage: python3 benchmarks/spec_gpu.py PART --json OUT.json [options]
  PART = convert   the embedded GGUF model as an HF bfloat16 directory (--hf-dir), through
                   transformers' GGUF loader (needs the gguf package)
       = runtime   runtime.LLM on --hf-dir: the copy-heavy chat prompts of spec_cpu.py at batch 1
                   and --batch, with and without n-gram proposals (acceptance reported; --profile: then
                   the kernel time by kernel of one run of each against its wall time; --phases: then
                   one run of each with the engine step's phases timed, ms a step each;
                   --host-verification: then n-gram again with every step made on the host, no
                   verification chained on the device)
       = vllm      the same with vLLM 0.22.1 (speculative_config as vLLM reads it)
       = verify    runtime.LLM on --llama-dir (random weights, nothing is ever accepted; --load-format dummy:
                   made up at load, only the config written): decode tok/s
                   at batch 1 with and without proposals (the zero-acceptance overhead, back-off on),
                   and the time of one verification step of k = 1..8 proposals (back-off off, so
                   every decode step verifies) against a plain decode step
Run each part in its own process. Both engines ignore EOS, so they generate the same number of
tokens. decode tok/s = output tokens after the first over the time after the first token (its
prefill is the same with and without proposals): the best of --repeats full runs minus the best
of --repeats one-token runs. Acceptance (runtime's stats, vLLM's get_metrics counters) is over
all the full runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))

from spec_cpu import COPY_TASKS

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def best_seconds(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(the shortest of ``repeats`` timed calls of ``run``, what the last call returned)."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = sync_time()
        result = run()
        best = min(best, sync_time() - start)
    return best, result


def convert(args) -> list[dict]:
    import transformers
    from runtime.loader.source import embedded_model_path
    gguf = args.gguf or embedded_model_path()
    dtype = getattr(torch, getattr(args, "dtype", "bfloat16"))
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers 5 will not save a model it loaded from GGUF (marked quantized): copy the
    # dequantized weights into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(args.hf_dir)
    tokenizer.save_pretrained(args.hf_dir)
    return [{"part": "convert", "from": str(gguf), "to": str(args.hf_dir)}]


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    """The copy tasks as chat prompts (token ids), repeated to ``batch``."""
    tasks = list(COPY_TASKS.values())
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": tasks[i % len(tasks)]}],
                                           add_generation_prompt=True, tokenize=False) for i in range(batch)]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]


def output_lengths(llm, sampling_params, prompts: list[list[int]], max_tokens: int) -> list[int]:
    """Greedy generation on either engine's LLM, EOS ignored (both engines then generate the same
    number of tokens); the output length of each prompt."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        sampling_params(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [len(o.outputs[0].token_ids) for o in outs]


def vllm_spec_stats(llm) -> SimpleNamespace:
    """vLLM's speculative-decoding counters (``LLM.get_metrics``, with log stats on) under the
    names of runtime's EngineStats fields."""
    names = {"vllm:spec_decode_num_drafts": "spec_num_drafts",
             "vllm:spec_decode_num_draft_tokens": "spec_num_draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "spec_num_accepted_tokens"}
    totals = dict.fromkeys(names.values(), 0)
    for metric in llm.get_metrics():
        if metric.name in names:
            totals[names[metric.name]] += metric.value
    return SimpleNamespace(**totals)


def copy_rates(generate, prompts_by_batch: dict[int, list[list[int]]], engine: str, label: str, tokens: int,
               repeats: int, stats=None) -> list[dict]:
    """Decode tok/s per batch: (tokens - the first of each request) over (the best of ``repeats``
    full runs - the best of ``repeats`` one-token runs); acceptance over all full runs. The
    warm-up is a full run: a few tokens find no proposals, so an engine's verification kernels
    (vLLM's rejection sampler, JIT-compiled on first use) would compile inside the timed runs."""
    rows = []
    for batch, prompts in prompts_by_batch.items():
        generate(prompts, tokens)
        first, _ = best_seconds(lambda: generate(prompts, 1), repeats)
        before = stats() if stats else None
        total, counts = best_seconds(lambda: generate(prompts, tokens), repeats)
        decode = total - first
        row = {"engine": engine, "proposals": label, "batch": batch, "tokens": sum(counts),
               "decode_tok_s": round((sum(counts) - batch) / decode, 1) if decode > 0 else None,
               "total_s": round(total, 4), "first_token_s": round(first, 4)}
        if stats:
            after = stats()
            drafts = after.spec_num_drafts - before.spec_num_drafts
            proposed = after.spec_num_draft_tokens - before.spec_num_draft_tokens
            accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
            row |= {"acceptance_rate": round(accepted / proposed, 3) if proposed else None,
                    "mean_acceptance_length": round(1 + accepted / drafts, 2) if drafts else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def runtime_part(args) -> list[dict]:
    import transformers
    from runtime import LLM, SamplingParams
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    prompts = {1: chat_prompts(tokenizer, 1), args.batch: chat_prompts(tokenizer, args.batch)}
    def setting(label: str, config, chains: bool = True) -> list[dict]:
        llm = LLM(str(args.hf_dir), device=args.device, dtype="bfloat16", max_model_len=2048,
                  speculative_config=config)
        if config and not chains:
            llm.engine.chains_verification = False
        generate = functools.partial(output_lengths, llm, SamplingParams)
        rows = copy_rates(generate, prompts, "runtime", label, args.tokens, args.repeats,
                          llm.engine.stats if config else None)
        if args.phases:
            for batch, batch_prompts in prompts.items():
                rows.append(step_phases(llm, lambda: generate(batch_prompts, args.tokens), f"phases {label} batch {batch}"))
                print(json.dumps(rows[-1]), flush=True)
        if args.profile:
            # Kernel time against wall time: how much of a step the device is busy, by kernel.
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda" / "benchmarks"))
            from baselines_llama8b import profile_kernels
            for batch, batch_prompts in prompts.items():
                rows.append(profile_kernels(lambda: generate(batch_prompts, args.tokens), f"profile {label} batch {batch}"))
                print(json.dumps(rows[-1]), flush=True)
        return rows

    rows = setting("none", None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the first engine is gone: its memory goes to the second
    rows += setting("ngram", NGRAM)
    if args.host_verification:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows += setting("ngram-host", NGRAM, chains=False)
    return rows


def step_phases(llm, run, mode: str) -> dict:
    """Wall time of each phase of the engine's steps over one ``run()``, in ms a step: scheduling,
    proposing, the launch (inputs to the device, the forward pass queued or replayed; ``replay``
    is the graph replay's share), sampling queued, the collect (waiting for the device, then the
    read-back) and the scheduler's update; ``other`` is the rest of ``LLM.generate``'s loop
    (outputs, detokenizing). Where the device is the bottleneck the wait shows in ``collect``.
    Counted too: the launches (forward passes) and those of steps where a request had proposals,
    so tokens a forward pass splits into verification steps and plain ones; and the launch, sampling
    and collect of each kind apart, in ms a call (``by_kind_ms_per_call``): a verifying step's launch
    is host work the device waits for, its collect the device's time left after the host's share;
    a plain step launched ahead (behind the step in flight) is "plain ahead", its launch hidden
    behind the device. ``launches_by_kind`` counts the forward passes of each kind."""
    engine = llm.engine
    runner = engine.runner
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    targets = [("schedule", engine.scheduler, "schedule"), ("look_ahead", engine.scheduler, "look_ahead"),
               ("update", engine.scheduler, "update"), ("launch", runner, "launch"), ("sample", runner, "sample"),
               ("collect", runner, "collect"), ("replay", getattr(runner, "decode_graphs", None), "run"),
               ("launch_chained", runner, "launch_chained"), ("step", engine, "step")]
    targets.append(("propose", engine.proposer, "propose"))
    targets = [(label, owner, name) for label, owner, name in targets if owner is not None]  # no graphs, no proposer
    verifying = [0]  # launches of a step where some request had proposals
    by_kind: dict[tuple[str, str], list[float]] = {}  # (kind, phase) -> [seconds, calls]
    for label, owner, name in targets:
        def timed(*args, _original=getattr(owner, name), _label=label, **kwargs):
            # launch takes the scheduler's output, sample and collect the pending step: both list the step's requests
            kind = None
            if _label in ("launch", "sample", "collect", "launch_chained") and args[0] is not None:
                kind = "chained" if any(s.chained for s in args[0].scheduled) else \
                    "verifying" if any(s.draft_token_ids for s in args[0].scheduled) else \
                    "plain ahead" if any(s.token_pending for s in args[0].scheduled) else "plain"
                verifying[0] += _label == "launch" and kind == "verifying"
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                totals[_label] = totals.get(_label, 0.0) + elapsed
                calls[_label] = calls.get(_label, 0) + 1
                if kind is not None:
                    entry = by_kind.setdefault((kind, _label), [0.0, 0])
                    entry[0] += elapsed
                    entry[1] += 1
        setattr(owner, name, timed)
    try:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    finally:
        for _, owner, name in targets:
            delattr(owner, name)  # the instance attribute goes, the class's method shows again
    steps = calls["step"]
    per_step = {label: round(1e3 * t / steps, 3) for label, t in sorted(totals.items())}
    per_step["other"] = round(1e3 * (wall - totals["step"]) / steps, 3)
    kinds: dict[str, dict[str, float]] = {}
    for (kind, label), (seconds, count) in sorted(by_kind.items()):
        kinds.setdefault(kind, {})[label] = round(1e3 * seconds / count, 3)
    return {"engine": "runtime", "mode": mode, "steps": steps, "verification_launches": verifying[0],
            "forward_launches": calls.get("launch", 0) + calls.get("launch_chained", 0),
            "chained_launches": calls.get("launch_chained", 0), "graph_replays": calls.get("replay", 0),
            "wall_s": round(wall, 4), "phase_ms_per_step": per_step, "by_kind_ms_per_call": kinds,
            "launches_by_kind": {kind: count for (kind, label), (_, count) in sorted(by_kind.items())
                                 if label in ("launch", "launch_chained")}}


def vllm_part(args) -> list[dict]:
    import transformers
    from vllm import LLM, SamplingParams
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    prompts = {1: chat_prompts(tokenizer, 1), args.batch: chat_prompts(tokenizer, args.batch)}
    llm = LLM(model=str(args.hf_dir), dtype="bfloat16", max_model_len=2048, speculative_config=NGRAM,
              gpu_memory_utilization=0.5, disable_log_stats=False)
    stats = functools.partial(vllm_spec_stats, llm)
    try:
        stats()
    except Exception as error:  # noqa: BLE001 - any failure only drops the acceptance columns
        print(f"vLLM's spec-decode counters unavailable ({error}): acceptance not reported", flush=True)
        stats = None
    return copy_rates(functools.partial(output_lengths, llm, SamplingParams), prompts, "vllm", "ngram", args.tokens,
                      args.repeats, stats)


def verify_part(args) -> list[dict]:
    from runtime import LLM, SamplingParams
    from runtime.sched.request import Request
    from runtime.sched.scheduler import SchedulerOutput
    prompt = [[10 + (7 * i) % 250 for i in range(512)]]

    class Always:
        """Random weights accept nothing: every step proposes k tokens, to price verification."""
        k = NGRAM["num_speculative_tokens"]

        def propose(self, out: SchedulerOutput) -> None:
            for item in out.scheduled:
                if item.max_drafts:
                    item.set_drafts([7] * min(self.k, item.max_drafts))

    def setting(label: str, config) -> list[dict]:
        llm = LLM(str(args.llama_dir), device=args.device, dtype="bfloat16", max_model_len=1024,
                  speculative_config=config, load_format=args.load_format)
        generate = functools.partial(output_lengths, llm, SamplingParams)
        if config is not None:
            llm.engine.proposer = Always()
            llm.engine.chains_verification = False  # a chain proposes by n-gram on the device, not Always's
        rows = copy_rates(lambda batch, n: generate(prompt, n), {1: prompt}, "runtime", f"{label} (zero acceptance)",
                          args.tokens, args.repeats)

        def step_row(mode: str, k: int) -> dict:
            generate(prompt, 8)
            drafts = llm.engine.stats().spec_num_drafts
            seconds = best_seconds(lambda: generate(prompt, args.tokens), args.repeats)[0]
            row = {"engine": "runtime", "mode": mode, "k": k, "step_ms": round(seconds / args.tokens * 1e3, 3)}
            if k:
                row["verification_steps_per_run"] = (llm.engine.stats().spec_num_drafts - drafts) / args.repeats
            print(json.dumps(row), flush=True)
            return row

        if config is None:
            return rows + [step_row("decode_step", 0)]
        # After a few all-rejected steps the back-off would leave mostly plain decode steps to
        # time: off for the sweep, so every decode step verifies k proposals (a token each).
        Request.MAX_PROPOSAL_PAUSE = 0
        for k in range(1, 9):
            llm.engine.proposer.k = k
            llm.engine.scheduler.num_speculative_tokens = k
            rows.append(step_row("verification_step", k))
        return rows

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda" / "benchmarks"))
    from decode_llama8b import ensure_model
    ensure_model(args.llama_dir, args.load_format)
    rows = setting("none", None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows + setting("ngram", {**NGRAM, "num_speculative_tokens": 8})  # room for k up to 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["convert", "runtime", "vllm", "verify"])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, help="the embedded model's GGUF file, where its package is not installed")
    parser.add_argument("--hf-dir", type=Path, default=Path("/tmp/smollm2-bf16"))
    parser.add_argument("--llama-dir", type=Path, default=Path("/tmp/llama8b"))
    parser.add_argument("--load-format", default="auto", help="verify: dummy for made-up weights on --llama-dir's "
                                                               "config (written if missing), no checkpoint on disk")
    parser.add_argument("--profile", action="store_true", help="runtime: then kernel time by kernel of one run "
                                                                 "at each batch, without and with proposals")
    parser.add_argument("--phases", action="store_true", help="runtime: then the engine step's phases timed over one "
                                                                "run at each batch, without and with proposals")
    parser.add_argument("--host-verification", action="store_true",
                        help="runtime: then n-gram proposals again with every step made on the host (no verification "
                             "chained on the device, worker/verify_chain.py)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10,
                        help="each timing is the best of this many runs (a full run at batch 8 takes ~0.1 s: "
                             "the best of 3 moved the n-gram speed-up between 1.38x and 1.59x, H100 2026-12-07)")
    parser.add_argument("--device", default="cuda", help="runtime's device (cpu: check the runtime part on a tiny "
                                                         "checkpoint given as --hf-dir)")
    args = parser.parse_args()
    part = {"convert": convert, "runtime": runtime_part, "vllm": vllm_part, "verify": verify_part}[args.part]
    args.json.write_text(json.dumps(part(args), indent=1))


if __name__ == "__main__":
    main()
