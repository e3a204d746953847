"""Speculative decoding on a GPU: n-gram proposals on real weights against vLLM's, and the cost
of verification on the Llama-3-8B shape.

Usage: python3 benchmarks/spec_gpu.py PART --json OUT.json [options]
  PART = convert   the embedded GGUF model as an HF bfloat16 directory (--hf-dir), through
                   transformers' GGUF loader (needs the gguf package)
       = runtime   runtime.LLM on --hf-dir: the copy-heavy chat prompts of spec_cpu.py at batch 1
                   and --batch, with and without n-gram proposals (acceptance reported)
       = vllm      the same with vLLM 0.22.1 (speculative_config as vLLM reads it)
       = verify    runtime.LLM on --llama-dir (random weights, nothing is ever accepted): decode tok/s
                   at batch 1 with and without proposals (the zero-acceptance overhead), and the
                   time of one verification step of k = 1..8 proposals against a plain decode step
Run each part in its own process. decode tok/s = output tokens after the first over the time after
the first token (its prefill is the same with and without proposals).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from spec_cpu import COPY_TASKS

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def convert(args) -> list[dict]:
    import transformers
    from runtime.loader.source import embedded_model_path
    gguf = args.gguf or embedded_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers 5 will not save a model it loaded from GGUF (marked quantized): copy the
    # dequantized weights into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
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


def output_lengths(llm, sampling_params, prompts: list[list[int]], max_tokens: int, **extra) -> list[int]:
    """Greedy generation on either engine's LLM; the output length of each prompt."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        sampling_params(temperature=0, max_tokens=max_tokens, **extra), use_tqdm=False)
    return [len(o.outputs[0].token_ids) for o in outs]


def copy_rates(generate, prompts_by_batch: dict[int, list[list[int]]], engine: str, label: str, tokens: int,
               stats=None) -> list[dict]:
    rows = []
    for batch, prompts in prompts_by_batch.items():
        generate(prompts, 4)
        first = sync_time()
        generate(prompts, 1)
        first = sync_time() - first
        before = stats() if stats else None
        total = sync_time()
        counts = generate(prompts, tokens)
        total = sync_time() - total
        row = {"engine": engine, "proposals": label, "batch": batch,
               "decode_tok_s": round((sum(counts) - batch) / (total - first), 1), "tokens": sum(counts)}
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
    def setting(label: str, config) -> list[dict]:
        llm = LLM(str(args.hf_dir), device="cuda", dtype="bfloat16", max_model_len=2048, speculative_config=config)
        return copy_rates(functools.partial(output_lengths, llm, SamplingParams), prompts, "runtime", label,
                          args.tokens, llm.engine.stats if config else None)

    rows = setting("none", None)
    torch.cuda.empty_cache()  # the first engine is gone: its memory goes to the second
    return rows + setting("ngram", NGRAM)


def vllm_part(args) -> list[dict]:
    import transformers
    from vllm import LLM, SamplingParams
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    prompts = {1: chat_prompts(tokenizer, 1), args.batch: chat_prompts(tokenizer, args.batch)}
    llm = LLM(model=str(args.hf_dir), dtype="bfloat16", max_model_len=2048, speculative_config=NGRAM,
              gpu_memory_utilization=0.5)
    return copy_rates(functools.partial(output_lengths, llm, SamplingParams), prompts, "vllm", "ngram", args.tokens)


def verify_part(args) -> list[dict]:
    from runtime import LLM, SamplingParams
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
        llm = LLM(str(args.llama_dir), device="cuda", dtype="bfloat16", max_model_len=1024, speculative_config=config)
        generate = functools.partial(output_lengths, llm, SamplingParams, ignore_eos=True)
        if config is not None:
            llm.engine.proposer = Always()
        rows = copy_rates(lambda batch, n: generate(prompt, n), {1: prompt}, "runtime", f"{label} (zero acceptance)",
                          args.tokens)
        for k in range(1, 9) if config is not None else ():
            llm.engine.proposer.k = k
            llm.engine.scheduler.num_speculative_tokens = k
            generate(prompt, 8)
            start = sync_time()
            generate(prompt, args.tokens)
            step = (sync_time() - start) / args.tokens
            rows.append({"engine": "runtime", "mode": "verification_step", "k": k, "step_ms": round(step * 1e3, 3)})
            print(json.dumps(rows[-1]), flush=True)
        return rows

    rows = setting("none", None)
    torch.cuda.empty_cache()
    return rows + setting("ngram", {**NGRAM, "num_speculative_tokens": 8})  # room for k up to 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["convert", "runtime", "vllm", "verify"])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, help="the embedded model's GGUF file, where its package is not installed")
    parser.add_argument("--hf-dir", type=Path, default=Path("/tmp/smollm2-bf16"))
    parser.add_argument("--llama-dir", type=Path, default=Path("/tmp/llama8b"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    part = {"convert": convert, "runtime": runtime_part, "vllm": vllm_part, "verify": verify_part}[args.part]
    args.json.write_text(json.dumps(part(args), indent=1))


if __name__ == "__main__":
    main()
