"""Decode speed of a Llama-3-8B-shaped model (random bf16 weights) through ``runtime.LLM`` on CUDA.

Usage: python plugins/cuda/benchmarks/decode_llama8b.py --dir /tmp/llama8b [--batch-sizes 1 64]
       [--prompt-len 128] [--output-len 128] [--json results.json]

Speed does not depend on weight values, so the checkpoint is written once from the config alone
(about 16 GB under --dir) with a word-level tokenizer of the same vocabulary. Greedy decoding
with EOS ignored, so every request makes exactly --output-len tokens. Per batch size: a warm-up
run (Triton compiles its kernels), then one run generating 1 token and one generating
--output-len; the decode step time is their difference over (output-len - 1) steps.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from runtime import LLM, SamplingParams

CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
              rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)


def shards(config: transformers.LlamaConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each safetensors file of the checkpoint (the embeddings, then one per 4 layers): its tensors' shapes."""
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * 128
    files = {"model-embed.safetensors": {"model.embed_tokens.weight": (config.vocab_size, h),
                                         "lm_head.weight": (config.vocab_size, h), "model.norm.weight": (h,)}}
    for first in range(0, config.num_hidden_layers, 4):
        files[f"model-layers{first:02d}.safetensors"] = {
            f"model.layers.{i}.{name}": shape for i in range(first, first + 4) for name, shape in (
                ("self_attn.q_proj.weight", (h, h)), ("self_attn.k_proj.weight", (kv, h)),
                ("self_attn.v_proj.weight", (kv, h)), ("self_attn.o_proj.weight", (h, h)),
                ("mlp.gate_proj.weight", (inter, h)), ("mlp.up_proj.weight", (inter, h)),
                ("mlp.down_proj.weight", (h, inter)), ("input_layernorm.weight", (h,)),
                ("post_attention_layernorm.weight", (h,)))}
    return files


def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A norm's weight of ones, any other weight random bf16 of std 0.02, made on the GPU."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()


def write_config_and_tokenizer(path: Path, **shape) -> transformers.LlamaConfig:
    """config.json (CONFIG with ``shape``'s fields instead) and a word-level tokenizer of the same
    vocabulary (``w0`` ... ``w128255``)."""
    config = transformers.LlamaConfig(**(CONFIG | shape))
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w128000",
                                         eos_token="w128001").save_pretrained(path)
    return config


def write_checkpoint(path: Path) -> None:
    """config.json, random bf16 safetensors (one shard per 4 layers) and a tokenizer, made on the GPU."""
    config = write_config_and_tokenizer(path)
    for file, tensors in shards(config).items():
        save_file({name: random_tensor(name, shape) for name, shape in tensors.items()}, path / file)



def ensure_model(path: Path, load_format: str) -> None:
    """What a run with ``load_format`` reads from ``path``, written if its config is missing: the config and
    tokenizer alone for ``dummy`` (made-up weights at load), else the whole random checkpoint."""
    if not (path / "config.json").exists():
        (write_config_and_tokenizer if load_format == "dummy" else write_checkpoint)(path)


def timed(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the random checkpoint is (or is written)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if not (args.dir / "config.json").exists():
        start = time.perf_counter()
        write_checkpoint(args.dir)
        print(f"wrote the checkpoint in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    llm = LLM(str(args.dir), device="cuda", dtype="bfloat16", max_num_seqs=max(args.batch_sizes),
              max_model_len=args.prompt_len + args.output_len + 64)
    print(f"engine ready in {time.perf_counter() - start:.0f} s")
    rng = random.Random(0)
    results = []
    for batch in args.batch_sizes:
        def prompts():  # fresh ids every run, so no run finds its prompt in the prefix cache
            return [[rng.randrange(1000, 100000) for _ in range(args.prompt_len)] for _ in range(batch)]
        timed(llm, prompts(), 8)
        first = timed(llm, prompts(), 1)
        total = timed(llm, prompts(), args.output_len)
        step = (total - first) / (args.output_len - 1)
        results.append({"batch_size": batch, "prompt_len": args.prompt_len, "output_len": args.output_len,
                        "prefill_s": round(first, 4), "e2e_s": round(total, 4), "decode_step_ms": round(step * 1000, 3),
                        "decode_tokens_per_s": round(batch / step, 1),
                        "output_tokens_per_s": round(batch * args.output_len / total, 1)})
        print(json.dumps(results[-1]))
    print("\n| batch | decode step (ms) | decode tokens/s | output tokens/s (incl. prefill) |\n|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['batch_size']} | {r['decode_step_ms']} | {r['decode_tokens_per_s']} | {r['output_tokens_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
