"""Prefix caching: TTFT and throughput of many requests behind one long shared prompt, cache on and off.

Usage: .venv/bin/python benchmarks/prefix_caching.py [--prefix-len 1024] [--input-len 32] [--output-len 32]
           [--num-prompts 32] [--concurrency 4] [--output-json F]

Serves the embedded model with ``runtime serve --enable-prefix-caching``, then again with
``--no-enable-prefix-caching`` (one server at a time), and sends both the same ``prefix``
workload through ``runtime.bench``: every request is the shared ``prefix-len``-token prompt
followed by its own ``input-len`` tokens. Prints a Markdown table with the ratios to quote.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from runtime.bench.datasets import load_tokenizer, prefix_requests
from runtime.bench.launch import LaunchedServer, free_port
from runtime.bench.report import markdown_table, save_json
from runtime.bench.serve import ServeConfig, run_serve, warm_up
from runtime.loader.source import embedded_model_path


def run(flag: str, requests: list, warm: list, concurrency: int, logs: Path) -> dict:
    """Serve with ``flag``, warm up with a prompt that shares nothing with the workload, run it once."""
    port = free_port()
    cmd = [sys.executable, "-m", "runtime.cli", "serve", flag, "--served-model-name", "model",
           "--host", "127.0.0.1", "--port", str(port)]
    print(" ".join(cmd), file=sys.stderr)
    with LaunchedServer(cmd, port, logs / f"{flag.lstrip('-')}.log") as server:
        config = ServeConfig(base_url=server.url, model="model", max_concurrency=concurrency)
        warm_up(warm, config)
        return run_serve(requests, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    tokenizer = load_tokenizer(str(embedded_model_path()))
    requests = prefix_requests(tokenizer, args.num_prompts, args.prefix_len, args.input_len, args.output_len, seed=0)
    warm = prefix_requests(tokenizer, 1, args.prefix_len, args.input_len, args.output_len, seed=1)
    logs = Path(tempfile.mkdtemp(prefix="prefix-caching-"))
    on = run("--enable-prefix-caching", requests, warm, args.concurrency, logs)
    off = run("--no-enable-prefix-caching", requests, warm, args.concurrency, logs)
    headers = ["prefix caching", "requests", "out tok/s", "total tok/s", "TTFT p50 ms", "TTFT p99 ms", "E2EL p50 ms"]
    rows = [[name, r["completed"], r["output_throughput"], r["total_token_throughput"], r["ttft_ms"]["p50"],
             r["ttft_ms"]["p99"], r["e2el_ms"]["p50"]] for name, r in (("on", on), ("off", off))]
    rows.append(["on / off", "",
                 f"{on['output_throughput'] / off['output_throughput']:.2f}x",
                 f"{on['total_token_throughput'] / off['total_token_throughput']:.2f}x",
                 f"{on['ttft_ms']['p50'] / off['ttft_ms']['p50']:.2f}x",
                 f"{on['ttft_ms']['p99'] / off['ttft_ms']['p99']:.2f}x",
                 f"{on['e2el_ms']['p50'] / off['e2el_ms']['p50']:.2f}x"])
    print(f"shared prefix {args.prefix_len} tokens + {args.input_len} own tokens, {args.output_len} output tokens, "
          f"{args.num_prompts} requests at concurrency {args.concurrency}\n")
    print(markdown_table(headers, rows))
    if args.output_json:
        save_json({"on": on, "off": off, "settings": vars(args)}, args.output_json)


if __name__ == "__main__":
    main()
