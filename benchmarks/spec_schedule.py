"""Which kinds of step the n-gram engine runs on spec_gpu.py's copy-heavy prompts, on the CPU.

Usage: .venv/bin/python benchmarks/spec_schedule.py [--batch 8] [--tokens 128] [--hf-dir DIR]
                                                   [--step-ms plain_ahead=1.14 chained=1.375 ...] [--json OUT.json]
                                                   [--explain]

The embedded model (converted to an HF float32 directory, ``--hf-dir``, the first time) runs on
tests/test_decode_graphs.py's replay platform, so the engine schedules as a CUDA engine does:
decode and verification graphs, look-ahead, verifications chained on the device. Greedy, EOS
ignored, the chat prompts of spec_gpu.py at ``--batch``: with chained verifications and without
(the host path), every forward pass is classed (prefill, plain launched ahead, plain made after a
read-back, verification made on the host, chained) and the two runs' tokens compared; with
``--explain`` the chained run also counts why steps were not chained. Priced
with ``--step-ms`` (a GPU's step times by kind: the defaults are an H100's for this model at batch
8, docs/speculative.md), the sum estimates the decode time; the ratio against ``plain_ahead`` for
every token estimates the speed-up. The sequence of kinds is printed too (P, a, s, V, c).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

import transformers  # noqa: E402
from spec_gpu import NGRAM, chat_prompts, convert  # noqa: E402
from test_decode_graphs import _registry  # noqa: E402

from runtime.engine.args import EngineArgs  # noqa: E402
from runtime.engine.core import EngineCore  # noqa: E402
from runtime.sample.params import SamplingParams  # noqa: E402

KINDS = {"prefill": "P", "plain_ahead": "a", "plain": "s", "verifying": "V", "chained": "c"}
STEP_MS = {"plain_ahead": 1.14, "plain": 1.6, "verifying": 1.7, "chained": 1.375}


def classed_run(hf_dir: Path, prompts: list[list[int]], tokens: int, chains: bool,
                unchained: collections.Counter | None = None) -> tuple[list[str], dict]:
    """Every forward pass's kind, in order, and each request's tokens; ``unchained`` counts why a
    step that could have been chained was not (the engine's rule, the runner, the scheduler)."""
    engine = EngineCore(EngineArgs(model=str(hf_dir), device="replay_cpu", max_model_len=2048, kv_cache_memory="256MiB",
                                   speculative_config=NGRAM), registry=_registry())
    engine.chains_verification = engine.chains_verification and chains
    kinds: list[str] = []
    launch, launch_chained = engine._launch, engine.runner.launch_chained
    if unchained is not None:
        proposing, reach, chain = engine._proposing, engine.runner.chain_reach, engine.scheduler.chain

        def counted_proposing(out):
            likely = proposing(out)
            unchained["nothing likely to propose"] += not likely
            return likely

        def counted_reach(out, previous):
            found = reach(out, previous)
            unchained["the runner (sampling, size, history)"] += found is None
            return found

        def counted_chain(out, within):
            scheduler = engine.scheduler
            joining_or_leaving = bool(scheduler._waiting or scheduler._finished_ids
                                      or len(out.scheduled) != len(scheduler._running))
            following = chain(out, within)
            if following is None:
                unchained["requests joining or leaving" if joining_or_leaving else "the scheduler (reach, blocks)"] += 1
            return following

        engine._proposing, engine.runner.chain_reach, engine.scheduler.chain = counted_proposing, counted_reach, counted_chain

    def classed(out, previous=None):
        kinds.append("verifying" if any(s.draft_token_ids for s in out.scheduled)
                     else "prefill" if any(s.num_new_tokens > 1 for s in out.scheduled)
                     else "plain_ahead" if previous is not None else "plain")
        return launch(out, previous)

    def chained(out, previous):
        kinds.append("chained")
        return launch_chained(out, previous)

    engine._launch, engine.runner.launch_chained = classed, chained
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    return kinds, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hf-dir", type=Path, default=Path("/tmp/smollm2-f32"))
    parser.add_argument("--gguf", type=Path, help="the embedded model's GGUF file, where its package is not installed")
    parser.add_argument("--step-ms", nargs="*", default=[], metavar="KIND=MS",
                        help=f"step times by kind (defaults {STEP_MS})")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--explain", action="store_true", help="also count why steps were not chained")
    args = parser.parse_args()
    step_ms = STEP_MS | {kind: float(ms) for kind, _, ms in (item.partition("=") for item in args.step_ms)}
    if not (args.hf_dir / "config.json").exists():
        convert(argparse.Namespace(gguf=args.gguf, hf_dir=args.hf_dir, dtype="float32"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    prompts = chat_prompts(tokenizer, args.batch)
    rows, outputs = [], {}
    for label, chains in (("chained", True), ("host path", False)):
        unchained = collections.Counter() if args.explain and chains else None
        kinds, outputs[label] = classed_run(args.hf_dir, prompts, args.tokens, chains, unchained)
        decode = [kind for kind in kinds if kind != "prefill"]
        estimate = sum(step_ms[kind] for kind in decode)
        row = {"setting": label, "batch": args.batch, "passes": collections.Counter(kinds),
               "estimated_decode_ms": round(estimate, 1),
               "estimated_speedup": round(step_ms["plain_ahead"] * (args.tokens - 1) / estimate, 3),
               "sequence": "".join(KINDS[kind] for kind in kinds)}
        if unchained is not None:
            row["not_chained"] = {reason: count for reason, count in unchained.items() if count}
        print(json.dumps(row), flush=True)
        rows.append(row)
    same = outputs["chained"] == outputs["host path"]
    print(json.dumps({"same_tokens": same}))
    if args.json:
        args.json.write_text(json.dumps(rows + [{"same_tokens": same, "step_ms": step_ms}], indent=1))
    if not same:
        sys.exit("the chained engine's tokens differ from the host path's")


if __name__ == "__main__":
    main()
