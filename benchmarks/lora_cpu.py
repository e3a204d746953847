"""LoRA overhead on the CPU: the embedded model decoding with and without a rank-16 adapter on
every projection, at batch 1 and batch 16.

Usage: .venv/bin/python benchmarks/lora_cpu.py [--rank 16] [--tokens 64] [--json OUT.json]

The adapter is random (A and B small normal values) and written in PEFT's layout to a temporary
directory; LoRA stays enabled for both runs, so the difference is what the adapter's shrink and
expand cost, not the engine's set-up. Decode tok/s: 32-token prompts, --tokens tokens each,
ignore_eos, the first token's time left out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from runtime import LLM, LoRARequest, SamplingParams
from runtime.lora.adapter import partition_sizes
from runtime.models import decoder_settings
from safetensors.torch import save_file

PEFT_NAMES = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "self_attn.o_proj": ["self_attn.o_proj"], "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
              "mlp.down_proj": ["mlp.down_proj"]}


def write_adapter(settings, rank: int, directory: Path, seed: int = 0) -> None:
    """A random rank-``rank`` PEFT adapter on every projection of a model with ``settings``, in
    PEFT's file layout and with a complete adapter_config.json (vLLM reads it too)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(settings.num_layers):
        for module, (outs, width) in partition_sizes(settings).items():
            for name, out in zip(PEFT_NAMES[module], outs):
                prefix = f"base_model.model.model.layers.{layer}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = 0.02 * torch.randn(rank, width, generator=generator)
                tensors[f"{prefix}.lora_B.weight"] = 0.02 * torch.randn(out, rank, generator=generator)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    targets = sorted({name.rsplit(".", 1)[1] for names in PEFT_NAMES.values() for name in names})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "use_rslora": False, "modules_to_save": None}))


def decode_rate(llm: LLM, batch: int, tokens: int, adapter: LoRARequest | None) -> float:
    prompts = [{"prompt_token_ids": [100 + (7 * i + j) % 4000 for j in range(32)]} for i in range(batch)]

    def run(n: int) -> float:
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False,
                     lora_request=adapter)
        return time.perf_counter() - start

    run(2)
    first = run(1)
    return batch * (tokens - 1) / (run(tokens) - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    llm = LLM(enable_lora=True, max_lora_rank=max(16, args.rank))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        write_adapter(decoder_settings(llm.engine.source.hf_config), args.rank, Path(directory))
        adapter = LoRARequest("bench", 1, directory)
        for batch in (1, 16):
            base = decode_rate(llm, batch, args.tokens, None)
            tuned = decode_rate(llm, batch, args.tokens, adapter)
            row = {"batch": batch, "rank": args.rank, "base_tok_s": round(base, 2), "adapter_tok_s": round(tuned, 2),
                   "ratio": round(tuned / base, 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
