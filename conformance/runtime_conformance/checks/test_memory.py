"""Memory: what the platform reports is plausible, and the KV cache the engine asks for fits."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.platform import AttentionBackend

from ..specs import main_dtype, pick

MIB = 1 << 20


def test_memory_info(target):
    platform = target.require_platform()
    for index in range(platform.device_count()):
        free, total = platform.memory_info(index)
        assert isinstance(free, int) and isinstance(total, int), f"memory_info({index}) gave {free!r}, {total!r}: not ints"
        assert 64 * MIB <= total, f"memory_info({index}): total {total} bytes is implausibly small (bytes, not MiB?)"
        assert 0 < free <= total, f"memory_info({index}): free {free} bytes is not within (0, total {total}]"


def test_kv_cache_memory_honours_request(target):
    platform = target.require_platform()
    requested = 3 * MIB + 5
    got = platform.kv_cache_memory(requested, 0.9, 10 * MIB)
    assert got == requested, f"kv_cache_memory({requested}, ...) gave {got}: --kv-cache-memory must be taken as is"


def test_kv_cache_allocates(target):
    """Size the cache as the engine does (default settings, a small model's weights) and allocate it."""
    platform = target.require_platform()
    weight_bytes = 256 * MIB
    budget = platform.kv_cache_memory(None, 0.9, weight_bytes)
    free, _ = platform.memory_info()
    assert isinstance(budget, int) and 0 < budget <= free, (
        f"kv_cache_memory(None, 0.9, {weight_bytes}) gave {budget} bytes; expected (0, free {free}]")
    backend = target.backends[0] if target.backends else AttentionBackend
    dtype = main_dtype(backend, platform) if target.backends else platform.default_dtype()
    # One layer of a Llama-3-8B-shaped model: 8 KV heads of 128.
    block_size, head_size = pick(backend.supported_block_sizes, 16), pick(backend.supported_head_sizes, 128)
    per_block = math.prod(backend.kv_cache_shape(1, block_size, 8, head_size)) * torch.empty(0, dtype=dtype).element_size()
    num_blocks = budget // per_block
    if num_blocks < 1:
        pytest.fail(f"the KV budget of {budget} bytes holds no block of {per_block} bytes")
    shape = backend.kv_cache_shape(num_blocks, block_size, 8, head_size)
    cache = torch.empty(shape, dtype=dtype, device=target.device)
    # Touch both ends: a lazily committed allocation must really be there.
    cache.select(backend.kv_cache_block_dim, 0).fill_(1)
    cache.select(backend.kv_cache_block_dim, num_blocks - 1).fill_(1)
    platform.mark_step()  # a lazily traced device allocates only when the step runs
    platform.synchronize()
    del cache
    # A caching allocator would keep the whole budget from the checks that follow.
    try:
        device_module = torch.get_device_module(target.device.type)
    except RuntimeError:  # no torch.<type> module (torch-xla registers none): no allocator cache to empty
        device_module = None
    if hasattr(device_module, "empty_cache"):
        device_module.empty_cache()
