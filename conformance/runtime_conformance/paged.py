"""Paged-attention scenarios: a few sequences fed over several engine steps, run through a
backend and the reference side by side.

Every K/V a backend reads was written by that backend in an earlier step (or earlier in the
same call), so the checks work for any cache layout ``kv_cache_shape`` chooses. The cache
starts as random values, blocks are handed out in shuffled order and block 0 stays the null
block the engine pads block tables with: a backend that assumes contiguous blocks, reads past
a sequence's length or writes outside ``slot_mapping`` picks up or leaves garbage.

With an fp8 ``kv_cache_dtype`` both caches hold fp8 and the reference stores torch's
round-to-nearest-even cast of K/V, saturated at the format's largest value (an unscaled cache,
as vLLM keeps without calibrated scales). The backend must store exactly those values; since
every fp8 value is exact in float16, bfloat16 and float32, its output is then held to the model
dtype's tolerance, as with a cache in the model dtype.

Outputs are compared with the reference computed in float64 by both rules of
:mod:`runtime_conformance.compare`, the baseline being the reference computed in float32 from
the same cache and rounded to the model dtype.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from runtime.platform import AttentionBackend, AttentionMetadata, AttentionSpec
from runtime.platform.reference.attention import paged_attention

from .compare import dtype_name, precision


@dataclass(frozen=True)
class Scenario:
    """``steps``: per engine step, (sequence, new tokens) in batch order.

    ``shared_prefix``: sequences other than 0 start with sequence 0's first whole blocks
    covering up to this many tokens, already computed (a prefix-cache hit).
    """

    steps: tuple[tuple[tuple[int, int], ...], ...]
    shared_prefix: int = 0


SCENARIOS = {
    "prefill": Scenario((((0, 7), (1, 33), (2, 2)),)),
    "decode": Scenario((((0, 12), (1, 40), (2, 31), (3, 5)),
                        ((0, 1), (1, 1), (2, 1), (3, 1), (4, 1)),
                        ((4, 1), (0, 1), (2, 1)))),
    "chunked_prefill": Scenario((((0, 40), (1, 16)), ((1, 16), (0, 9)), ((1, 5),))),
    "prefix_hit": Scenario((((0, 53),), ((1, 1), (0, 1), (2, 7))), shared_prefix=48),
    "speculative_verify": Scenario((((0, 30), (1, 17), (2, 1)), ((0, 4), (1, 4), (2, 4)))),
    "mixed": Scenario((((1, 20), (2, 33), (4, 64), (5, 5), (6, 9)),
                       ((0, 10), (1, 1), (2, 6), (3, 1), (4, 1), (5, 3), (6, 1)))),
    "many_blocks": Scenario((((0, 300), (1, 257), (3, 199)), ((0, 1), (1, 11), (2, 150), (3, 1)))),
    # A context of two thousand tokens, its second half a chunk continuing the cached first: a
    # narrow (float16/bfloat16) output accumulator drifts with the number of keys, and only
    # contexts this long make that drift larger than a correct kernel's rounding by a margin.
    "long_context": Scenario((((0, 1024),), ((0, 1024),), ((0, 1),), ((0, 1),))),
}


def _kind(cached: int, new: int) -> str:
    if cached == 0:
        return "prefill"
    return "decode" if new == 1 else "chunk / several query tokens"


class PagedRun:
    """One scenario for one backend: caches, block tables and the random inputs of every step."""

    def __init__(self, scenario: Scenario, spec: AttentionSpec, backend: type[AttentionBackend],
                 device: torch.device, seed: int = 0, mark_step: Callable[[], None] = lambda: None):
        """``mark_step``: the platform's (``Platform.mark_step``), called after each step's forward
        as the engine does, so a lazily traced device runs each step as its own program."""
        self.scenario, self.spec, self.device, self.mark_step = scenario, spec, device, mark_step
        self.generator = torch.Generator().manual_seed(seed)
        bs = spec.block_size
        num_seqs = 1 + max(seq for step in scenario.steps for seq, _ in step)
        shared = scenario.shared_prefix // bs
        self.position = [0] + [shared * bs] * (num_seqs - 1)
        total = list(self.position)
        for step in scenario.steps:
            for seq, new in step:
                total[seq] += new
        own = [math.ceil(t / bs) - (shared if seq else 0) for seq, t in enumerate(total)]
        # Block 0 is the engine's null block (block-table padding); three spare blocks no one owns.
        num_blocks = 1 + sum(own) + 3
        pool = (torch.randperm(num_blocks - 1, generator=self.generator) + 1).tolist()
        self.blocks = [[pool.pop() for _ in range(own[0])]]
        for seq in range(1, num_seqs):
            self.blocks.append(self.blocks[0][:shared] + [pool.pop() for _ in range(own[seq])])

        default = AttentionBackend.kv_cache_shape(num_blocks, bs, spec.num_kv_heads, spec.head_size)
        shape = tuple(backend.kv_cache_shape(num_blocks, bs, spec.num_kv_heads, spec.head_size))
        self.default_layout = shape == default
        start = torch.randn(shape, generator=self.generator).to(spec.cache_dtype)
        self.cache = start.to(device)
        # The reference keeps its own cache in the default layout: with the same starting values
        # when the backend's layout is the default too, so the two can be compared slot by slot.
        self.ref_cache = (start.clone() if self.default_layout
                          else torch.randn(default, generator=self.generator).to(spec.cache_dtype))

    def describe(self, seq: int, cached: int, new: int) -> str:
        blocks = math.ceil((cached + new) / self.spec.block_size)
        return (f"sequence {seq} ({cached} cached + {new} new tokens over {blocks} blocks, {_kind(cached, new)}), "
                f"query row r at position {cached} + r")

    def _step_inputs(self, step: tuple[tuple[int, int], ...]):
        spec, bs = self.spec, self.spec.block_size
        starts, seq_lens, slots, tables = [0], [], [], []
        for seq, new in step:
            first = self.position[seq]
            starts.append(starts[-1] + new)
            seq_lens.append(first + new)
            slots += [self.blocks[seq][p // bs] * bs + p % bs for p in range(first, first + new)]
            tables.append(self.blocks[seq][:math.ceil((first + new) / bs)])
        width = max(len(t) for t in tables)
        tokens, g = starts[-1], self.generator
        # Queries twice as spread as keys: scores wide enough that masking and soft-capping show.
        query = (2 * torch.randn(tokens, spec.num_heads, spec.head_size, generator=g)).to(spec.dtype)
        key = torch.randn(tokens, spec.num_kv_heads, spec.head_size, generator=g).to(spec.dtype)
        value = torch.randn(tokens, spec.num_kv_heads, spec.head_size, generator=g).to(spec.dtype)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(new for _, new in step), max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
        return query, key, value, meta

    def _on_device(self, meta: AttentionMetadata) -> AttentionMetadata:
        d = self.device
        return dataclasses.replace(meta, query_start_loc=meta.query_start_loc.to(d), seq_lens=meta.seq_lens.to(d),
                                   block_table=meta.block_table.to(d), slot_mapping=meta.slot_mapping.to(d),
                                   query_start_loc_cpu=list(meta.query_start_loc_cpu), seq_lens_cpu=list(meta.seq_lens_cpu))

    def run(self, backend: AttentionBackend, check_cache: bool = False) -> None:
        """Every step through ``backend`` and the reference; AssertionError naming every step whose
        output differs (all steps run: a fault that grows with the context shows most in the last).

        ``check_cache`` (default layout only): compare the caches slot by slot after each step,
        before the outputs, so a misplaced write is reported as such.
        """
        spec = self.spec
        steps = len(self.scenario.steps)
        failures: list[str] = []
        for index, step in enumerate(self.scenario.steps):
            query, key, value, meta = self._step_inputs(step)
            out = backend.forward(query.to(self.device), key.to(self.device), value.to(self.device), self.cache,
                                  self._on_device(meta))
            self.mark_step()
            # The float64 query makes a float64 output; K/V are stored in the cache dtype either way.
            exact = paged_attention(query.double(), key.double(), value.double(), self.ref_cache, meta, spec.scale,
                                    spec.sliding_window, spec.logits_soft_cap)
            baseline = paged_attention(query, key, value, self.ref_cache, meta, spec.scale, spec.sliding_window,
                                       spec.logits_soft_cap, compute_dtype=torch.float32)
            difference = self.cache_difference() if check_cache else None
            if difference:
                raise AssertionError(f"K/V cache after step {index + 1} of {steps}: {difference}")
            problems = []
            if tuple(out.shape) != tuple(query.shape) or out.dtype != query.dtype:
                problems.append(f"returned {tuple(out.shape)} {out.dtype}, expected {tuple(query.shape)} {query.dtype}")
            else:
                out = out.cpu()
                for row, (seq, new) in enumerate(step):
                    rows = slice(meta.query_start_loc_cpu[row], meta.query_start_loc_cpu[row + 1])
                    where = self.describe(seq, self.position[seq], new)
                    problem = precision(out[rows], exact[rows], baseline[rows], spec.dtype,
                                        f"step {index + 1} of {steps}, {where}")
                    if problem:
                        problems.append(f"{where}: {problem}")
            if problems:
                ok = len(step) - len(problems)
                failures.append(f"step {index + 1} of {steps} ({ok} of {len(step)} sequences match): "
                                + "; ".join(problems))
            for seq, new in step:
                self.position[seq] += new
        if failures:
            raise AssertionError("attention output differs from the reference in " + " | ".join(failures))

    def cache_difference(self) -> str | None:
        """Where the backend's cache differs from the reference's (default layout only), or None."""
        ours = self.cache.cpu().view(2, -1, self.spec.num_kv_heads, self.spec.head_size)
        ref = self.ref_cache.view(2, -1, self.spec.num_kv_heads, self.spec.head_size)
        differs = (ours != ref).flatten(2).any(-1)
        if not differs.any():
            return None
        bs = self.spec.block_size
        kind, slot = (int(i) for i in differs.nonzero()[0])
        feature = int((ours[kind, slot] != ref[kind, slot]).flatten().nonzero()[0])
        got, expected = (float(c[kind, slot].flatten()[feature]) for c in (ours, ref))
        fp8 = (f"; a {dtype_name(self.spec.cache_dtype)} cache holds torch's round-to-nearest-even cast, saturated "
               "at the format's largest value" if self.spec.cache_dtype != self.spec.dtype else "")
        return (f"{int(differs.any(0).sum())} slots differ from the reference's; first: "
                f"{'key' if kind == 0 else 'value'} of slot {slot} (block {slot // bs}, offset {slot % bs}), "
                f"got {got:.6g} where the reference has {expected:.6g}. "
                f"New K/V must land exactly at slot_mapping and nothing else may change{fp8}")
