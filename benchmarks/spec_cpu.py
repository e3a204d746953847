"""Speculative decoding on the CPU: the embedded model at batch 1, greedy, with and without
n-gram proposals, on copy-heavy chat prompts (repeat a paragraph, edit code) and on random
token prompts (nothing to copy: the overhead of proposing and verifying in vain).

Usage: .venv/bin/python benchmarks/spec_cpu.py [--tokens 128] [--k 4] [--repeats 1] [--cases NAME ...] [--json OUT.json]

Each prompt runs alone (batch 1) on one engine per setting, after a warm-up; decode tok/s is
the output tokens after the first over the time after the first (the first token's time, the
prompt's prefill, is the same with and without proposals and left out). With ``--repeats N``
the two settings run in turn N times and each rate is the median, so a machine whose load
changes during the run skews both alike.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from runtime import LLM, SamplingParams

PARAGRAPH = ("The old lighthouse stood on the northern cliff for two hundred years. Every night its keeper "
             "climbed the narrow stairs, lit the great lamp, and watched the ships pass safely through the dark "
             "and dangerous waters below. When the storms came in autumn, he stayed awake until dawn, writing in "
             "his logbook the name of every vessel that found its way home.")
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax


def average_price(items):
    if not items:
        return 0
    return total_price(items, 0) / len(items)
'''
COPY_TASKS = {
    "repeat paragraph": f"Repeat the following paragraph exactly.\n\n{PARAGRAPH}",
    "edit code": f"Rename the function total_price to order_total everywhere in this code and print the whole "
                 f"code again.\n\n{CODE}",
}


class WrongProposals:
    """Fills every room for proposals with token 0 (never accepted)."""

    def propose(self, out) -> None:
        for item in out.scheduled:
            if item.max_drafts:
                item.set_drafts([0] * item.max_drafts)


def decode_rate(llm: LLM, prompt, tokens: int) -> tuple[float, int]:
    """(decode tok/s after the first token, tokens generated) for one prompt alone."""
    def run(max_tokens: int):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=isinstance(prompt, dict))
        start = time.perf_counter()
        if isinstance(prompt, dict):
            out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        else:
            out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0].outputs[0]
        return time.perf_counter() - start, len(out.token_ids)

    first, _ = run(1)
    total, count = run(tokens)
    return (count - 1) / (total - first), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per setting; rates are medians")
    parser.add_argument("--cases", nargs="*", default=None, help="only the cases with these names")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = dict(COPY_TASKS)
    prompts["random tokens"] = {"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(64)]}
    config = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    # Three engines at once: a small KV cache each (one request at a time needs little).
    options = dict(max_model_len=1024, kv_cache_memory="256MiB")
    engines = {"plain": LLM(**options), "ngram": LLM(**options, speculative_config=config),
               "wrong": LLM(**options, speculative_config=config)}
    engines["wrong"].engine.proposer = WrongProposals()
    for llm in engines.values():
        decode_rate(llm, COPY_TASKS["repeat paragraph"], 8)  # warm-up
    rows = []
    cases = [(name, prompt, "ngram") for name, prompt in prompts.items()]
    cases.append(("every proposal wrong", COPY_TASKS["repeat paragraph"], "wrong"))
    cases = [case for case in cases if args.cases is None or case[0] in args.cases]
    for name, prompt, engine in cases:
        plain_rates, spec_rates = [], []
        before = engines[engine].engine.stats()
        for _ in range(args.repeats):
            rate, plain_count = decode_rate(engines["plain"], prompt, args.tokens)
            plain_rates.append(rate)
            rate, spec_count = decode_rate(engines[engine], prompt, args.tokens)
            spec_rates.append(rate)
        after = engines[engine].engine.stats()
        plain, spec = statistics.median(plain_rates), statistics.median(spec_rates)
        drafts = after.spec_num_drafts - before.spec_num_drafts
        proposed = after.spec_num_draft_tokens - before.spec_num_draft_tokens
        accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
        row = {"prompt": name, "tokens": spec_count, "same_length": spec_count == plain_count, "drafts": drafts,
               "plain_tok_s": round(plain, 2), "spec_tok_s": round(spec, 2), "speedup": round(spec / plain, 3),
               "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
               "mean_acceptance_length": round(1 + accepted / drafts, 2) if drafts else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"k": args.k, "config": config, "repeats": args.repeats, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
