"""Plugin discovery through the ``runtime.platforms`` entry-point group: a good plugin is found and
selected, a broken or incompatible one is skipped with a warning, never a crash."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from runtime.platform import AttentionSpec, Registry
from runtime.platform.registry import KernelSet

GOOD = '''
import torch
from runtime.platform import Kernel, Platform, hookimpl
from runtime.platform.reference.attention import ReferenceAttentionBackend

RUNTIME_CONTRACT = ">=1.0,<2"

class FakePlatform(Platform):
    name = "fake"
    device_type = "cpu"
    priority = 50
    @classmethod
    def is_available(cls):
        return True
    def device_count(self):
        return 1
    def device_name(self, index=0):
        return "fake accelerator"
    def memory_info(self, index=0):
        return (1 << 30, 2 << 30)

class FakeAttention(ReferenceAttentionBackend):
    name = "fake_attn"
    platform = "fake"
    supported_head_sizes = (64,)

def doubled_silu_and_mul(x):
    import torch.nn.functional as F
    gate, up = x.chunk(2, dim=-1)
    return 2 * F.silu(gate) * up

@hookimpl
def runtime_platforms():
    return [FakePlatform]

@hookimpl
def runtime_attention_backends():
    return [FakeAttention]

@hookimpl
def runtime_kernels():
    return [Kernel("fake", "silu_and_mul", doubled_silu_and_mul)]
'''

BROKEN = "raise ImportError('vendor SDK libfoo.so not found')\n"
OLD_CONTRACT = "RUNTIME_CONTRACT = '>=0.1,<1'\n"
NO_CONTRACT = "X = 1\n"


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A directory holding plugin modules and a dist-info declaring their entry points."""
    for name, source in {"fake_good": GOOD, "fake_broken": BROKEN, "fake_old": OLD_CONTRACT, "fake_none": NO_CONTRACT}.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    dist = tmp_path / "fake_plugins-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(
        "[runtime.platforms]\ngood = fake_good\nbroken = fake_broken\nold = fake_old\nnone = fake_none\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_discovery_loads_good_and_skips_bad_with_warnings(plugin_path):
    with pytest.warns(RuntimeWarning) as caught:
        registry = Registry()
    messages = " | ".join(str(w.message) for w in caught)
    status = {s.name: s for s in registry.statuses}
    assert status["good"].loaded and status["good"].provides == ["platform:fake"]
    assert status["good"].distribution == "fake-plugins" and status["good"].version == "1.2.3"
    assert not status["broken"].loaded and "libfoo.so not found" in status["broken"].reason
    assert not status["old"].loaded and "supports contract >=0.1,<1" in status["old"].reason
    assert not status["none"].loaded and "RUNTIME_CONTRACT" in status["none"].reason
    assert "broken" in messages and "old" in messages
    assert status["cpu"].loaded


def test_selection_prefers_priority_and_honours_device(plugin_path):
    with pytest.warns(RuntimeWarning):
        registry = Registry()
    assert registry.select_platform().name == "fake"
    assert registry.select_platform("cpu").name == "cpu"
    with pytest.raises(ValueError, match="unknown --device 'abacus': installed platforms are cpu, .*fake"):
        registry.select_platform("abacus")
    with pytest.raises(ValueError, match="platform 'tpu' is installed but not available on this machine "
                                         r"\(torch_xla is not installed.*\); choose another --device"):
        registry.select_platform("tpu")


def test_backend_selection_and_kernel_override(plugin_path):
    with pytest.warns(RuntimeWarning):
        registry = Registry()
    spec = AttentionSpec(4, 2, 64, 0.125, torch.float32, 16)
    assert registry.select_attention_backend("fake", spec).name == "fake_attn"
    with pytest.raises(ValueError, match="no attention backend on fake.*head size 80 not in"):
        registry.select_attention_backend("fake", AttentionSpec(4, 2, 80, 0.1, torch.float32, 16))
    ops = registry.kernels("fake")
    x = torch.randn(3, 8)
    gate, up = x.chunk(2, dim=-1)
    assert torch.allclose(ops.silu_and_mul(x), 2 * torch.nn.functional.silu(gate) * up)
    assert ops.sources["silu_and_mul"] == "fake_good" and ops.sources["rms_norm"] == "reference"


def test_kernel_for_unknown_op_is_rejected():
    from runtime.platform import Kernel

    with pytest.raises(ValueError, match="unknown op 'flash_dance'"):
        KernelSet([Kernel("x", "flash_dance", lambda: None)])


def test_lora_add_of_a_platform_that_registers_only_shrink_and_expand_is_made_of_them():
    """A plugin written before contract 1.5 keeps its own LoRA kernels: lora_add calls them per partition."""
    from runtime.platform import Kernel
    from runtime.platform.reference import OPS

    calls = []

    def shrink(*args):
        calls.append("shrink")
        return OPS["lora_shrink"](*args)

    def expand(*args):
        calls.append("expand")
        return OPS["lora_expand"](*args)

    ops = KernelSet([Kernel("x", "lora_shrink", shrink), Kernel("x", "lora_expand", expand)])
    assert ops.sources["lora_add"] == "lora_shrink + lora_expand per partition"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 12, generator=g), torch.randn(5, 10, generator=g)
    lora_a, lora_b = torch.randn(2, 3 * 4, 12, generator=g), torch.randn(2, 10, 4, generator=g)
    slots = torch.tensor([1, -1, 0, 0, 1])
    expected = OPS["lora_add"](y.clone(), x, lora_a, lora_b, slots, (6, 2, 2), 0.5)
    assert ops.lora_add(y, x, lora_a, lora_b, slots, (6, 2, 2), 0.5) is y
    torch.testing.assert_close(y, expected)
    assert calls == ["shrink", "expand"] * 3
    assert KernelSet([]).lora_add is OPS["lora_add"]
    assert KernelSet([Kernel("x", "lora_add", shrink)]).sources["lora_add"] == __name__


def test_linear_lora_of_a_platform_without_it_is_its_own_linear_then_its_own_lora_add():
    """A plugin written before contract 1.14 runs a projection with adapters as its linear kernel
    and then its lora_add kernel; under --deterministic a linear_lora that does not claim batch
    invariance is set aside for that composition too (its parts answer for themselves)."""
    from runtime.platform import Kernel
    from runtime.platform.reference import OPS

    calls = []

    def linear(*args):
        calls.append("linear")
        return OPS["linear"](*args)

    def lora_add(*args):
        calls.append("lora_add")
        return OPS["lora_add"](*args)

    ops = KernelSet([Kernel("x", "linear", linear), Kernel("x", "lora_add", lora_add)])
    assert ops.sources["linear_lora"] == "linear + lora_add"
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(5, 12, generator=g), torch.randn(10, 12, generator=g), torch.randn(10, generator=g)
    lora_a, lora_b = torch.randn(2, 2 * 4, 12, generator=g), torch.randn(2, 10, 4, generator=g)
    slots = torch.tensor([1, -1, 0, 0, 1])
    got = ops.linear_lora(x, weight, bias, lora_a, lora_b, slots, (6, 4), 0.5)
    torch.testing.assert_close(got, OPS["linear_lora"](x, weight, bias, lora_a, lora_b, slots, (6, 4), 0.5))
    torch.testing.assert_close(got[1], OPS["linear"](x, weight, bias)[1])  # slot -1: the projection alone
    assert calls == ["linear", "lora_add"]

    def fused(*args):
        raise AssertionError("a linear_lora that is not batch-invariant ran under --deterministic")

    kernels = [Kernel("x", "linear_lora", fused), Kernel("x", "linear", linear, batch_invariant=True),
               Kernel("x", "lora_add", lora_add, batch_invariant=True)]
    deterministic = KernelSet(kernels, deterministic=True)
    assert deterministic.sources["linear_lora"] == "linear + lora_add"
    assert "linear_lora" not in deterministic.not_batch_invariant
    deterministic.linear_lora(x, weight, bias, lora_a, lora_b, slots, (6, 4), 0.5)
    assert KernelSet(kernels).linear_lora is fused


def test_qk_norm_rotary_of_a_platform_without_it_is_made_of_its_own_norm_and_rotary():
    """A plugin written before contract 1.13 keeps its rms_norm and rotary kernels for Qwen3's q/k:
    the fused op calls them (both heads' norms, then the rotation), not the reference."""
    from runtime.platform import Kernel
    from runtime.platform.reference import OPS, build_cos_sin_cache

    calls = []

    def norm(*args):
        calls.append("norm")
        return OPS["rms_norm"](*args)

    def rotate(*args):
        calls.append("rotate")
        return OPS["rotary_embedding"](*args)

    ops = KernelSet([Kernel("x", "rms_norm", norm), Kernel("x", "rotary_embedding", rotate)])
    assert ops.sources["qk_norm_rotary_embedding"] == "rms_norm + rotary_embedding"
    g = torch.Generator().manual_seed(0)
    q, k, weights = torch.randn(3, 4, 16, generator=g), torch.randn(3, 2, 16, generator=g), torch.randn(2, 16, generator=g)
    positions, cache = torch.tensor([0, 5, 9]), build_cos_sin_cache(16, 10000.0, 16, None)
    got = ops.qk_norm_rotary_embedding(positions, q, k, weights[0], weights[1], 1e-6, cache, False)
    expected = OPS["qk_norm_rotary_embedding"](positions, q, k, weights[0], weights[1], 1e-6, cache, False)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert calls == ["norm", "norm", "rotate"]
    assert KernelSet([]).qk_norm_rotary_embedding is OPS["qk_norm_rotary_embedding"]


def test_plugins_command_lists_everything(plugin_path):
    env = dict(os.environ, PYTHONPATH=str(plugin_path), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "plugins"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout
    assert "good" in lines and "loaded" in lines and "platform:fake" in lines
    assert "broken" in lines and "skipped" in lines and "libfoo.so not found" in lines
    assert "platform cpu: available" in lines and "attention: cpu_sdpa" in lines
