"""Serving on a GPU: ``runtime serve`` against ``vllm serve`` on the same checkpoint and requests.

Usage: python3 benchmarks/serve_vs_vllm.py --model DIR --out DIR [--servers runtime vllm]
           [--concurrency 1 16 64 256] [--input-len 512] [--output-len 128] [--profile 64 256]
           [--runtime-args "..."] [--old-runtime PYTHONPATH]

Each server in turn (two 16 GB models do not share one GPU well): start it with its defaults
(plus ``--runtime-args``), warm it up, then at each concurrency send the same random prompts,
streaming, through ``runtime.bench`` (``runtime bench serve``'s client). At concurrency c it
sends max(32, 4 c) requests (1024 at 256). ``--profile`` levels are also sampled with py-spy for
``--profile-seconds`` in the middle of the run, every process of the server separately (the
engine core, each API process; the one process of ``runtime-old``), and the hottest frames
written to ``profile-<server>-c<C>.txt``. ``--old-runtime PATH`` adds ``runtime-old``: the same
command with PATH first on PYTHONPATH (an earlier build of this repository, for a before/after).

Writes ``serve-<server>.json`` per server and ``serve.md`` (the table with runtime / vLLM
ratios) to ``--out``. vLLM is started as ``python3 -m vllm.entrypoints.cli.main serve`` and must
be importable (see ``../shared/anchors/vllm.md``).
"""

from __future__ import annotations

import argparse
import collections
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from runtime.bench.datasets import load_tokenizer, random_requests
from runtime.bench.launch import LaunchedServer, free_port
from runtime.bench.report import markdown_table, save_json
from runtime.bench.serve import ServeConfig, run_serve, warm_up


def server_command(kind: str, model: str, port: int, extra: list[str]) -> list[str]:
    if kind == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--served-model-name", "model",
                "--host", "127.0.0.1", "--port", str(port), *extra]
    return [sys.executable, "-m", "runtime.cli", "serve", model, "--served-model-name", "model",
            "--host", "127.0.0.1", "--port", str(port), *extra]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue.extend(int(c) for c in (task / "children").read_text().split())
            except FileNotFoundError:
                pass
    return found


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return "gone"


def summarize_profile(raw: Path, top: int = 40) -> str:
    """Inclusive and self shares of the hottest frames in a py-spy raw (collapsed) profile."""
    inclusive, own, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "-- inclusive"]
    lines += [f"{100 * n / total:5.1f}% {f}" for f, n in inclusive.most_common(top)]
    lines += ["-- self"] + [f"{100 * n / total:5.1f}% {f}" for f, n in own.most_common(top // 2)]
    return "\n".join(lines) + "\n"


def profile(server_pid: int, seconds: float, delay: float, out: Path, label: str) -> threading.Thread:
    """After ``delay`` s, py-spy every process of the server (idle samples included) for ``seconds``."""
    def run() -> None:
        time.sleep(delay)
        jobs = []
        for pid in descendants(server_pid):
            name = process_name(pid)
            if name in ("gone",) or "resource_tracker" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                continue
            raw = out / f"profile-{label}-{name}-{pid}.raw"
            jobs.append((name, pid, raw, subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100", "--nonblocking",
                 "--format", "raw", "--idle", "--threads", "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        with open(out / f"profile-{label}.txt", "w") as f:
            for name, pid, raw, job in jobs:
                job.wait()
                f.write(f"==== {name} (pid {pid})\n")
                f.write(summarize_profile(raw) if raw.exists() else "py-spy wrote nothing\n")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--servers", nargs="+", default=["runtime", "vllm"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--profile", type=int, nargs="*", default=[], help="concurrency levels to sample with py-spy")
    parser.add_argument("--profile-seconds", type=float, default=5.0)
    parser.add_argument("--runtime-args", default="--device cuda",
                        help="`runtime serve` flags besides the model, one shell-quoted string")
    parser.add_argument("--vllm-args", default="", help="extra `vllm serve` flags, one shell-quoted string")
    parser.add_argument("--old-runtime", default=None, metavar="PYTHONPATH",
                        help="where an earlier build's packages are; adds the server runtime-old")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model)
    workloads = {c: random_requests(tokenizer, max(32, 4 * c), args.input_len, args.output_len, seed=c)
                 for c in args.concurrency}
    warm = random_requests(tokenizer, 1, args.input_len, args.output_len, seed=-1)
    results: dict[str, list[dict]] = {}
    for name in args.servers:
        kind = "vllm" if name == "vllm" else "runtime"
        port = free_port()
        extra = shlex.split(args.vllm_args if kind == "vllm" else args.runtime_args)
        env = dict(os.environ)
        if name == "runtime-old":
            env["PYTHONPATH"] = f"{args.old_runtime}:{env.get('PYTHONPATH', '')}"
        started = time.perf_counter()
        launched = LaunchedServer(server_command(kind, args.model, port, extra), port, args.out / f"{name}.log",
                                  timeout=600, env=env)
        with launched as server:
            print(f"{name}: ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            config = ServeConfig(base_url=server.url, model="model", progress=False)
            warm_up(warm, config)
            runs = []
            for concurrency, requests in workloads.items():
                watcher = None
                if concurrency in args.profile:
                    # Past the first wave's prefill, inside the run (about 8 s at C=64, 25 s at 256 on an H200).
                    delay = 2.0 if concurrency < 256 else 8.0
                    watcher = profile(server.proc.pid, args.profile_seconds, delay, args.out, f"{name}-c{concurrency}")
                run = run_serve(requests, ServeConfig(base_url=server.url, model="model", max_concurrency=concurrency,
                                                      progress=False))
                if watcher is not None:
                    watcher.join()
                print(f"{name} c={concurrency}: {run['completed']} ok, {run['failed']} failed, "
                      f"{run['output_throughput']:.0f} out tok/s, TTFT p50 {run['ttft_ms']['p50']:.0f} ms, "
                      f"TPOT p50 {run['tpot_ms']['p50']:.2f} ms", file=sys.stderr, flush=True)
                runs.append(run)
        results[name] = runs
        save_json({"server": name, "command": server_command(kind, args.model, port, extra), "runs": runs,
                   "settings": {k: str(v) for k, v in vars(args).items()}}, args.out / f"serve-{name}.json")
    table = comparison(results, args.concurrency)
    (args.out / "serve.md").write_text(table)
    print(table)


def comparison(results: dict[str, list[dict]], levels: list[int]) -> str:
    names = list(results)
    headers = ["C", "requests"] + [f"{n} out tok/s" for n in names]
    if "vllm" in results:
        headers += [f"{n} / vllm" for n in names if n != "vllm"]
    headers += [f"{n} TTFT p50 ms" for n in names] + [f"{n} TPOT p50 ms" for n in names]
    rows = []
    for i, level in enumerate(levels):
        runs = {n: results[n][i] for n in names}
        row = [level, runs[names[0]]["num_prompts"]] + [round(r["output_throughput"]) for r in runs.values()]
        if "vllm" in runs:
            row += [f"{runs[n]['output_throughput'] / runs['vllm']['output_throughput']:.2f}x" for n in names if n != "vllm"]
        row += [round(r["ttft_ms"]["p50"]) for r in runs.values()] + [round(r["tpot_ms"]["p50"], 2) for r in runs.values()]
        rows.append(row)
    return markdown_table(headers, rows) + "\n"


if __name__ == "__main__":
    main()
