"""Serving images on a GPU: ``runtime serve`` against ``vllm serve`` on a LLaVA-1.5-7B-shaped
model with made-up bf16 weights (``--load-format dummy`` in both), one 336 px image and 128 random
prompt tokens per request, 128 tokens out.

Usage: python3 benchmarks/vision_gpu.py write  --dir DIR        # config, tokenizer and processor
       python3 benchmarks/vision_gpu.py runtime --dir DIR --json OUT [--concurrency 16 64]
       python3 benchmarks/vision_gpu.py vllm    --dir DIR --json OUT
       python3 benchmarks/vision_gpu.py report  --out DIR       # the table of every OUT in DIR

Each request is a streaming chat completion whose user message holds a JPEG data: URI (its own
random image, so nothing hits the encoder cache) and the text; ``ignore_eos`` and ``min_tokens``
make every server generate 128 tokens. At concurrency c, max(32, 4 c) requests. Both servers
get ``--load-format dummy --max-model-len 2048 --max-num-batched-tokens 8192`` and otherwise their defaults. TTFT is the time
to the first chunk with content (the role-only chunk servers send first does not count);
throughput is generated tokens (the final usage) per second of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from runtime.bench.client import sse_lines
from runtime.bench.launch import LaunchedServer, free_port
from runtime.bench.metrics import percentile
from runtime.bench.report import markdown_table

VOCAB, IMAGE_TOKEN = 32064, 32000
TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
            "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n{% elif part['type'] == 'text' %}"
            "{{ part['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def write(path: Path) -> None:
    """LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px, 2-layer GELU projector, Llama-2-7B) as a
    config, a word-level tokenizer (``w0`` ... with ``<image>`` at 32000) and LLaVA's image
    processor; no weights (both servers make them up: ``--load-format dummy``)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                    bos_token_id=1, eos_token_id=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["<image>"] = vocab.pop(f"w{IMAGE_TOKEN}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1",
                                                     eos_token="w2", additional_special_tokens=["<image>"])
    tokenizer.chat_template = TEMPLATE
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                      image_mean=[0.481, 0.458, 0.408], image_std=[0.269, 0.261, 0.276])
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=TEMPLATE)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)


def requests(count: int, seed: int, prompt_len: int = 128) -> list[dict]:
    """Chat messages: a random 336x336 JPEG and ``prompt_len`` random words (one token each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        words = " ".join(f"w{i}" for i in rng.integers(3, IMAGE_TOKEN, prompt_len))
        uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                 {"type": "text", "text": words}]}])
    return out


async def one(client: httpx.AsyncClient, messages: list[dict], output_len: int) -> tuple[float | None, int]:
    """(TTFT in s or None on failure, generated tokens)."""
    body = {"model": "model", "messages": messages, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "min_tokens": output_len, "stream_options": {"include_usage": True}}
    start, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            print((await response.aread())[:300], file=sys.stderr)
            return None, 0
        async for line in sse_lines(response):
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if ttft is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                ttft = time.perf_counter() - start
            if chunk.get("usage") and not chunk.get("choices"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens


async def run(url: str, batch: list[list[dict]], concurrency: int, output_len: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def bounded(messages):
            async with limit:
                return await one(client, messages, output_len)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(m) for m in batch))
        duration = time.perf_counter() - start
    ttfts = [t * 1000 for t, _ in results if t is not None]
    tokens = sum(n for t, n in results if t is not None)
    return {"concurrency": concurrency, "requests": len(batch), "completed": len(ttfts), "duration_s": duration,
            "output_throughput": tokens / duration, "request_throughput": len(ttfts) / duration,
            "ttft_ms": {"p50": percentile(ttfts, 50), "p90": percentile(ttfts, 90), "p99": percentile(ttfts, 99)}}


def serve(kind: str, model: Path, levels: list[int], out: Path, output_len: int) -> None:
    port = free_port()
    if kind == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--dtype", "bfloat16",
               "--limit-mm-per-prompt", '{"image": 1}']
    else:
        cmd = [sys.executable, "-m", "runtime.cli", "serve", str(model), "--device", "cuda", "--limit-mm-per-prompt",
               '{"image": 1}']
    # One token budget for both (it is also each one's encoder budget: 14 images of 576 rows a step).
    cmd += ["--load-format", "dummy", "--served-model-name", "model", "--max-model-len", "2048", "--max-num-batched-tokens", "8192",
            "--host", "127.0.0.1", "--port", str(port)]
    results = []
    env = None
    if kind == "vllm":  # its LLaVA module needs transformers 4's Pixtral names: vllm_compat/sitecustomize.py
        compat = str(Path(__file__).parent / "vllm_compat")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [compat, os.environ.get("PYTHONPATH")]))}
    with LaunchedServer(cmd, port, out.with_suffix(".log"), timeout=900, env=env) as server:
        asyncio.run(run(server.url, requests(4, seed=1_000_000), 4, 16))  # warm-up
        for c in levels:
            result = asyncio.run(run(server.url, requests(max(32, 4 * c), seed=c), c, output_len))
            print(f"{kind} c={c}: {result['completed']}/{result['requests']} ok, {result['output_throughput']:.0f} "
                  f"out tok/s, TTFT p50 {result['ttft_ms']['p50']:.0f} ms", file=sys.stderr, flush=True)
            results.append(result)
    out.write_text(json.dumps({"server": kind, "command": cmd, "runs": results}, indent=1))


def report(directory: Path) -> str:
    found = {json.loads(p.read_text())["server"]: json.loads(p.read_text())["runs"] for p in sorted(directory.glob("*.json"))}
    rows = []
    for i, run_ in enumerate(found.get("runtime", [])):
        other = found.get("vllm", [None] * (i + 1))[i]
        rows.append([run_["concurrency"], round(run_["output_throughput"]),
                     round(other["output_throughput"]) if other else "-",
                     f"{run_['output_throughput'] / other['output_throughput']:.2f}x" if other else "-",
                     round(run_["ttft_ms"]["p50"]), round(other["ttft_ms"]["p50"]) if other else "-"])
    return markdown_table(["C", "runtime out tok/s", "vLLM out tok/s", "runtime / vLLM", "runtime TTFT p50 ms",
                           "vLLM TTFT p50 ms"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["write", "runtime", "vllm", "report"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llava7b"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    if args.part == "write":
        write(args.dir)
    elif args.part == "report":
        table = report(args.out)
        (args.out / "vision.md").write_text(table + "\n")
        print(table)
    else:
        serve(args.part, args.dir, args.concurrency, args.json, args.output_len)


if __name__ == "__main__":
    main()
