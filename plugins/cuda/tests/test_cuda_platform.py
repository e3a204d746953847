"""The plugin's registration and platform logic: loads everywhere, is available only with a GPU,
never raises where there is none, sizes the KV cache from the device's memory."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch

from runtime import __version__
from runtime.platform import AttentionSpec, PlatformConfig, RawQuantizedTensor, Registry

plugin = pytest.importorskip("runtime_cuda.plugin", reason="runtime-cuda is not installed")
from runtime_cuda.platform import CudaPlatform  # noqa: E402
from runtime_cuda.quant import CudaGgufMethod as GgufDequantizeMethod  # noqa: E402

GIB = 1 << 30


def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="runtime.platforms")}
    if "cuda" not in eps:
        pytest.skip("runtime-cuda is importable but not installed as a distribution (pip install -e plugins/cuda)")
    assert eps["cuda"] == "runtime_cuda.plugin"


def test_plugin_loads_on_any_machine():
    registry = Registry(entry_points=[])
    assert registry.register(plugin, "cuda", "runtime-cuda", __version__)
    status = registry.statuses[-1]
    assert status.loaded and status.provides == ["platform:cuda"]
    assert registry.communicator("cuda").platform == "cuda"
    assert registry.quantization_method("cuda", "gguf").platform == "cuda"
    if CudaPlatform.is_available():
        assert [b.name for b in registry.attention_backends("cuda")] == ["triton_unified"]
        assert registry.select_platform().name == "cuda"  # the highest priority wins automatic selection
    else:
        # Without a GPU the Triton code is not even imported, and --device cuda says why it cannot run.
        assert registry.attention_backends("cuda") == [] and registry.kernels("cuda").sources["rms_norm"] == "reference"
        with pytest.raises(ValueError, match="not available"):
            registry.select_platform("cuda")


def test_is_available_never_raises(monkeypatch):
    def broken():
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build, whatever this machine has
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert CudaPlatform.is_available() is False
    assert "CUDA driver initialization failed" in CudaPlatform.unavailable_reason()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("runtime_cuda.platform.triton_importable", lambda: False)
    assert CudaPlatform.is_available() is False
    assert "pip install triton" in CudaPlatform.unavailable_reason()
    monkeypatch.setattr("runtime_cuda.platform.triton_importable", lambda: True)
    assert CudaPlatform.unavailable_reason() is None


def test_a_rocm_build_of_torch_is_not_cuda(monkeypatch):
    # torch.cuda answers on ROCm too (HIP behind it): the cuda platform must leave AMD GPUs to rocm.
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "rocm platform" in CudaPlatform.unavailable_reason()


def test_kv_cache_memory(monkeypatch):
    platform = CudaPlatform()
    assert platform.kv_cache_memory(12345, 0.9, 10 * GIB) == 12345  # --kv-cache-memory is taken as is
    # 80 GiB card: 2 GiB held by another process, 17 GiB reserved by torch (16 of them weights).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (61 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 17 * GIB)
    budget = platform.kv_cache_memory(None, 0.9, 16 * GIB)
    assert budget == int(80 * GIB * 0.9) - 2 * GIB - 16 * GIB - CudaPlatform.UNMEASURED_RESERVE
    assert platform.kv_cache_memory(None, 0.1, 16 * GIB) == 0


def test_config_checks():
    platform = CudaPlatform()
    config = PlatformConfig(dtype=torch.float16, block_size=16, max_model_len=256, max_num_seqs=8,
                            max_num_batched_tokens=256, enable_prefix_caching=True)
    platform.check_and_update_config(config)
    config.dtype = torch.float64
    with pytest.raises(ValueError, match="--dtype"):
        platform.check_and_update_config(config)


def test_attention_declarations():
    backend = pytest.importorskip("runtime_cuda.backend", reason="needs triton").CudaTritonAttentionBackend

    def spec(**kw):
        fields = dict(num_heads=8, num_kv_heads=2, head_size=128, scale=0.1, dtype=torch.bfloat16, block_size=16)
        return AttentionSpec(**{**fields, **kw})

    assert backend.unsupported_reason(spec(head_size=80, sliding_window=4096, logits_soft_cap=50.0, block_size=1)) is None
    assert "head size" in backend.unsupported_reason(spec(head_size=24))
    assert backend.unsupported_reason(spec(kv_cache_dtype="fp8")) is None
    assert "kv cache dtype" in backend.unsupported_reason(spec(kv_cache_dtype="int4"))


def test_gguf_dequantize_on_load():
    method = GgufDequantizeMethod()
    values = np.arange(6, dtype=np.float16)
    dense = method.dequantize(RawQuantizedTensor("gguf", "F16", values, (2, 3)), torch.float32)
    assert torch.equal(dense, torch.arange(6, dtype=torch.float32).view(2, 3))
    with pytest.raises(ValueError, match="IQ2_XS"):
        method.dequantize(RawQuantizedTensor("gguf", "IQ2_XS", values, (2, 3)), torch.float32)
