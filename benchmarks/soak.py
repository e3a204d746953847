"""The long soak: ``runtime serve`` under a mixed, randomised load for N minutes (default 30).

    .venv/bin/python benchmarks/soak.py --minutes 30 --out soak-results

Starts ``runtime serve`` (the embedded model unless --model), runs ``runtime.bench.soak`` against
it (streamed and non-streamed completions and chats, random lengths, ``n``, logprobs and stop
strings; 10% of clients hang up mid-stream, 5% send invalid requests) and writes OUT/soak.json (the
figures: statuses, 5xx, greedy outputs that differ from the same request alone, KV-cache usage
idle and after, RSS of the server's processes and its slope after warm-up) and OUT/rss.csv (the
RSS samples). Exit status 1 if a guarantee broke (docs/reliability.md); greedy outputs that took
the runner-up of a near-tie are reported, not counted as broken.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from runtime.bench.launch import LaunchedServer, free_port
from runtime.bench.soak import SoakConfig, run_soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warm-up-minutes", type=float, default=3.0,
                        help="left out of the RSS slope (the embedded model's server grows for about 2.5)")
    parser.add_argument("--server-args", default="", help="more `runtime serve` flags, one string")
    parser.add_argument("--out", default="soak-results")
    ns = parser.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "runtime.cli", "serve", *([ns.model] if ns.model else []), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "soak", *shlex.split(ns.server_args)]
    with LaunchedServer(cmd, port, out / "server.log") as server:
        config = SoakConfig(server.url, "soak", duration_s=ns.minutes * 60, concurrency=ns.concurrency,
                            max_tokens=ns.max_tokens, warm_up_s=ns.warm_up_minutes * 60, server_pid=server.proc.pid)
        report = run_soak(config)
    figures = {"command": " ".join(sys.argv), "model": ns.model or "embedded SmolLM2-135M-Instruct",
               "concurrency": ns.concurrency, "max_tokens": ns.max_tokens, **report.figures()}
    (out / "soak.json").write_text(json.dumps(figures, indent=1) + "\n")
    (out / "rss.csv").write_text("seconds,rss_bytes\n" + "".join(f"{t:.1f},{b}\n" for t, b in report.rss))
    print(json.dumps(figures, indent=1))
    broken = (report.failures or report.mismatches or figures["server_errors_5xx"]
              or report.kv_usage_after != report.kv_usage_idle)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
