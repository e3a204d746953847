"""LoRA shrink/expand on the CPU: which implementation the CPU plugin registers.

Usage: .venv/bin/python benchmarks/lora_kernels.py [--tokens 1 16 256 2048] [--ranks 8 16 64] [--slots 1 4 8]
                                                   [--repeats 7] [--dtype float32] [--threads N]

Times ``lora_shrink`` (x [T, in] -> [T, r]) and ``lora_expand`` ([T, r] -> base [T, out] + delta) on two
projection shapes (576 -> 1536, SmolLM2-135M's MLP; 4096 -> 14336, Llama-3-8B's) for every
step size, rank and number of adapter slots, candidate after candidate inside every repeat so
a shared machine's load drifts over all of them alike. Steps of up to 256 tokens are decode
steps (one token per request, slots drawn from -1 .. S-1); longer ones are prefill steps of
four prompt chunks (slots 0, -1, S-1, 1) and mixed steps (a chunk of 3/4 of the tokens on slot 0
followed by decodes). Prints the median microseconds per call and, last, each candidate's time
relative to ``runtime_cpu``'s for each kind of step (geometric mean over shapes, ranks, slot
counts and both ops, where the candidate ran). On a shared machine pass ``--threads 1``
(docs/benchmarks.md, "A note on threads").

Candidates:
- ``reference``: the core's reference (gathers every token's weights: [T, r, in]); skipped
  where that gather would exceed ``REFERENCE_GATHER_BYTES``;
- ``per_slot``: one index_select, matmul and index_copy/index_add per slot present;
- ``all_adapters``: one matmul against every slot's weights at once, then each token's block
  picked out (no host sync, S times the arithmetic);
- ``runtime_cpu``: the CPU plugin's (``runtime_cpu/lora.py``): long runs of one slot where
  they lie, the tokens of short runs gathered once and sorted by slot. It groups the slots once
  for consecutive calls with the same slots, as every call of an engine step after the first
  is; ``runtime_cpu_first`` is the same with the grouping forgotten before each call, as the
  first call of a step is.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from runtime.platform.reference import lora_expand as reference_expand
from runtime.platform.reference import lora_shrink as reference_shrink
from runtime_cpu import lora
from runtime_cpu.lora import lora_expand, lora_shrink

SHAPES = {"576->1536": (576, 1536), "4096->14336": (4096, 14336)}
REFERENCE_GATHER_BYTES = 1 << 30
DECODE_MAX_TOKENS = 256


def per_slot_shrink(x, lora_a, slots, scale):
    out = x.new_zeros(x.shape[0], lora_a.shape[1])
    for slot in slots.unique().tolist():
        if slot >= 0:
            rows = (slots == slot).nonzero().flatten()
            out.index_copy_(0, rows, x.index_select(0, rows) @ lora_a[slot].T)
    return out.mul_(scale)


def per_slot_expand(shrunk, lora_b, slots, base):
    out = base.clone()
    for slot in slots.unique().tolist():
        if slot >= 0:
            rows = (slots == slot).nonzero().flatten()
            out.index_add_(0, rows, shrunk.index_select(0, rows) @ lora_b[slot].T)
    return out


def all_adapters_shrink(x, lora_a, slots, scale):
    num_slots, rank, in_features = lora_a.shape
    every = (x @ lora_a.reshape(num_slots * rank, in_features).T).view(-1, num_slots, rank)
    picked = every.gather(1, slots.clamp(min=0).view(-1, 1, 1).expand(-1, 1, rank)).squeeze(1)
    return picked * ((slots >= 0).to(x.dtype) * scale).unsqueeze(1)


def all_adapters_expand(shrunk, lora_b, slots, base):
    tokens, (num_slots, _, rank) = shrunk.shape[0], lora_b.shape
    spread = shrunk.new_zeros(tokens, num_slots, rank)
    spread[torch.arange(tokens), slots.clamp(min=0)] = shrunk * (slots >= 0).unsqueeze(1).to(shrunk.dtype)
    return base + torch.einsum("tsr,sor->to", spread, lora_b)


def first_call(op, *args):
    lora._last_grouped = None
    return op(*args)


CANDIDATES = {
    "reference": (reference_shrink, reference_expand),
    "per_slot": (per_slot_shrink, per_slot_expand),
    "all_adapters": (all_adapters_shrink, all_adapters_expand),
    "runtime_cpu": (lora_shrink, lora_expand),
    "runtime_cpu_first": (lambda *args: first_call(lora_shrink, *args), lambda *args: first_call(lora_expand, *args)),
}


def step_slots(tokens: int, num_slots: int, layout: str, g: torch.Generator) -> torch.Tensor:
    if layout == "decode":
        return torch.randint(-1, num_slots, (tokens,), generator=g)
    if layout == "prefill":
        return torch.tensor([0, -1, num_slots - 1, 1 % num_slots]).repeat_interleave(tokens // 4)
    chunk = tokens - tokens // 4
    return torch.cat([torch.zeros(chunk, dtype=torch.long), torch.randint(-1, num_slots, (tokens - chunk,), generator=g)])


def layouts(tokens: int) -> list[str]:
    return ["decode"] if tokens <= DECODE_MAX_TOKENS else ["prefill", "mixed"]


def check_agreement(calls: dict) -> None:
    """Every candidate must compute what the plugin does: a faster wrong one would prove nothing."""
    expected = calls["runtime_cpu"]()
    for name, call in calls.items():
        torch.testing.assert_close(call(), expected, atol=1e-3, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def time_candidates(calls: dict, repeats: int) -> dict[str, float]:
    """Median microseconds of each call, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    check_agreement(calls)
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def measure(in_features: int, out_features: int, rank: int, num_slots: int, slots: torch.Tensor, dtype: torch.dtype,
            repeats: int, g: torch.Generator) -> tuple[dict[str, float], dict[str, float]]:
    tokens = len(slots)
    x = torch.randn(tokens, in_features, generator=g).to(dtype)
    lora_a = (torch.randn(num_slots, rank, in_features, generator=g) * in_features ** -0.5).to(dtype)
    lora_b = (torch.randn(num_slots, out_features, rank, generator=g) * rank ** -0.5).to(dtype)
    base = torch.randn(tokens, out_features, generator=g).to(dtype)
    shrunk = lora_shrink(x, lora_a, slots, 0.5)
    gather_bytes = tokens * rank * max(in_features, out_features) * 4
    names = [n for n in CANDIDATES if n != "reference" or gather_bytes <= REFERENCE_GATHER_BYTES]
    shrink = {n: (lambda f=CANDIDATES[n][0]: f(x, lora_a, slots, 0.5)) for n in names}
    expand = {n: (lambda f=CANDIDATES[n][1]: f(shrunk, lora_b, slots, base)) for n in names}
    return time_candidates(shrink, repeats), time_candidates(expand, repeats)


def geometric_mean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def cell(times: dict[str, float], name: str) -> str:
    return f"{times[name]:.0f}" if name in times else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 2048])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    names = list(CANDIDATES)
    ratios: dict[tuple[str, str], list[float]] = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; median us per call\n")
    print("| in->out | r | S | T | step | shrink: " + " / ".join(names) + " | expand: " + " / ".join(names) + " |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    with torch.inference_mode():
        for shape, (in_features, out_features) in SHAPES.items():
            for rank in args.ranks:
                for num_slots in args.slots:
                    for tokens in args.tokens:
                        for layout in layouts(tokens):
                            slots = step_slots(tokens, num_slots, layout, g)
                            shrink, expand = measure(in_features, out_features, rank, num_slots, slots, dtype,
                                                     args.repeats, g)
                            for times in (shrink, expand):
                                for name, us in times.items():
                                    ratios.setdefault((name, f"{tokens} {layout}"), []).append(us / times["runtime_cpu"])
                            print(f"| {shape} | {rank} | {num_slots} | {tokens} | {layout} | "
                                  + " / ".join(cell(shrink, n) for n in names) + " | "
                                  + " / ".join(cell(expand, n) for n in names) + " |", flush=True)
    steps = list(dict.fromkeys(step for _, step in ratios))
    print("\nTime relative to runtime_cpu (geometric mean over shapes, ranks, slot counts and both ops):\n")
    print("| candidate | " + " | ".join(f"T={step}" for step in steps) + " |")
    print("| --- |" + " ---: |" * len(steps))
    for name in names:
        cells = [f"{geometric_mean(ratios[name, step]):.2f}x" if (name, step) in ratios else "-" for step in steps]
        print(f"| {name} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
