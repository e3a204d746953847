"""Offline generation speed: runtime's LLM against HF transformers ``generate()``, same model and prompts.

Usage: .venv/bin/python benchmarks/offline_vs_hf.py [--batch-sizes 1 16] [--new-tokens 64] [--model PATH]
           [--dtype auto] [--quantization int8]

Both sides decode greedily with EOS ignored, so they produce the same number of tokens; each
figure is output tokens per second of wall time, measured in one run (quote the ratio: the
machine is shared and absolute numbers move with its load). HF runs a padded static batch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

from runtime import LLM, SamplingParams
from runtime.loader.source import embedded_model_path

PROMPTS = [
    "The capital of France is", "Write a short poem about the sea.", "def quicksort(items):",
    "Explain what a transformer model is.", "List five fruits:", "Once upon a time",
    "The quick brown fox", "How do airplanes fly?", "Translate 'good morning' into French.",
    "What is 12 times 7?", "Name three planets.", "Summarise the plot of Hamlet.",
    "import numpy as np\n", "The best way to learn programming is", "Describe a cat.", "Why is the sky blue?",
]


def hf_model(model: str | None):
    if model is None:
        path = embedded_model_path()
        return (transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32),
                transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
    return (transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
            transformers.AutoTokenizer.from_pretrained(model))


def time_runtime(llm: LLM, prompts: list[str], new_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


@torch.inference_mode()
def time_hf(model, tokenizer, prompts: list[str], new_tokens: int) -> tuple[float, int]:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - start, (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="runtime's dtype; HF always runs float32 as it loads the GGUF")
    parser.add_argument("--quantization", default=None, help="runtime's --quantization (e.g. int8 on the CPU); HF stays float32")
    args = parser.parse_args()
    llm = LLM(args.model, kv_cache_memory="1GiB", max_model_len=2048, dtype=args.dtype, quantization=args.quantization)
    model, tokenizer = hf_model(args.model)
    model.eval()
    time_runtime(llm, PROMPTS[:2], 4)
    time_hf(model, tokenizer, PROMPTS[:2], 4)
    results = []
    for batch_size in args.batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
        ours_s, ours_tokens = time_runtime(llm, prompts, args.new_tokens)
        hf_s, hf_tokens = time_hf(model, tokenizer, prompts, args.new_tokens)
        row = {"batch": batch_size, "runtime_tok_s": ours_tokens / ours_s, "hf_tok_s": hf_tokens / hf_s}
        row["ratio"] = row["runtime_tok_s"] / row["hf_tok_s"]
        results.append(row)
        print(f"batch {batch_size:3d}: runtime {row['runtime_tok_s']:8.1f} tok/s   HF generate {row['hf_tok_s']:8.1f} tok/s"
              f"   ratio {row['ratio']:.2f}x", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
