"""Serving: runtime against llama.cpp's server (llama-cpp-python) on the same GGUF and requests.

Usage: .venv/bin/python benchmarks/serve_vs_llamacpp.py [--concurrency 1 4 16 64] [--output-len 64]
           [--input-len 128] [--prompts-per-level 2] [--min-prompts 8] [--output-json F] [--plot F.png]

Starts ``runtime serve`` on the embedded SmolLM2 GGUF, then (after stopping it: one server at a
time on a shared machine) ``python -m llama_cpp.server`` on the same file with every core, and
drives each with the same random prompts at each concurrency, streaming, through
``runtime.bench``. At concurrency c it sends max(min_prompts, prompts_per_level * c) requests.
Prints a Markdown table of output tokens/s and TTFT p50/p99 and their ratios; quote the ratios
(absolute numbers move with the machine's load).

Needs ``pip install 'llama-cpp-python[server]'`` (it compiles llama.cpp: minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from runtime.bench.datasets import load_tokenizer, random_requests
from runtime.bench.launch import LaunchedServer, free_port
from runtime.bench.report import markdown_table, save_json
from runtime.bench.serve import ServeConfig, run_serve, warm_up
from runtime.loader.source import embedded_model_path


def runtime_server(gguf: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", "serve", str(gguf), "--served-model-name", "model",
            "--host", "127.0.0.1", "--port", str(port)]


def llamacpp_server(gguf: Path, port: int, n_ctx: int) -> list[str]:
    # llama-cpp-python defaults to half the cores for generation; give it all of them, as runtime has.
    threads = str(os.cpu_count() or 1)
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "model",
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
            "--n_threads", threads, "--n_threads_batch", threads]


def sweep(name: str, cmd: list[str], port: int, ready_path: str, workloads: dict[int, list], warm: list,
          logs: Path) -> list[dict]:
    """Start one server, warm it up with ``warm`` (a prompt no level reuses), run every level, stop it."""
    print(f"{name}: {' '.join(cmd)}", file=sys.stderr)
    runs = []
    with LaunchedServer(cmd, port, logs / f"{name}.log", ready_path=ready_path) as server:
        config = ServeConfig(base_url=server.url, model="model")
        warm_up(warm, config)
        for concurrency, requests in workloads.items():
            run = run_serve(requests, dataclasses.replace(config, max_concurrency=concurrency))
            print(f"{name} c={concurrency}: {run['completed']} ok, {run['failed']} failed, "
                  f"{run['output_throughput']:.1f} out tok/s, TTFT p50 {run['ttft_ms']['p50']:.0f} ms", file=sys.stderr)
            runs.append(run)
    return runs


def compare(ours: list[dict], theirs: list[dict]) -> str:
    headers = ["concurrency", "requests", "runtime out tok/s", "llama.cpp out tok/s", "tok/s ratio",
               "runtime TTFT p50 ms", "llama.cpp TTFT p50 ms", "TTFT p50 ratio",
               "runtime TTFT p99 ms", "llama.cpp TTFT p99 ms", "TTFT p99 ratio"]
    rows = []
    for a, b in zip(ours, theirs):
        rows.append([a["max_concurrency"], a["num_prompts"], a["output_throughput"], b["output_throughput"],
                     f"{a['output_throughput'] / b['output_throughput']:.2f}x",
                     a["ttft_ms"]["p50"], b["ttft_ms"]["p50"], f"{b['ttft_ms']['p50'] / a['ttft_ms']['p50']:.2f}x",
                     a["ttft_ms"]["p99"], b["ttft_ms"]["p99"], f"{b['ttft_ms']['p99'] / a['ttft_ms']['p99']:.2f}x"])
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompts-per-level", type=int, default=2, help="requests per unit of concurrency")
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--plot", default=None, metavar="FILE.png")
    args = parser.parse_args()

    gguf = embedded_model_path()
    tokenizer = load_tokenizer(str(gguf))
    workloads = {c: random_requests(tokenizer, max(args.min_prompts, args.prompts_per_level * c), args.input_len,
                                    args.output_len, seed=c) for c in args.concurrency}
    warm = random_requests(tokenizer, 1, args.input_len, args.output_len, seed=-1)
    logs = Path(tempfile.mkdtemp(prefix="serve-vs-llamacpp-"))
    port = free_port()
    ours = sweep("runtime", runtime_server(gguf, port), port, "/health", workloads, warm, logs)
    theirs = sweep("llama.cpp", llamacpp_server(gguf, port, 2 * (args.input_len + args.output_len) + 256), port,
                   "/v1/models", workloads, warm, logs)
    print(f"{args.input_len} prompt tokens, {args.output_len} output tokens per request; "
          "ratios: tok/s runtime / llama.cpp, TTFT llama.cpp / runtime (above 1: runtime ahead)\n")
    print(compare(ours, theirs))
    if args.output_json:
        save_json({"runtime": ours, "llama.cpp": theirs, "settings": vars(args)}, args.output_json)
    if args.plot:
        from runtime.bench.plot import plot_serve

        plot_serve({"runtime": ours, "llama.cpp": theirs}, args.plot)


if __name__ == "__main__":
    main()
