"""The device's time for each kind of step of spec_gpu.py's copy-heavy run, on a GPU.

Usage: python3 benchmarks/spec_spans.py --setting none|ngram [--hf-dir /tmp/smollm2-bf16] [--batch 1 8]
                                        [--json OUT.json]

(One setting a process: an engine's memory is not all given back while the process lives.)
After two warm-up runs of each batch, one greedy run of 128 tokens with a CUDA event recorded
before and after every launch (``ModelRunner.launch`` and ``launch_chained``): the span between
them is the device's time for that step, from the moment the stream reached it (the end of the
step before, where the launch was queued behind it) to its end, so a step launched with the
device idle counts the host's preparation that the device waited for. By kind of step (prefill,
plain launched ahead, plain made after a read-back, verification made on the host, chained),
the count, mean and total span, the mean idle gap before it, and for chained steps the split into
the chain's graph before the verification, the verification graph and the graph after it
(``VerificationChain.step``). Then one more run under the torch profiler: kernels launched, their
total time and the 45 longest by name.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from spec_gpu import NGRAM, chat_prompts, output_lengths  # noqa: E402

from runtime.worker.verify_chain import VerificationChain  # noqa: E402


def _event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _kind(scheduled) -> str:
    if any(s.chained for s in scheduled):
        return "chained"
    if any(s.draft_token_ids for s in scheduled):
        return "verifying"
    if any(s.num_new_tokens > 1 for s in scheduled):
        return "prefill"
    return "plain ahead" if any(s.token_pending for s in scheduled) else "plain"


class SpanRecorder:
    """Events around every launch of ``runner`` and around the parts of each chained step."""

    def __init__(self, runner):
        self.runner = runner
        self.spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.parts: list[tuple[torch.cuda.Event, ...]] = []

    def __enter__(self) -> SpanRecorder:
        runner, launch, launch_chained = self.runner, self.runner.launch, self.runner.launch_chained
        spans, parts = self.spans, self.parts

        def timed(original, kind, out, *args, **kwargs):
            start = _event()
            pending = original(out, *args, **kwargs)
            spans.append((kind or _kind(out.scheduled), start, _event()))
            return pending

        runner.launch = functools.partial(timed, launch, None)
        runner.launch_chained = functools.partial(timed, launch_chained, "chained")
        step = VerificationChain.step

        def parted(chain, block_table):
            # The chain's three graphs, timed apart: the state is uploaded as step() does.
            state, prepare, finish = chain.current, chain.current.prepare, chain.current.finish
            events = []

            def prepare_timed():
                events.append(_event())
                prepare()
                events.append(_event())

            def finish_timed():
                events.append(_event())
                finish()
                events.append(_event())

            state.prepare, state.finish = prepare_timed, finish_timed
            try:
                return step(chain, block_table)
            finally:
                state.prepare, state.finish = prepare, finish
                parts.append(tuple(events))

        VerificationChain.step = parted
        self._restore = step
        return self

    def __exit__(self, *exc) -> None:
        del self.runner.launch, self.runner.launch_chained
        VerificationChain.step = self._restore

    def summary(self) -> dict:
        torch.cuda.synchronize()
        by_kind, gaps = collections.defaultdict(list), collections.defaultdict(list)
        previous_end = None
        for kind, start, end in self.spans:
            by_kind[kind].append(start.elapsed_time(end))
            if previous_end is not None:
                gaps[kind].append(previous_end.elapsed_time(start))
            previous_end = end
        row = {"span_ms": {k: {"steps": len(v), "mean": round(sum(v) / len(v), 4), "total": round(sum(v), 3)}
                           for k, v in by_kind.items()},
               "gap_before_ms": {k: round(sum(v) / len(v), 4) for k, v in gaps.items()}}
        if self.parts:
            # prepare's end to finish's start: the verification graph between them.
            row["chained_parts_ms"] = {
                name: round(sum(p[a].elapsed_time(p[b]) for p in self.parts) / len(self.parts), 4)
                for name, a, b in (("prepare", 0, 1), ("verification graph", 1, 2), ("finish", 2, 3))}
        return row


def kernel_profile(run) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return {"kernels": sum(e.count for e in kernels),
            "kernel_ms": round(sum(e.self_device_time_total for e in kernels) / 1e3, 3),
            "top_ms_and_count": {e.key[:90]: [round(e.self_device_time_total / 1e3, 3), e.count]
                                 for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:45]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["none", "ngram"], required=True)
    parser.add_argument("--hf-dir", type=Path, default=Path("/tmp/smollm2-bf16"),
                        help="the embedded model as HF bf16 (spec_gpu.py convert)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import transformers

    from runtime import LLM, SamplingParams
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    llm = LLM(str(args.hf_dir), device="cuda", dtype="bfloat16", max_model_len=2048,
              speculative_config=NGRAM if args.setting == "ngram" else None)
    generate = functools.partial(output_lengths, llm, SamplingParams)
    rows = []
    for batch in args.batch:
        prompts = chat_prompts(tokenizer, batch)
        run = functools.partial(generate, prompts, args.tokens)
        run()
        run()
        with SpanRecorder(llm.engine.runner) as recorder:
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        row = {"setting": args.setting, "batch": batch, "wall_ms": round(1e3 * wall, 2), **recorder.summary(),
               **kernel_profile(run)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
