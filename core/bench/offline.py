"""Offline benchmarks of the engine itself (``LLM``), no server in between.

- throughput: every request submitted at once, as ``LLM.generate`` batches them; requests
  and tokens per second of wall time.
- latency: one fixed batch, run repeatedly: prefill latency (generate one token), end-to-end
  latency (generate ``output_len`` tokens) and the decode step time derived from the two.

With speculative decoding configured, both results also hold ``spec_decode``: the drafts and
acceptance of the measured runs, from the engine's counters (``runtime.bench.spec``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from .datasets import BenchRequest
from .metrics import percentile
from .spec import acceptance, engine_counters


def _params(max_tokens: int) -> Any:
    from ..sample.params import SamplingParams

    # EOS is ignored so every request generates exactly the tokens asked for, as in vLLM's benchmarks.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_throughput(llm: Any, requests: Sequence[BenchRequest], progress: bool = True) -> dict[str, Any]:
    """Generate for every request at once; returns counts and throughputs."""
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [_params(r.output_len) for r in requests]
    counters_before = engine_counters(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - start
    input_tokens = sum(len(r.prompt_token_ids) for r in requests)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return _with_spec({
        "elapsed_s": elapsed,
        "num_requests": len(requests),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(requests) / elapsed,
        "output_throughput": output_tokens / elapsed,
        "total_token_throughput": (input_tokens + output_tokens) / elapsed,
    }, counters_before, llm)


def _with_spec(result: dict[str, Any], counters_before: Any, llm: Any) -> dict[str, Any]:
    """``result`` plus ``spec_decode``, the drafts and acceptance since ``counters_before``,
    where the engine speculates."""
    spec = acceptance(counters_before, engine_counters(llm))
    return result if spec is None else {**result, "spec_decode": spec}


def _timed(llm: Any, batch: Sequence[BenchRequest], max_tokens: int) -> float:
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in batch]
    start = time.perf_counter()
    llm.generate(prompts, _params(max_tokens), use_tqdm=False)
    return time.perf_counter() - start


def latency_batches_needed(iters: int, warmup: int) -> int:
    """How many distinct batches :func:`run_latency` uses."""
    return warmup + 2 * iters


def run_latency(llm: Any, batches: Sequence[Sequence[BenchRequest]], output_len: int, iters: int = 10,
                warmup: int = 2, percentiles: Sequence[float] = (50, 90, 99), progress: bool = True) -> dict[str, Any]:
    """Time a batch ``iters`` times (after ``warmup`` untimed runs): prefill and end-to-end
    latency percentiles in ms, and the decode step time ``(e2e - prefill) / (output_len - 1)``.

    Every run takes its own batch from ``batches`` (``latency_batches_needed`` of them, all the
    same shape) so no run finds its prompt in the prefix cache.
    """
    if output_len < 2:
        raise ValueError(f"output length must be >= 2 to separate prefill from decode, got {output_len}")
    if len(batches) < latency_batches_needed(iters, warmup):
        raise ValueError(f"{len(batches)} batches for {latency_batches_needed(iters, warmup)} runs")
    fresh = iter(batches)
    for _ in tqdm(range(warmup), desc="Warm-up", disable=not progress, leave=False):
        _timed(llm, next(fresh), output_len)
    counters_before = engine_counters(llm)
    prefill, e2e = [], []
    for _ in tqdm(range(iters), desc="Iterations", disable=not progress):
        prefill.append(_timed(llm, next(fresh), 1))
        e2e.append(_timed(llm, next(fresh), output_len))
    decode = [(total - first) / (output_len - 1) for first, total in zip(prefill, e2e)]

    def ms(values: list[float]) -> dict[str, float]:
        out = {"mean": statistics.fmean(values) * 1000}
        out.update({f"p{q:g}": percentile(values, q) * 1000 for q in percentiles})
        return out

    batch = batches[0]
    return _with_spec({
        "batch_size": len(batch),
        "input_len": statistics.fmean(len(r.prompt_token_ids) for r in batch),
        "output_len": output_len,
        "iterations": iters,
        "prefill_latency_ms": ms(prefill),
        "decode_step_latency_ms": ms(decode),
        "e2e_latency_ms": ms(e2e),
        "decode_throughput": len(batch) / statistics.median(decode),
    }, counters_before, llm)
