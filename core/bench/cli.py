"""``runtime bench throughput | latency | serve``: flags (vLLM's names where shared) and handlers.

Imported when the ``runtime`` parser is built, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional


def _add_dataset_args(parser: argparse.ArgumentParser, num_prompts: int, seed: bool) -> None:
    """The workload flags; ``seed`` adds --seed (the engine commands have the engine's, which
    seeds the workload too)."""
    from .datasets import DATASETS

    g = parser.add_argument_group("workload")
    g.add_argument("--dataset-name", default="random", choices=DATASETS,
                   help="random tokens, a ShareGPT JSON file, or many requests behind one shared prefix")
    g.add_argument("--dataset-path", default=None, help="the ShareGPT-format JSON file (sharegpt)")
    g.add_argument("--num-prompts", type=int, default=num_prompts)
    g.add_argument("--random-input-len", type=int, default=256,
                   help="prompt tokens (random); tokens after the shared prefix (prefix)")
    g.add_argument("--random-output-len", type=int, default=128, help="tokens to generate (random, prefix)")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths vary uniformly by this fraction either side (random)")
    g.add_argument("--prefix-len", type=int, default=512, help="tokens of the shared prefix (prefix)")
    g.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="force every output length (sharegpt; default: the reply's length)")
    if seed:
        g.add_argument("--seed", type=int, default=0, help="seed of the workload and of the arrival times")


def _requests(ns: argparse.Namespace, tokenizer: Any) -> list:
    from .datasets import make_requests

    return make_requests(ns.dataset_name, tokenizer, ns.num_prompts, input_len=ns.random_input_len,
                         output_len=ns.random_output_len, range_ratio=ns.random_range_ratio, prefix_len=ns.prefix_len,
                         dataset_path=ns.dataset_path, sharegpt_output_len=ns.sharegpt_output_len, seed=ns.seed)


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--output-json", default=None, metavar="FILE", help="also write the results to FILE as JSON")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bars")


def _engine(ns: argparse.Namespace, engine_args_from: Callable) -> Any:
    from ..engine.llm import LLM

    return LLM(**dataclasses.asdict(engine_args_from(ns)))


def _offline_text(result: dict[str, Any]) -> str:
    """``key value`` lines of an offline result, its speculative-decoding acceptance last."""
    from .report import key_values
    from .spec import acceptance_text

    text = key_values({k: v for k, v in result.items() if k != "spec_decode"})
    return text + "\n" + acceptance_text(result["spec_decode"]) if "spec_decode" in result else text


def _finish(ns: argparse.Namespace, result: dict[str, Any], text: str) -> int:
    from .report import save_json

    print(text)
    if ns.output_json:
        save_json(result, ns.output_json)
        print(f"results written to {ns.output_json}", file=sys.stderr)
    return 0


def _throughput(ns: argparse.Namespace, engine_args_from: Callable) -> int:
    from .offline import run_throughput

    llm = _engine(ns, engine_args_from)
    result = {"benchmark": "throughput", "dataset": ns.dataset_name,
              **run_throughput(llm, _requests(ns, llm.get_tokenizer()), progress=not ns.disable_tqdm)}
    return _finish(ns, result, _offline_text(result))


def _latency(ns: argparse.Namespace, engine_args_from: Callable) -> int:
    from .datasets import random_requests
    from .offline import latency_batches_needed, run_latency

    llm = _engine(ns, engine_args_from)
    count = latency_batches_needed(ns.num_iters, ns.num_iters_warmup)
    flat = random_requests(llm.get_tokenizer(), count * ns.batch_size, ns.input_len, ns.output_len, seed=ns.seed)
    batches = [flat[i * ns.batch_size:(i + 1) * ns.batch_size] for i in range(count)]
    result = {"benchmark": "latency", **run_latency(llm, batches, ns.output_len, ns.num_iters, ns.num_iters_warmup,
                                                    ns.percentiles, progress=not ns.disable_tqdm)}
    return _finish(ns, result, _offline_text(result))


def _serve(ns: argparse.Namespace) -> int:
    from .datasets import load_tokenizer, random_requests
    from .metrics import parse_slo
    from .report import load_of, serve_table
    from .serve import ServeConfig, run_serve, warm_up
    from .spec import acceptance_text

    base_url = (ns.base_url or f"http://{ns.host}:{ns.port}").rstrip("/")
    tokenizer_name = ns.tokenizer or (ns.model if ns.model and Path(ns.model).expanduser().exists() else None)
    tokenizer = load_tokenizer(tokenizer_name)
    requests = _requests(ns, tokenizer)
    config = ServeConfig(base_url=base_url, model=ns.model, endpoint=ns.endpoint, burstiness=ns.burstiness,
                         ignore_eos=ns.ignore_eos, temperature=ns.temperature, percentiles=ns.percentiles,
                         slo=parse_slo(ns.goodput), api_key=ns.api_key, timeout=ns.request_timeout, seed=ns.seed,
                         progress=not ns.disable_tqdm)
    if ns.num_warmups:
        # A prompt of its own, so no measured request finds its prefix cached by the warm-up.
        warm_up(random_requests(tokenizer, 1, 16, 16, seed=ns.seed + 1), config)
    runs = []
    for rate in ns.request_rate:
        for concurrency in ns.max_concurrency:
            run = dataclasses.replace(config, request_rate=rate, max_concurrency=concurrency)
            runs.append(run_serve(requests, run, keep_requests=ns.save_detailed))
    if ns.plot:
        from .plot import plot_serve

        plot_serve({runs[0]["model"]: runs}, ns.plot)
        print(f"chart written to {ns.plot}", file=sys.stderr)
    result = {"benchmark": "serve", "dataset": ns.dataset_name, "runs": runs}
    text = "\n".join([serve_table(runs)] + [acceptance_text(run["spec_decode"], load_of(run))
                                             for run in runs if "spec_decode" in run])
    return _finish(ns, result, text)


def _rate(value: str) -> float:
    rate = float(value)
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 (inf: all at once), got {value}")
    return rate


def _concurrency(value: str) -> Optional[int]:
    if value.lower() in ("none", "inf", "unbounded"):
        return None
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"max concurrency must be >= 1, got {value}")
    return number


def add_bench_commands(bench: argparse.ArgumentParser, add_engine_args: Callable,
                       engine_args_from: Callable) -> None:
    """Add ``throughput``, ``latency`` and ``serve`` under the ``bench`` parser; the engine flags
    come from ``runtime.cli`` so ``bench`` builds engines exactly as ``serve`` does."""
    sub = bench.add_subparsers(dest="bench_command", required=True)

    tp = sub.add_parser("throughput", help="offline: every request at once through the engine; requests and tokens/s")
    _add_dataset_args(tp, num_prompts=100, seed=False)
    _add_output_args(tp)
    add_engine_args(tp)
    tp.set_defaults(func=lambda ns: _throughput(ns, engine_args_from))

    lat = sub.add_parser("latency", help="offline: prefill, decode-step and end-to-end latency of one fixed batch")
    lat.add_argument("--batch-size", type=int, default=8)
    lat.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    lat.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    lat.add_argument("--num-iters", type=int, default=10)
    lat.add_argument("--num-iters-warmup", type=int, default=2)
    lat.add_argument("--percentiles", type=float, nargs="+", default=[50, 90, 99])
    _add_output_args(lat)
    add_engine_args(lat)
    lat.set_defaults(func=lambda ns: _latency(ns, engine_args_from))

    srv = sub.add_parser("serve", help="drive an OpenAI-compatible server (ours, vLLM, llama.cpp) and measure "
                                       "TTFT, TPOT, ITL, latency, throughput and goodput")
    g = srv.add_argument_group("server")
    g.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 (default: --host/--port)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", default="/v1/completions", help="the streaming completions path")
    g.add_argument("--model", default=None, help="served model name to request (default: the first in /v1/models)")
    g.add_argument("--tokenizer", default=None,
                   help="HF directory or .gguf whose tokenizer sizes the prompts (default: --model if it is a path, "
                        "else the embedded model)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    load = srv.add_argument_group("load (several values: one run per combination)")
    load.add_argument("--request-rate", type=_rate, nargs="+", default=[math.inf],
                      help="requests per second, released as a Poisson process (default inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the gaps between requests: 1 Poisson, < 1 burstier, > 1 more regular")
    load.add_argument("--max-concurrency", type=_concurrency, nargs="+", default=[None],
                      help="most requests in flight (default: unbounded)")
    req = srv.add_argument_group("requests")
    req.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="generate the full output length (sends ignore_eos and min_tokens)")
    req.add_argument("--temperature", type=float, default=0.0)
    req.add_argument("--num-warmups", type=int, default=1, choices=[0, 1], help="one unmeasured request first")
    met = srv.add_argument_group("metrics")
    met.add_argument("--percentiles", type=float, nargs="+", default=[50, 90, 99])
    met.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                     help="SLOs for goodput, e.g. ttft:500 tpot:50 (ttft, tpot, e2el in ms)")
    _add_dataset_args(srv, num_prompts=100, seed=True)
    _add_output_args(srv)
    srv.add_argument("--save-detailed", action="store_true", help="keep every request's timings in the JSON")
    srv.add_argument("--plot", default=None, metavar="FILE.png", help="chart latency percentiles against load")
    srv.set_defaults(func=_serve)
