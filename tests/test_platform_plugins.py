"""The four platforms this machine has no hardware for (rocm, tpu, gaudi, metal): installed, each
loads, and `runtime plugins` says why it is unavailable; with RUNTIME_EMULATE each becomes an
available platform on the CPU that keeps its own rules (dtypes, buckets)."""

from __future__ import annotations

import pytest
import torch

from runtime.cli import main
from runtime.platform import PlatformConfig, Registry

# The start of each reason on a Linux machine without ROCm torch, torch-xla, Gaudi's stack or a Mac.
UNAVAILABLE_HERE = {"rocm": "torch is not a ROCm build", "tpu": "torch_xla is not installed",
                    "gaudi": "habana_frameworks.torch is not installed", "metal": "Metal needs macOS"}


@pytest.fixture(autouse=True)
def no_emulation(monkeypatch):
    monkeypatch.delenv("RUNTIME_EMULATE", raising=False)


def test_runtime_plugins_names_each_missing_piece(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name, reason in UNAVAILABLE_HERE.items():
        assert f"platform {name}: unavailable: {reason}" in out, out
        assert f"{name:10} runtime-{name} " in out and "loaded" in out


def config(**overrides) -> PlatformConfig:
    fields = dict(dtype=torch.float32, block_size=16, max_model_len=1024, max_num_seqs=32,
                  max_num_batched_tokens=512, enable_prefix_caching=True)
    return PlatformConfig(**{**fields, **overrides})


@pytest.mark.parametrize("name", ["tpu", "gaudi", "metal"])
def test_emulated_platforms_run_on_the_cpu_with_their_own_rules(monkeypatch, name):
    monkeypatch.setenv("RUNTIME_EMULATE", name)
    platform = Registry().select_platform(name)
    assert platform.device().type == "cpu" and platform.name == name and platform.dist_backend == "gloo"
    adjusted = config()
    platform.check_and_update_config(adjusted)
    if name in ("tpu", "gaudi"):
        assert adjusted.static_shape_buckets == (16, 32, 64, 128, 256, 512)
    if name != "metal":
        with pytest.raises(ValueError, match="does not support dtype torch.float16"):
            platform.check_and_update_config(config(dtype=torch.float16))


def test_emulated_rocm_needs_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("RUNTIME_EMULATE", "rocm")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        Registry().select_platform("rocm")
