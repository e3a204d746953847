"""The CUDA attention backend: the contract's one call, as two Triton launches (three with split-K).

``forward`` stores the new K/V at ``slot_mapping``, then runs the unified kernel of
:mod:`runtime_cuda.triton_attention` over the paged cache. How to launch (rows per program,
keys per tile, whether to split the key range) is decided once per step from host-side sizes
and shared by every layer of the step through ``meta.backend_cache``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from runtime.platform import AttentionBackend, AttentionMetadata, AttentionSpec

from .triton_attention import padded_head_size, split_workspace, store_kv, unified_attention

# Split-K pays once a query block's keys take many tiles; below this context it only adds a launch.
SPLIT_MIN_SEQ_LEN = 512
MAX_SPLITS = 16


@dataclass(frozen=True)
class LaunchPlan:
    block_m: int
    tile_n: int
    num_splits: int
    num_warps: int
    workspace: tuple[torch.Tensor, torch.Tensor] | None


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # Triton's interpreter (tests on the CPU): any count exercises the same code
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_launch(*, num_seqs: int, max_query_len: int, max_seq_len: int, num_heads: int,
                num_kv_heads: int, head_size: int, dtype: torch.dtype, multiprocessors: int) -> tuple[int, int, int, int]:
    """(block_m, tile_n, num_splits, num_warps) for one step; every input is known on the host.

    Rows: enough for the longest query of the step times the GQA group (at least 16, tl.dot's
    minimum), capped where Q and the accumulator still fit in registers. Keys per tile: 64 for
    decode rows, 32 where a block holds several query tokens (prefill): on an H100 a prefill of
    32 x 512 tokens ran 1.22x faster with 32 than with 64 (benchmarks/attention_plans.py), the
    causal diagonal masking less of each tile, while a decode step was fastest at 64. Splits: only when every
    sequence fits one query block (decode, short speculative steps) and the grid would leave
    multiprocessors idle, sized to about two programs per multiprocessor.
    """
    group = num_heads // num_kv_heads
    head_pad = padded_head_size(head_size)
    wide = head_pad > 128 or dtype == torch.float32
    cap = max(32 if wide else 64, triton.next_power_of_2(group))
    block_m = min(max(16, triton.next_power_of_2(group * max_query_len)), cap)
    tile_n = 32 if wide or max_query_len > 1 else 64
    num_splits = 1
    one_block_each = group * max_query_len <= block_m
    if one_block_each and max_seq_len >= SPLIT_MIN_SEQ_LEN:
        programs = num_seqs * num_kv_heads
        wanted = triton.next_power_of_2(max(1, 2 * multiprocessors // programs))
        # At least a tile per split. Fewer, longer splits leave most multiprocessors idle: at batch 1
        # and 600 tokens of context, 2 splits per KV head made attention 7% of an 8B model's step.
        num_splits = max(1, min(MAX_SPLITS, wanted, max_seq_len // tile_n))
        num_splits = 1 << (num_splits.bit_length() - 1)  # powers of two: few merge-kernel variants to compile
    num_warps = 8 if block_m >= 128 else 4
    return block_m, tile_n, num_splits, num_warps


def deterministic_plan(*, num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """The one plan of ``--deterministic`` (contract 1.10), fixed by the model alone: the largest
    block of :func:`plan_launch`, 32-key tiles, no split. Each query row then takes the same tiles
    and the same reduction whether it decodes alone, among others, or sits in a prefill chunk."""
    group = num_heads // num_kv_heads
    wide = padded_head_size(head_size) > 128 or dtype == torch.float32
    block_m = max(32 if wide else 64, triton.next_power_of_2(group))
    return block_m, 32, 1, 8 if block_m >= 128 else 4


class TritonAttentionBackend(AttentionBackend):
    """Paged attention for every phase in one Triton kernel family (see triton_attention.py)."""

    name = "triton_unified"
    platform = "cuda"
    priority = 10
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    # Any size up to 256 works (padded to a power of two); these are the ones real models use,
    # plus 16 and 32 for tiny test models.
    supported_head_sizes = (16, 32, 64, 80, 96, 128, 256)
    # Unscaled fp8 (see AttentionSpec.cache_dtype): stores saturate, tiles are widened to the model dtype.
    supported_kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
    supports_sliding_window = True
    supports_logits_soft_cap = True
    batch_invariant = True

    @classmethod
    def unsupported_reason(cls, spec: AttentionSpec) -> str | None:
        reason = super().unsupported_reason(spec)
        # Triton has e4m3 conversions only where the hardware does (its fp8e4nv type); e5m2 it emulates.
        if reason is None and spec.cache_dtype == torch.float8_e4m3fn and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if (major, minor) < (8, 9):
                return (f"an fp8 (e4m3) KV cache needs compute capability 8.9 or newer, this GPU has {major}.{minor}; "
                        "use --kv-cache-dtype fp8_e5m2")
        return reason

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        store_kv(key, value, kv_cache, meta.slot_mapping)
        plan = self._plan(query, meta)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        spec = self.spec
        return unified_attention(
            query, kv_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_table, meta.seq_lens.shape[0],
            scale=spec.scale, sliding_window=spec.sliding_window, soft_cap=spec.logits_soft_cap,
            block_m=plan.block_m, tile_n=plan.tile_n, num_splits=plan.num_splits, workspace=plan.workspace,
            num_warps=plan.num_warps, align_tiles=spec.deterministic)

    def _plan(self, query: torch.Tensor, meta: AttentionMetadata) -> LaunchPlan:
        """The step's plan for this head layout, made by the first layer and reused by the others."""
        tokens, num_heads, head_size = query.shape
        key = (self.name, num_heads, self.spec.num_kv_heads, head_size, query.dtype)
        plan = meta.backend_cache.get(key)
        if plan is None and self.spec.deterministic:
            block_m, tile_n, splits, warps = deterministic_plan(num_heads=num_heads, num_kv_heads=self.spec.num_kv_heads,
                                                                head_size=head_size, dtype=query.dtype)
        elif plan is None:
            block_m, tile_n, splits, warps = plan_launch(
                num_seqs=meta.seq_lens.shape[0], max_query_len=meta.max_query_len,
                max_seq_len=meta.max_seq_len, num_heads=num_heads, num_kv_heads=self.spec.num_kv_heads,
                head_size=head_size, dtype=query.dtype, multiprocessors=_multiprocessors(query.device))
        if plan is None:
            workspace = split_workspace(tokens, num_heads, head_size, splits, query.device) if splits > 1 else None
            plan = meta.backend_cache[key] = LaunchPlan(block_m, tile_n, splits, warps, workspace)
        return plan
