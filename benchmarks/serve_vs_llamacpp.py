"""Serving: runtime against llama.cpp's server (llama-cpp-python) on the same GGUF and requests.

Usage: .venv/bin/python benchmarks/serve_vs_llamacpp.py [--concurrency 1 4 16 64] [--output-len 64]
           [--input-len 128] [--prompts-per-level 2] [--min-prompts 8] [--output-json F] [--plot F.png]
           [--runtime-args "--quantization int8"] [--threads N]

Starts ``runtime serve`` on the embedded SmolLM2 GGUF and ``python -m llama_cpp.server`` on the
same file with every core, and drives them in turn with the same random prompts at each
concurrency, streaming, through ``runtime.bench``: one server busy at a time, each level on both
back to back, since the machine is shared and its load drifts. At concurrency c it sends
max(min_prompts, prompts_per_level * c) requests. ``--threads`` gives both servers that many
compute threads (default: every core); on a machine other jobs load, fewer threads than cores
keep either server's threads from waiting on each other at every parallel step (measured on this
2-core machine at load average 8: 2 threads ran both 3-10x slower than 1). The load average at
the start and the end of the run is saved with the results. Prints a Markdown table of output tokens/s
and TTFT p50/p99 and their ratios; quote the ratios (absolute numbers move with the machine's
load). Tokens are counted off each stream; llama.cpp sends no usage, so a multi-byte
character's tokens, streamed as one chunk, count as one: the table shows the tokens counted
against those requested.

Needs ``pip install 'llama-cpp-python[server]'`` (it compiles llama.cpp: minutes).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

from runtime.bench.datasets import load_tokenizer, random_requests
from runtime.bench.launch import LaunchedServer, free_port
from runtime.bench.report import markdown_table, save_json
from runtime.bench.serve import ServeConfig, run_serve, warm_up
from runtime.loader.source import embedded_model_path


def runtime_server(gguf: Path, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", "serve", str(gguf), "--served-model-name", "model",
            "--host", "127.0.0.1", "--port", str(port), *extra]


def llamacpp_server(gguf: Path, port: int, n_ctx: int, threads: int) -> list[str]:
    # llama-cpp-python defaults to half the cores for generation; give it as many as runtime has.
    # By default a new request cuts the one streaming short; queueing them is what a benchmark needs.
    threads = str(threads)
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "model",
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
            "--n_threads", threads, "--n_threads_batch", threads, "--interrupt_requests", "False"]


def sweep(servers: dict[str, str], workloads: dict[int, list], warm: list) -> dict[str, list[dict]]:
    """Warm each server up with ``warm`` (a prompt no level reuses), then run every level on each
    server in turn, so both figures of a ratio come from the same minutes of a shared machine."""
    for url in servers.values():
        warm_up(warm, ServeConfig(base_url=url, model="model"))
    results: dict[str, list[dict]] = {name: [] for name in servers}
    for concurrency, requests in workloads.items():
        for name, url in servers.items():
            run = run_serve(requests, ServeConfig(base_url=url, model="model", max_concurrency=concurrency))
            run["requested_output_tokens"] = sum(r.output_len for r in requests)
            print(f"{name} c={concurrency}: {run['completed']} ok, {run['failed']} failed, "
                  f"{run['output_throughput']:.1f} out tok/s, TTFT p50 {run['ttft_ms']['p50']:.0f} ms", file=sys.stderr)
            results[name].append(run)
    return results


def compare(ours: list[dict], theirs: list[dict]) -> str:
    headers = ["concurrency", "requests", "tokens counted (runtime / llama.cpp)", "runtime out tok/s",
               "llama.cpp out tok/s", "tok/s ratio",
               "runtime TTFT p50 ms", "llama.cpp TTFT p50 ms", "TTFT p50 ratio",
               "runtime TTFT p99 ms", "llama.cpp TTFT p99 ms", "TTFT p99 ratio"]
    rows = []
    for a, b in zip(ours, theirs):
        counted = f"{a['total_output_tokens']} / {b['total_output_tokens']} of {a['requested_output_tokens']}"
        rows.append([a["max_concurrency"], a["num_prompts"], counted, a["output_throughput"], b["output_throughput"],
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
    parser.add_argument("--runtime-args", default="", metavar="ARGS",
                        help='extra `runtime serve` flags, one shell-quoted string, e.g. "--quantization int8"')
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="compute threads of each server (runtime: OMP_NUM_THREADS; default: every core)")
    args = parser.parse_args()
    load_before = os.getloadavg()

    gguf = embedded_model_path()
    tokenizer = load_tokenizer(str(gguf))
    workloads = {c: random_requests(tokenizer, max(args.min_prompts, args.prompts_per_level * c), args.input_len,
                                    args.output_len, seed=c) for c in args.concurrency}
    warm = random_requests(tokenizer, 1, args.input_len, args.output_len, seed=-1)
    logs = Path(tempfile.mkdtemp(prefix="serve-vs-llamacpp-"))
    ours_port, theirs_port = free_port(), free_port()
    n_ctx = 2 * (args.input_len + args.output_len) + 256
    # Both stay up (an idle server costs no CPU) and take turns, level by level.
    ours_command = runtime_server(gguf, ours_port, shlex.split(args.runtime_args))
    ours_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with LaunchedServer(ours_command, ours_port, logs / "runtime.log", env=ours_env) as ours_server, \
            LaunchedServer(llamacpp_server(gguf, theirs_port, n_ctx, args.threads), theirs_port, logs / "llama.cpp.log",
                           ready_path="/v1/models") as theirs_server:
        results = sweep({"runtime": ours_server.url, "llama.cpp": theirs_server.url}, workloads, warm)
    ours, theirs = results["runtime"], results["llama.cpp"]
    print(f"{args.input_len} prompt tokens, {args.output_len} output tokens per request; "
          "ratios: tok/s runtime / llama.cpp, TTFT llama.cpp / runtime (above 1: runtime ahead)\n")
    print(compare(ours, theirs))
    if args.output_json:
        save_json({"runtime": ours, "llama.cpp": theirs, "settings": vars(args),
                   "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()}}, args.output_json)
    if args.plot:
        from runtime.bench.plot import plot_serve

        plot_serve({"runtime": ours, "llama.cpp": theirs}, args.plot)


if __name__ == "__main__":
    main()
