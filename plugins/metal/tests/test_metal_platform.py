"""runtime-metal's hardware-independent logic with macOS and MPS faked: detection, memory from
Metal's working set, unified memory, the refusals (fp8 KV cache, tensor parallelism), and the
SDPA attention (emulated on the CPU) against the reference."""

from __future__ import annotations

import pytest
import torch

from runtime import __version__
from runtime.platform import AttentionMetadata, AttentionSpec, PlatformConfig, Registry
from runtime.platform.reference import paged_attention
from runtime_metal import plugin
from runtime_metal.attention import MetalSdpaAttentionBackend
from runtime_metal.platform import MetalPlatform


@pytest.fixture
def mac(monkeypatch):
    """An M3 Max with 48 GiB: Metal recommends 36 GiB of working set, 4 GiB of it in use."""
    monkeypatch.setattr("runtime_metal.platform.host.system", lambda: "Darwin")
    monkeypatch.setattr("runtime_metal.platform.host.machine", lambda: "arm64")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 36 << 30)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 4 << 30)


def test_detection(monkeypatch, mac):
    assert MetalPlatform.unavailable_reason() is None
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    assert "no MPS support" in MetalPlatform.unavailable_reason()
    monkeypatch.setattr("runtime_metal.platform.host.system", lambda: "Linux")
    assert "Metal needs macOS on Apple silicon" in MetalPlatform.unavailable_reason()


def test_unified_memory_budget(mac):
    platform = MetalPlatform()
    assert platform.unified_memory and platform.memory_info() == (32 << 30, 36 << 30)
    # Half of what Metal would still give after 8 GiB of weights.
    assert platform.kv_cache_memory(None, 0.9, 8 << 30) == 12 << 30
    assert platform.kv_cache_memory(1 << 20, 0.9, 8 << 30) == 1 << 20


def test_refusals_name_the_fix(mac):
    config = PlatformConfig(dtype=torch.float16, block_size=16, max_model_len=2048, max_num_seqs=32,
                            max_num_batched_tokens=2048, enable_prefix_caching=True, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="MPS has no fp8"):
        MetalPlatform().check_and_update_config(config)
    registry = Registry(entry_points=[])
    assert registry.register(plugin, "metal", "runtime-metal", __version__)
    with pytest.raises(ValueError, match="registers no communicator, so it cannot run with --tensor-parallel-size > 1"):
        registry.communicator("metal")


def test_sdpa_attention_emulated_on_the_cpu_matches_the_reference():
    """A prefill after a cached prefix and a decode in one step, with a sliding window."""
    g = torch.Generator().manual_seed(0)
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16, scale=0.25, dtype=torch.float32, block_size=4,
                         sliding_window=5)
    assert MetalSdpaAttentionBackend.unsupported_reason(spec) is None
    soft_capped = AttentionSpec(**{**spec.__dict__, "logits_soft_cap": 30.0})
    assert MetalSdpaAttentionBackend.unsupported_reason(soft_capped) == "no logits soft-capping"
    # Sequence 0: 4 cached + 3 new tokens over blocks 3, 1; sequence 1: 9 cached + 1 over blocks 5, 2, 4.
    meta = AttentionMetadata(query_start_loc=torch.tensor([0, 3, 4], dtype=torch.int32),
                             seq_lens=torch.tensor([7, 10], dtype=torch.int32),
                             block_table=torch.tensor([[3, 1, 0], [5, 2, 4]], dtype=torch.int32),
                             slot_mapping=torch.tensor([1 * 4 + 0, 1 * 4 + 1, 1 * 4 + 2, 4 * 4 + 1], dtype=torch.int64),
                             max_query_len=3, max_seq_len=10, query_start_loc_cpu=[0, 3, 4], seq_lens_cpu=[7, 10])
    query = torch.randn(4, 4, 16, generator=g)
    key, value = torch.randn(4, 2, 16, generator=g), torch.randn(4, 2, 16, generator=g)
    cache = torch.randn(2, 6, 4, 2, 16, generator=g)
    ref_cache = cache.clone()
    expected = paged_attention(query, key, value, ref_cache, meta, 0.25, sliding_window=5)
    out = MetalSdpaAttentionBackend(spec).forward(query, key, value, cache, meta)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0)
