"""runtime-gaudi's hardware-independent logic with habana_frameworks faked: detection, memory,
config adjustment, fused-op selection (and that the wrappers keep the reference's semantics,
with a fake fused op computing the textbook formula in float64), and HPU graph capture."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from runtime import __version__
from runtime.platform import PlatformConfig, Registry
from runtime.platform.reference import fused_add_rms_norm
from runtime_gaudi import plugin
from runtime_gaudi.ops import kernels, sdpa_with
from runtime_gaudi.platform import GaudiPlatform


class FakeFusedRMSNorm:
    @staticmethod
    def apply(x, weight, eps):
        x64 = x.double()
        return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).to(x.dtype)


class FakeFusedSDPA:
    @staticmethod
    def apply(q, k, v, attn_mask, dropout_p, is_causal, scale):
        assert attn_mask.dtype == q.dtype and dropout_p == 0.0 and not is_causal  # an additive mask, as HPU takes it
        scores = (q.double() @ k.double().transpose(-1, -2)) * scale + attn_mask.double()
        return (scores.softmax(-1) @ v.double()).to(q.dtype)


class FakeHPUGraph:
    def __init__(self):
        self.recorded = None

    def replay(self):
        self.recorded()


@pytest.fixture
def fake_hpu(monkeypatch):
    """habana_frameworks.torch with one Gaudi 3 of 128 GiB, 8 GiB of it in use."""
    hpu = types.ModuleType("habana_frameworks.torch.hpu")
    hpu.is_available = lambda: True
    hpu.device_count = lambda: 1
    hpu.get_device_name = lambda index=0: "GAUDI3"
    hpu.memory_stats = lambda index=0: {"Limit": 128 << 30, "InUse": 8 << 30}
    graphs = types.ModuleType("habana_frameworks.torch.hpu.graphs")
    graphs.HPUGraph = FakeHPUGraph

    class Capture:
        def __init__(self, graph):
            self.graph = graph

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.graph.recorded = lambda: None
            return False

    graphs.graph = Capture
    normalization = types.ModuleType("habana_frameworks.torch.hpex.normalization")
    normalization.FusedRMSNorm = FakeFusedRMSNorm
    fused_kernels = types.ModuleType("habana_frameworks.torch.hpex.kernels")
    fused_kernels.FusedSDPA = FakeFusedSDPA
    for name, module in {"habana_frameworks": types.ModuleType("habana_frameworks"),
                         "habana_frameworks.torch": types.ModuleType("habana_frameworks.torch"),
                         "habana_frameworks.torch.hpu": hpu, "habana_frameworks.torch.hpu.graphs": graphs,
                         "habana_frameworks.torch.hpex": types.ModuleType("habana_frameworks.torch.hpex"),
                         "habana_frameworks.torch.hpex.normalization": normalization,
                         "habana_frameworks.torch.hpex.kernels": fused_kernels,
                         "habana_frameworks.torch.distributed.hccl": types.ModuleType("hccl")}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return hpu


def test_without_the_hpu_library_the_platform_says_where_it_comes_from():
    assert "habana_frameworks" not in sys.modules
    assert "Intel Gaudi's software stack" in GaudiPlatform.unavailable_reason()
    registry = Registry(entry_points=[])
    assert registry.register(plugin, "gaudi", "runtime-gaudi", __version__)
    assert registry.communicator("gaudi").platform == "gaudi"
    assert registry.kernels("gaudi").sources["rms_norm"] == "reference"  # nothing fused without the library


def test_detection_and_memory(fake_hpu):
    assert GaudiPlatform.unavailable_reason() is None
    platform = GaudiPlatform()
    assert platform.device_name() == "GAUDI3" and platform.memory_info() == (120 << 30, 128 << 30)
    fake_hpu.is_available = lambda: False
    assert "no Gaudi device visible" in GaudiPlatform.unavailable_reason()


def test_config_gets_static_shape_buckets(fake_hpu):
    config = PlatformConfig(dtype=torch.bfloat16, block_size=16, max_model_len=4096, max_num_seqs=128,
                            max_num_batched_tokens=4096, enable_prefix_caching=True)
    GaudiPlatform().check_and_update_config(config)
    assert config.static_shape_buckets == (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def test_fused_ops_are_selected_where_the_library_has_them_and_keep_the_reference_semantics(fake_hpu):
    ops = {k.op: k.fn for k in kernels("gaudi")}
    assert set(ops) == {"rms_norm", "fused_add_rms_norm"}
    g = torch.Generator().manual_seed(0)
    x, residual, weight = (torch.randn(6, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    out, summed = ops["fused_add_rms_norm"](x, residual, weight, 1e-6)
    ref_out, ref_summed = fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(summed, ref_summed, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=1.6e-2, rtol=1.6e-2)


def test_fused_sdpa_wrapper_is_torch_sdpa(fake_hpu):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 2, 3, 8, generator=g) for _ in range(3))
    k, v = torch.randn(5, 2, 7, 8, generator=g), torch.randn(5, 2, 7, 8, generator=g)
    mask = torch.rand(5, 1, 1, 7, generator=g) > 0.3
    mask[..., 0] = True
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(sdpa_with(FakeFusedSDPA)(q, k, v, attn_mask=mask, scale=0.3), expected.float())


def test_hpu_graph_capture(fake_hpu):
    replay, output = GaudiPlatform().capture_graph(lambda: torch.ones(2), None)
    assert torch.equal(output, torch.ones(2))
    replay()
