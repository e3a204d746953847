"""Mixture-of-experts on a GPU: a real MoE shape with made-up bf16 weights, this runtime against
vLLM on the same model; batch-1 decode against the roofline of the bytes a token reads.

Usage: python3 benchmarks/moe_gpu.py PART [--shape mixtral-16l] [--dir /tmp/moe] [--json OUT.json]
  PART = write    the model directory: config.json and a word-level tokenizer, no weights (both engines
                  run it with load_format="dummy": made-up weights, nothing written to or read from disk)
       = runtime  runtime.LLM(device cuda, bf16)
       = vllm     vllm.LLM (0.22.1 importable: ../shared/anchors/vllm.md)
       = kernel   the fused_moe op alone at 1-8192 tokens against the roofline of the experts it reads
                  (and its matrix rate: prefill is compute-bound)
       = vllm-kernel  the same with vLLM's fused_topk + fused_experts
Run each part in its own process. Shapes (--layers overrides the layer count):
  mixtral-8x7b   Mixtral-8x7B: 32 layers, 8 experts of 14336, top-2; 93 GB in bf16: one H200's memory
  mixtral-16l    the same with 16 layers (47 GB): fits an 80 GB H100 with room for the KV cache (the default)
  qwen3-30b-a3b  Qwen3-30B-A3B: 48 layers, 128 experts of 768, top-8, renormalised; 61 GB
Both engines measure batch-1 decode (--prompt-len 512, --output-len 128; step = (time for 128
tokens - time for 1) / 127) and offline throughput on --requests 1000 x (512, 128), greedy, ignore_eos,
the same random prompts (--profile-requests N: then runtime's kernel time by kernel at batch 1 and over
N requests offline). The roofline step is the bytes one token reads (attention and router
weights of every layer, its top-k experts' weights, the lm_head row block, the KV cache of the
context) divided by the bandwidth of a device-to-device copy measured in the same process.
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

SHAPES = {
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                          tie_word_embeddings=False),
}
SHAPES["mixtral-16l"] = dict(SHAPES["mixtral-8x7b"], num_hidden_layers=16)


def config_of(shape: str, layers: int | None) -> transformers.PretrainedConfig:
    values = dict(SHAPES[shape])
    if layers:
        values["num_hidden_layers"] = layers
    cls = transformers.MixtralConfig if values["model_type"] == "mixtral" else transformers.Qwen3MoeConfig
    values.pop("model_type")
    return cls(**values)


def write_model_directory(config: transformers.PretrainedConfig, path: Path) -> None:
    """config.json and a word-level tokenizer (``w0`` ... ``w{vocab - 1}``) for ``config``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(config.vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1",
                                         eos_token="w2").save_pretrained(path)


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of 2 GiB (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 10 * 2 * src.numel() * src.element_size() / (time.perf_counter() - start)


def captured(call, calls: int = 50) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``call`` (run once before, to compile), replayed once."""
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    return graph


def replay_seconds(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Seconds one replay of ``graph`` takes, over ``replays`` of them back to back."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays


def graph_us(call) -> float:
    """Microseconds a call takes, from a CUDA graph of 50 of them replayed 4 times."""
    return replay_seconds(captured(call), 4) / 50 * 1e6


def bytes_per_token(config: transformers.PretrainedConfig, context: int) -> dict:
    """What one decode token reads (bf16): every layer's attention and router, its top-k experts,
    one lm_head, and the KV cache of ``context`` tokens."""
    from runtime.models import decoder_settings

    s = decoder_settings(config)
    moe = s.moe
    qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    attention = s.hidden_size * qkv + s.num_heads * s.head_dim * s.hidden_size + moe.num_experts * s.hidden_size
    experts = moe.top_k * 3 * s.hidden_size * moe.intermediate_size
    kv = context * 2 * s.num_kv_heads * s.head_dim
    parts = {"attention_and_router": s.num_layers * attention, "experts": s.num_layers * experts,
             "lm_head": s.vocab_size * s.hidden_size, "kv_cache": s.num_layers * kv}
    return {name: 2 * n for name, n in parts.items()}


def random_prompts(config, count: int, length: int) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(100, config.vocab_size) for _ in range(length)] for _ in range(count)]


def profile(generate, args, config) -> list[dict]:
    """Kernel time by kernel of one batch-1 decode of --output-len tokens and of an offline run of
    --profile-requests prompts (this process's engine: runtime only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda" / "benchmarks"))
    from baselines_llama8b import profile_kernels

    prompts = random_prompts(config, args.profile_requests, args.prompt_len)
    out = [profile_kernels(lambda: generate(prompts[:1], args.output_len), "profile_batch1"),
           profile_kernels(lambda: generate(prompts, args.output_len), "profile_offline")]
    for row in out:
        print(json.dumps(row), flush=True)
    return out


def measure(generate, args, engine: str, config) -> list[dict]:
    """Batch-1 decode (with its roofline) and offline throughput through ``generate(prompts, max_tokens)``."""
    prompts = random_prompts(config, args.requests, args.prompt_len)

    def run(batch: list[list[int]], max_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(batch, max_tokens)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(prompts[:16], 4)
    run(prompts[:1], 4)
    first = run(prompts[:1], 1)
    step = (run(prompts[:1], args.output_len) - first) / (args.output_len - 1)
    read = bytes_per_token(config, args.prompt_len + args.output_len // 2)
    bandwidth = copy_bandwidth()
    roofline = sum(read.values()) / bandwidth
    out = [{"engine": engine, "mode": "batch1", "decode_step_ms": round(step * 1e3, 3),
            "decode_tokens_per_s": round(1 / step, 1), "roofline_step_ms": round(roofline * 1e3, 3),
            "of_roofline": round(roofline / step, 3), "bytes_per_token_gb": round(sum(read.values()) / 1e9, 3),
            "bytes": read, "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3)}]
    print(json.dumps(out[-1]), flush=True)
    total = run(prompts, args.output_len)
    out.append({"engine": engine, "mode": "offline_throughput", "requests": args.requests, "prompt_len": args.prompt_len,
                "output_len": args.output_len, "e2e_s": round(total, 3),
                "output_tokens_per_s": round(args.requests * args.output_len / total, 1),
                "total_tokens_per_s": round(args.requests * (args.prompt_len + args.output_len) / total, 1)})
    print(json.dumps(out[-1]), flush=True)
    return out


def make_generate(llm, sampling_params):
    def generate(prompts: list[list[int]], max_tokens: int) -> None:
        params = sampling_params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return generate


def engine_part(args, engine: str) -> list[dict]:
    config = transformers.AutoConfig.from_pretrained(args.dir)
    start = time.perf_counter()
    common = dict(dtype="bfloat16", load_format="dummy", max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=args.prompt_len + args.output_len + 64, gpu_memory_utilization=args.gpu_memory_utilization)
    if engine == "runtime":
        from runtime import LLM, SamplingParams
        llm = LLM(str(args.dir), device="cuda", quantization=args.quantization, **common)
    else:
        from vllm import LLM, SamplingParams
        llm = LLM(model=str(args.dir), skip_tokenizer_init=True, quantization=args.quantization, **common)
    activation = None
    if engine == "runtime":
        kv_tokens = llm.engine.num_blocks * llm.engine.block_size
        activation = llm.engine.executor.activation_bytes
    else:
        cache = llm.llm_engine.vllm_config.cache_config
        kv_tokens = cache.num_gpu_blocks * cache.block_size if cache.num_gpu_blocks else None
    # The KV cache's size bounds the sequences a step holds: offline throughput follows it.
    ready = {"engine": engine, "mode": "startup", "startup_s": round(time.perf_counter() - start, 1),
             "shape": config.to_dict().get("architectures"), "layers": config.num_hidden_layers,
             "quantization": args.quantization, "kv_cache_tokens": kv_tokens,
             # What the worst-case step's profile took beyond the weights (vLLM logs its own).
             "activation_peak_gib": None if activation is None else round(activation / (1 << 30), 2)}
    print(json.dumps(ready), flush=True)
    generate = make_generate(llm, SamplingParams)
    rows = [ready] + measure(generate, args, engine, config)
    return rows + (profile(generate, args, config) if engine == "runtime" and args.profile_requests else [])


def kernel_part(args, engine: str) -> list[dict]:
    """The fused MoE op alone on one layer's experts of the shape, through CUDA graphs of 50 calls:
    runtime's ``fused_moe``, or vLLM's ``fused_topk`` + ``fused_experts`` (its Triton path, default
    tile configs where it ships none for the GPU) on the same weights, gate and up stacked alike."""
    config = config_of(args.shape, 1)
    from runtime.models import decoder_settings
    s = decoder_settings(config)
    moe, h = s.moe, s.hidden_size
    w13 = torch.randn(moe.num_experts, 2 * moe.intermediate_size, h, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(moe.num_experts, h, moe.intermediate_size, device="cuda", dtype=torch.bfloat16) * 0.02
    if engine == "runtime":
        from runtime.platform import get_registry
        ops = get_registry().kernels("cuda")

        def fused(x, logits):
            return ops.fused_moe(x, logits, w13, w2, moe.top_k, moe.renormalize)
    else:
        from vllm.model_executor.layers.fused_moe import fused_experts, fused_topk

        def fused(x, logits):
            weights, ids, _ = fused_topk(x, logits, moe.top_k, moe.renormalize)
            return fused_experts(x, w13, w2, weights, ids)
    bandwidth = copy_bandwidth()
    out = []
    for tokens in (1, 4, 16, 64, 256, 2048, 8192):
        x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(tokens, moe.num_experts, device="cuda")
        seconds = graph_us(lambda: fused(x, logits)) / 1e6
        used = torch.topk(logits, moe.top_k).indices.unique().numel()
        read = used * 3 * h * moe.intermediate_size * 2
        out.append({"engine": engine, "mode": "fused_moe", "shape": args.shape, "tokens": tokens,
                    "experts_read": used, "us": round(seconds * 1e6, 1), "roofline_us": round(read / bandwidth * 1e6, 1),
                    "of_roofline": round(read / bandwidth / seconds, 3),
                    "tflops": round(2 * tokens * moe.top_k * 3 * h * moe.intermediate_size / seconds / 1e12, 1)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["write", "runtime", "vllm", "kernel", "vllm-kernel"])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-16l")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--quantization", default=None, help="e.g. fp8 (experts as float8 in both engines)")
    parser.add_argument("--profile-requests", type=int, default=0,
                        help="runtime: then kernel time by kernel of batch-1 decode and of this many requests offline")
    args = parser.parse_args()
    if args.part == "write":
        write_model_directory(config_of(args.shape, args.layers), args.dir)
        print(json.dumps({"written": str(args.dir), "shape": args.shape, "layers": args.layers}))
        return
    kernel = {"kernel": "runtime", "vllm-kernel": "vllm"}.get(args.part)
    results = kernel_part(args, kernel) if kernel else engine_part(args, args.part)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
