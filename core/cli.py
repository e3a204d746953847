"""The ``runtime`` command: ``serve``, ``generate``, ``bench`` and ``plugins``.

Errors are one line on stderr and exit status 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
import time
from typing import Optional, Sequence

from .engine.args import EngineArgs
from .reasoning import REASONING_PARSERS


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags (vLLM's names), shared by every command that builds an engine."""
    d = EngineArgs()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF-layout directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"],
                   help="auto: the model's weights; dummy: made-up weights of the architecture in the directory's "
                        "config.json (benchmarks: only config.json and a tokenizer are read)")
    g.add_argument("--device", default=d.device, help="platform name, or auto (see `runtime plugins`)")
    g.add_argument("--dtype", default=d.dtype, help="auto, float32, bfloat16 or float16")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="most sequences in one step (default: the platform's, cpu 64, cuda 512)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV-cache block")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d.enable_prefix_caching)
    g.add_argument("--kv-cache-memory", default=None, help="KV-cache size: bytes or e.g. 4GiB (default: the platform's choice)")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, help="auto, fp8 (e4m3) or fp8_e5m2")
    g.add_argument("--quantization", "-q", default=None,
                   help="the checkpoint's format, kept packed (gptq, awq, compressed-tensors, fp8, gguf), a method "
                        "that quantizes dense weights at load (fp8 on cuda, int8 on cpu), or none (dequantize "
                        "everything); default: the checkpoint's format (docs/quantization.md)")
    g.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=["fcfs", "priority"])
    g.add_argument("--kv-offloading-size", type=float, default=None,
                   help="GiB of host memory for KV blocks evicted from the device's prefix cache (and swapped "
                        "requests), all ranks together; a no-op where host and device share memory (docs/kv-offload.md)")
    g.add_argument("--preemption-mode", default=d.preemption_mode, choices=["recompute", "swap", "auto"],
                   help="a preempted request's KV: recomputed on resume, swapped to host memory (needs "
                        "--kv-offloading-size), or auto: swap where copying is cheaper than recomputing")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--enforce-eager", action="store_true", help="no decode graphs (cuda): every step runs eagerly")
    g.add_argument("--deterministic", action="store_true",
                   help="batch-invariant kernels: a request's tokens and logprobs do not depend on what else is in "
                        "the batch (seeded sampling reproducible on a busy server; slower, docs/api.md#deterministic-mode)")
    g.add_argument("--chat-template", default=None, help="chat template file or text (default: the model's)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                   help="split every layer across this many ranks, one device each")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="mixture-of-experts models: give each tensor-parallel rank whole experts (a share of them) "
                        "instead of a slice of every expert")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=d.pipeline_parallel_size,
                   help="split the layers into this many stages, each on its own ranks (x --tensor-parallel-size)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=d.data_parallel_size,
                   help="engine cores, each with its own copy of the model, behind one server (runtime serve)")
    g.add_argument("--distributed-executor-backend", default=None, choices=["mp", "ray"],
                   help="how ranks beyond the first run: worker processes on this machine (mp, the default) or Ray")
    g.add_argument("--distributed-timeout", type=float, default=d.distributed_timeout,
                   help="seconds a collective may wait for a rank before the engine fails, naming it")
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (docs/lora.md)")
    g.add_argument("--max-loras", type=int, default=d.max_loras, help="distinct adapters in one step")
    g.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank, choices=[8, 16, 32, 64, 128, 256],
                   help="the largest adapter rank accepted")
    g.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept loaded on the host (default --max-loras)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, as vLLM\'s flag: e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                        "(docs/speculative.md)")
    g.add_argument("--task", default=d.task, choices=["generate", "embed"],
                   help="embed: serve the model as an embedder, POST /v1/embeddings (docs/embeddings.md)")
    g.add_argument("--runner", default=None, choices=["generate", "pooling"],
                   help="vLLM's name for the same choice: pooling is --task embed")
    g.add_argument("--pooler-config", default=None, metavar="JSON",
                   help='task embed: \'{"pooling_type": "LAST"|"MEAN"|"CLS", "use_activation": true|false}\' (normalize '
                        "or not) over the checkpoint's sentence-transformers settings (default: LAST, normalized)")
    g.add_argument("--limit-mm-per-prompt", default=None, metavar="JSON",
                   help='vision-language models: images one prompt may hold, e.g. \'{"image": 2}\' (default 4; '
                        "docs/multimodal.md)")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="directory whose image files chat requests may name as file:// URLs (default: none)")
    g.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http(s):// image URLs named in chat requests (off: only data: URIs and local files)")
    g.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="the model's thinking format: the server returns the thinking as reasoning_content "
                        "(docs/api.md#reasoning-output)")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    values = {name: getattr(ns, name) for name in EngineArgs.field_names() if hasattr(ns, name)}
    return EngineArgs(**values)


def _generate(ns: argparse.Namespace) -> int:
    from .engine.llm import LLM
    from .sample.params import SamplingParams

    prompts = list(ns.prompts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: pass prompts as arguments or one per line on stdin")
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            seed=ns.sample_seed, ignore_eos=ns.ignore_eos)
    llm = LLM(**dataclasses.asdict(engine_args_from(ns)))
    start = time.perf_counter()
    if ns.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(out.outputs[0].text, flush=True)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"[{len(outputs)} prompts, {generated} tokens in {elapsed:.2f} s: {generated / elapsed:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def _serve(ns: argparse.Namespace) -> int:
    from .api.server import serve

    args = engine_args_from(ns)
    if ns.model_tag is not None:
        if ns.model is not None and ns.model != ns.model_tag:
            raise ValueError(f"two models given: {ns.model_tag!r} and --model {ns.model!r}; give one")
        args = dataclasses.replace(args, model=ns.model_tag)
    if ns.served_model_names:
        args = dataclasses.replace(args, served_model_name=ns.served_model_names[0])
    # The key comes from the flag or the environment and is never printed or logged.
    api_key = ns.api_key or os.environ.get("RUNTIME_API_KEY") or None
    from .api.lora_modules import parse_lora_modules

    return serve(args, host=ns.host, port=ns.port, model_names=ns.served_model_names, api_key=api_key,
                 max_queue_len=ns.max_queue_len, shutdown_timeout=ns.shutdown_timeout, log_level=ns.log_level,
                 api_server_count=ns.api_server_count, lora_modules=parse_lora_modules(ns.lora_modules or []),
                 allow_runtime_lora_updating=ns.allow_runtime_lora_updating, tool_call_parser=ns.tool_call_parser,
                 enable_auto_tool_choice=ns.enable_auto_tool_choice, max_request_body_bytes=ns.max_request_body_bytes,
                 lora_allowed_dirs=ns.lora_allowed_dirs or [])


def _plugins(ns: argparse.Namespace) -> int:
    from .platform import CONTRACT_VERSION, get_registry
    from .release import version_report

    print("\n".join(version_report()))
    print(f"plugin contract {CONTRACT_VERSION} (a plugin declaring another range is skipped, with the reason below)")
    registry = get_registry()
    if not registry.statuses:
        print("no runtime plugins installed: pip install runtime[cpu]")
        return 1
    for status in registry.statuses:
        state = "loaded" if status.loaded else "skipped"
        detail = ", ".join(status.provides) if status.loaded else status.reason
        print(f"{status.name:10} {status.distribution} {status.version:10} {state:8} {detail}")
    for name, cls in sorted(registry.platforms.items()):
        reason = cls.unavailable_reason()
        backends = ", ".join(b.name for b in registry.attention_backends(name)) or "none"
        print(f"platform {name}: {'available' if reason is None else 'unavailable: ' + reason}; "
              f"priority {cls.priority}; attention: {backends}")
        if reason is None:
            ops = registry.kernels(name).sources
            print("  kernels: " + ", ".join(f"{op}={src}" for op, src in ops.items()))
            methods = sorted({m.name for m in registry.quantization_methods(name)})
            print("  quantization: " + (", ".join(methods) or "none"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .api.limits import MAX_BODY_BYTES
    from .tools import TOOL_CALL_PARSERS

    parser = argparse.ArgumentParser(prog="runtime", description="LLM inference and serving engine")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline for prompts from arguments or stdin")
    gen.add_argument("prompts", nargs="*", help="prompts (default: one per line on stdin)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible API (Litestar on uvicorn)")
    srv.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                     help="HF-layout directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for every interface")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", nargs="+", default=None, dest="served_model_names",
                     help="names clients use for the model; the first is reported (default: MODEL)")
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: $RUNTIME_API_KEY)")
    srv.add_argument("--max-queue-len", type=int, default=1024,
                     help="requests waiting for their first token before new ones get 503 with Retry-After")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds in-flight requests may run after SIGTERM before they are aborted")
    srv.add_argument("--api-server-count", type=int, default=1,
                     help="API server processes (HTTP, tokenizing, detokenizing) in front of the one engine core, "
                          "sharing the port")
    srv.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                     help="LoRA adapters to serve (needs --enable-lora): name=path or "
                          "'{\"name\": ..., \"path\": ...}'; clients name one in `model`")
    srv.add_argument("--allow-runtime-lora-updating", action="store_true",
                     help="add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (loads server-side paths)")
    srv.add_argument("--lora-allowed-dirs", nargs="+", default=None, metavar="DIR",
                     help="/v1/load_lora_adapter loads only adapters under these directories (others: 403)")
    srv.add_argument("--max-request-body-bytes", type=int, default=MAX_BODY_BYTES,
                     help="larger request bodies get 413 (default 64 MiB)")
    srv.add_argument("--enable-auto-tool-choice", action="store_true",
                     help='let the model decide to call tools (tool_choice "auto", the default with tools); '
                          "needs --tool-call-parser")
    srv.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_CALL_PARSERS),
                     help="the format the model writes tool calls in (docs/api.md#tool-calling)")
    add_engine_args(srv)
    srv.set_defaults(func=_serve)

    from .bench.cli import add_bench_commands

    bench = sub.add_parser("bench", help="benchmark offline throughput or latency, or an OpenAI-compatible server")
    add_bench_commands(bench, add_engine_args, engine_args_from)

    plugins = sub.add_parser("plugins", help="list platform plugins, their status, backends and kernels")
    plugins.set_defaults(func=_plugins)
    # runtime-conformance is a separate distribution; its subcommand exists where it is installed.
    if importlib.util.find_spec("runtime_conformance"):
        importlib.import_module("runtime_conformance.cli").add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"runtime {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"runtime {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
