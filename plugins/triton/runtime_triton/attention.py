"""The Triton attention backend of NVIDIA and AMD GPUs: the contract's one call, as two Triton
launches (three with split-K).

``forward`` stores the new K/V at ``slot_mapping``, then runs the unified kernel of
:mod:`runtime_triton.paged_attention` over the paged cache. How to launch (rows per program,
keys per tile, whether to split the key range) is decided once per step from host-side sizes
and shared by every layer of the step through ``meta.backend_cache``, by the GPU family's
:class:`~runtime_triton.tile_plans.TilePlans`. A platform plugin registers a subclass naming its
platform and plans.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import triton

from runtime.platform import AttentionBackend, AttentionMetadata

from .paged_attention import split_workspace, store_kv, unified_attention
from .tile_plans import TilePlans, wide_rows


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


def deterministic_plan(*, num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """The one plan of ``--deterministic`` (contract 1.10), fixed by the model alone: the largest
    query block of the tile plans, 32-key tiles, no split. Each query row then takes the same tiles
    and the same reduction whether it decodes alone, among others, or sits in a prefill chunk."""
    block_m = max(32 if wide_rows(head_size, dtype) else 64, triton.next_power_of_2(num_heads // num_kv_heads))
    return block_m, 32, 1, 8 if block_m >= 128 else 4


class TritonAttentionBackend(AttentionBackend):
    """Paged attention for every phase in one Triton kernel family (see paged_attention.py).
    Subclasses set ``platform`` and ``tile_plans``."""

    name = "triton_unified"
    tile_plans: ClassVar[TilePlans]
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
            num_warps=plan.num_warps, align_tiles=spec.deterministic,
            after_cache_write=key.shape[0] > 0)  # store_kv launches nothing for no tokens

    def _plan(self, query: torch.Tensor, meta: AttentionMetadata) -> LaunchPlan:
        """The step's plan for this head layout, made by the first layer and reused by the others."""
        tokens, num_heads, head_size = query.shape
        key = (self.name, num_heads, self.spec.num_kv_heads, head_size, query.dtype)
        plan = meta.backend_cache.get(key)
        if plan is None and self.spec.deterministic:
            block_m, tile_n, splits, warps = deterministic_plan(num_heads=num_heads, num_kv_heads=self.spec.num_kv_heads,
                                                                head_size=head_size, dtype=query.dtype)
        elif plan is None:
            block_m, tile_n, splits, warps = self.tile_plans.attention(
                num_seqs=meta.seq_lens.shape[0], max_query_len=meta.max_query_len,
                max_seq_len=meta.max_seq_len, num_heads=num_heads, num_kv_heads=self.spec.num_kv_heads,
                head_size=head_size, dtype=query.dtype, multiprocessors=_multiprocessors(query.device))
        if plan is None:
            workspace = split_workspace(tokens, num_heads, head_size, splits, query.device) if splits > 1 else None
            plan = meta.backend_cache[key] = LaunchPlan(block_m, tile_n, splits, warps, workspace)
        return plan
