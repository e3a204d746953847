"""Attention specs within what a backend declares, for checks that need one."""

from __future__ import annotations

import torch

from runtime.platform import AttentionBackend, AttentionSpec, Platform

# Sampled where a backend declares "any" (None): common real sizes plus one that is not a power of two.
ANY_HEAD_SIZES = (32, 64, 80, 128, 256)
ANY_BLOCK_SIZES = (1, 8, 16, 32)


def pick(declared: tuple[int, ...] | None, preferred: int) -> int:
    return preferred if declared is None or preferred in declared else declared[0]


def head_sizes(backend: type[AttentionBackend]) -> tuple[int, ...]:
    return backend.supported_head_sizes or ANY_HEAD_SIZES


def block_sizes(backend: type[AttentionBackend]) -> tuple[int, ...]:
    return backend.supported_block_sizes or ANY_BLOCK_SIZES


def dtypes(backend: type[AttentionBackend], platform: Platform) -> list[torch.dtype]:
    """The dtypes both declare: a backend's other dtypes can never run on this platform."""
    return [d for d in backend.supported_dtypes if d in platform.supported_dtypes]


def main_dtype(backend: type[AttentionBackend], platform: Platform) -> torch.dtype:
    usable = dtypes(backend, platform)
    return platform.default_dtype() if platform.default_dtype() in usable else usable[0]


def spec_for(backend: type[AttentionBackend], dtype: torch.dtype, *, num_heads: int = 8, num_kv_heads: int = 2,
             head_size: int | None = None, block_size: int | None = None, **features) -> AttentionSpec:
    """A spec the backend declares it supports: head size 64 and block size 16 unless given or not declared."""
    head_size = head_size or pick(backend.supported_head_sizes, 64)
    block_size = block_size or pick(backend.supported_block_sizes, 16)
    return AttentionSpec(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, scale=head_size ** -0.5,
                         dtype=dtype, block_size=block_size, **features)
