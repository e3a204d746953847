"""The cost of --deterministic: batch-1 decode and an offline batch, with the mode off and on, in one run.

Both engines load the same model on the same device; each workload runs on one then the other,
alternating, and the table gives tokens/s and the on/off ratio. ``--check`` also runs the issue's
acceptance test on the model: 20 seeded sampled and 20 greedy requests, alone and mixed among 40
random others arriving at random steps (chunked prefill, prefix caching), and counts the
requests whose tokens and logprobs are bitwise identical, with the mode on and off.

    .venv/bin/python benchmarks/deterministic_cost.py                       # CPU, embedded model
    .venv/bin/python benchmarks/deterministic_cost.py --model DIR --dtype bfloat16 \\
        --offline 1000 512 128                                               # GPU (Llama-3-8B shape)
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

from runtime import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from determinism import mixed_jobs, run_schedule, targets  # noqa: E402


def timed(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    """Output tokens per second of one ``generate`` over ``prompts`` (token ids), ``new_tokens`` each."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.engine.platform.synchronize()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.platform.synchronize()
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)


def identical(llm: LLM, vocab: int) -> int:
    """Requests of the 20 + 20 whose tokens and logprobs are the same alone and mixed."""
    core = llm.engine
    rng = random.Random(0)
    target_jobs = targets(rng, vocab, sampled=20, greedy=20, max_tokens=16)
    alone = {rid: run_schedule(core, [(0, rid, prompt, params)])[rid] for _, rid, prompt, params in target_jobs}
    mixed = run_schedule(core, mixed_jobs(rng, vocab, target_jobs, others=40, last_step=20))
    return sum(mixed[rid] == alone[rid] for rid in alone)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: made-up weights (--model needs only config.json and a tokenizer)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens of the batch-1 decode")
    parser.add_argument("--offline", type=int, nargs=3, default=[32, 128, 32], metavar=("N", "IN", "OUT"),
                        help="offline workload: N prompts of IN random tokens, OUT new tokens each")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--check", action="store_true", help="also count bitwise-identical requests (20 + 20)")
    args = parser.parse_args()
    engines = {}
    for mode in (False, True):
        engines[mode] = LLM(args.model, dtype=args.dtype, load_format=args.load_format, deterministic=mode,
                            max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory)
    vocab = min(engines[False].engine.runner.settings.vocab_size, 30000)
    rng = random.Random(1)
    n, prompt_len, new_tokens = args.offline
    offline = [[rng.randrange(10, vocab) for _ in range(prompt_len)] for _ in range(n)]
    single = [[rng.randrange(10, vocab) for _ in range(32)]]
    for llm in engines.values():
        timed(llm, single, 4)  # warm-up: first-call allocations, graph capture, Triton compiles
    rows = []
    for name, prompts, tokens in (("batch-1 decode", single, args.decode_tokens),
                                  (f"offline {n} x ({prompt_len}, {new_tokens})", offline, new_tokens)):
        rates = {mode: timed(llm, prompts, tokens) for mode, llm in engines.items()}
        rows.append({"workload": name, "default_tok_s": rates[False], "deterministic_tok_s": rates[True],
                     "ratio": rates[True] / rates[False]})
    if args.check:
        for mode, llm in engines.items():
            rows.append({"workload": f"identical of 40, deterministic={mode}", "count": identical(llm, vocab)})
    device = engines[False].engine.platform.device_name()
    del engines
    gc.collect()
    print(f"| workload ({device}) | default tok/s | --deterministic tok/s | on / off |\n| --- | ---: | ---: | ---: |")
    for row in rows:
        if "ratio" in row:
            print(f"| {row['workload']} | {row['default_tok_s']:.1f} | {row['deterministic_tok_s']:.1f} | {row['ratio']:.2f} |")
        else:
            print(f"| {row['workload']} | {row['count']} | | |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
