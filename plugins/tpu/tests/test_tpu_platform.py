"""runtime-tpu's hardware-independent logic with torch-xla faked: detection, the compilation
cache, config adjustment and bucketing. The XLA path itself runs on XLA:CPU where torch-xla
installs (scripts/tpu-xla-cpu.sh), and emulated in eager torch (scripts/conformance-emulated.sh)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from runtime import __version__
from runtime.platform import PlatformConfig, Registry
from runtime_tpu import plugin
from runtime_tpu.platform import TpuPlatform


@pytest.fixture
def fake_xla(monkeypatch, tmp_path):
    """torch_xla's modules as sys.modules entries: a TPU v5e host with 4 chips."""
    calls = {"cache": []}
    runtime = types.ModuleType("torch_xla.runtime")
    runtime.device_type = lambda: "TPU"
    runtime.global_runtime_device_count = lambda: 4
    runtime.initialize_cache = lambda path, readonly: calls["cache"].append((path, readonly))
    root = types.ModuleType("torch_xla")
    root.runtime = runtime
    for name, module in {"torch_xla": root, "torch_xla.runtime": runtime,
                         "torch_xla.distributed.xla_backend": types.ModuleType("xla_backend")}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("RUNTIME_XLA_CACHE", str(tmp_path / "xla-cache"))
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    monkeypatch.setattr(TpuPlatform, "_cache_ready", False)
    return runtime, calls


def test_without_torch_xla_the_platform_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # import fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "torch_xla.runtime", None)
    assert "pip install torch-xla[tpu]" in TpuPlatform.unavailable_reason()
    registry = Registry(entry_points=[])
    assert registry.register(plugin, "tpu", "runtime-tpu", __version__)
    with pytest.raises(ValueError, match="torch_xla is not installed"):
        registry.select_platform("tpu")


def test_detection(monkeypatch, fake_xla):
    runtime, _ = fake_xla
    assert TpuPlatform.unavailable_reason() is None and TpuPlatform().device_count() == 4
    runtime.device_type = lambda: "CUDA"
    assert "no TPU: torch_xla's device is CUDA" in TpuPlatform.unavailable_reason()
    monkeypatch.setenv("PJRT_DEVICE", "cpu")  # XLA:CPU, asked for: available
    assert TpuPlatform.unavailable_reason() is None


def test_compiled_programs_are_cached_on_disk_once(fake_xla, tmp_path):
    _, calls = fake_xla
    TpuPlatform()
    TpuPlatform()
    assert calls["cache"] == [(str(tmp_path / "xla-cache"), False)]
    assert (tmp_path / "xla-cache").is_dir()


def config(**overrides) -> PlatformConfig:
    fields = dict(dtype=torch.bfloat16, block_size=16, max_model_len=4096, max_num_seqs=128,
                  max_num_batched_tokens=2048, enable_prefix_caching=True)
    return PlatformConfig(**{**fields, **overrides})


def test_config_gets_static_shape_buckets(fake_xla):
    platform = TpuPlatform()
    adjusted = config()
    platform.check_and_update_config(adjusted)
    assert adjusted.static_shape_buckets == (16, 32, 64, 128, 256, 512, 1024, 2048)
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8 is not supported on tpu; use auto"):
        platform.check_and_update_config(config(kv_cache_dtype="fp8"))
    with pytest.raises(ValueError, match="without --enable-lora"):
        platform.check_and_update_config(config(enable_lora=True))
    with pytest.raises(ValueError, match="does not support dtype torch.float16"):
        platform.check_and_update_config(config(dtype=torch.float16))
