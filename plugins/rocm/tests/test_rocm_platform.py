"""runtime-rocm's hardware-independent logic with the GPU faked: detection, architecture and fp8
choices, the AMD tile plans' budgets, the backend's fp8 refusal, and fp8 weights in the FNUZ
format against a float64 reference. The kernels themselves run on a GPU or, emulated, under
Triton's interpreter (scripts/conformance-emulated.sh)."""

from __future__ import annotations

import importlib.metadata
import types

import pytest
import torch

from runtime import __version__
from runtime.platform import AttentionSpec, RawQuantizedTensor, Registry
from runtime.platform.packed import Fp8Data
from runtime_rocm import plugin
from runtime_rocm.arch import base_arch, fp8_dtype
from runtime_rocm.platform import RocmPlatform
from runtime_rocm.quant import RocmFp8Method

LDS_BYTES = 64 << 10


def test_entry_point_and_registration():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="runtime.platforms")}
    assert eps["rocm"] == "runtime_rocm.plugin"
    registry = Registry(entry_points=[])
    assert registry.register(plugin, "rocm", "runtime-rocm", __version__)
    assert registry.communicator("rocm").platform == "rocm"
    with pytest.raises(ValueError, match=r"not available on this machine \(torch is not a ROCm build"):
        registry.select_platform("rocm")


@pytest.fixture
def rocm_build(monkeypatch):
    """A ROCm build of torch with two MI300X GPUs, as torch.cuda reports them there."""
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    properties = types.SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-", multi_processor_count=304)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: properties)
    return properties


def test_detection(monkeypatch, rocm_build):
    assert RocmPlatform.unavailable_reason() is None and RocmPlatform.is_available()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "no AMD GPU visible" in RocmPlatform.unavailable_reason()

    def broken():
        raise RuntimeError("hipErrorNoDevice")

    monkeypatch.setattr(torch.cuda, "device_count", broken)
    assert "hipErrorNoDevice" in RocmPlatform.unavailable_reason()
    monkeypatch.setattr(torch.version, "hip", None)
    assert "torch is not a ROCm build" in RocmPlatform.unavailable_reason()


def test_architecture_decides_the_fp8_format(rocm_build):
    assert RocmPlatform().arch() == "gfx942"
    assert RocmPlatform().fp8_dtype() == torch.float8_e4m3fnuz
    assert base_arch("gfx950:xnack-") == "gfx950" and fp8_dtype("gfx950") == torch.float8_e4m3fn
    assert fp8_dtype("gfx90a") is None  # MI200: no fp8


def test_fp8_kv_cache_only_where_the_gpu_converts_ocp_fp8(monkeypatch, rocm_build):
    from runtime_rocm.backend import RocmTritonAttentionBackend

    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=128, scale=0.1, dtype=torch.bfloat16, block_size=16)
    fp8 = AttentionSpec(**{**spec.__dict__, "kv_cache_dtype": "fp8"})
    assert RocmTritonAttentionBackend.unsupported_reason(spec) is None
    assert "gfx942 does not convert" in RocmTritonAttentionBackend.unsupported_reason(fp8)
    rocm_build.gcnArchName = "gfx950"
    assert RocmTritonAttentionBackend.unsupported_reason(fp8) is None


def plan_sizes():
    return [dict(num_seqs=s, max_query_len=q, max_seq_len=L, num_heads=h, num_kv_heads=kv, head_size=d, dtype=dt,
                 multiprocessors=m)
            for s, q, L in ((1, 1, 4096), (64, 1, 600), (8, 512, 512), (1, 2048, 2048))
            for h, kv, d in ((32, 8, 128), (64, 1, 128), (16, 16, 256))
            for dt in (torch.bfloat16, torch.float32) for m in (132, 304)]


@pytest.mark.parametrize("sizes", plan_sizes(), ids=str)
def test_amd_attention_plan_keeps_the_threads_of_a_program(sizes):
    """64-wide wavefronts: the AMD plan's programs have as many threads as the NVIDIA plan's
    32-wide warps give, over the same query rows and splits; its Q and K/V tiles fit a CU's LDS,
    as big as the NVIDIA plan's where those fit."""
    pytest.importorskip("triton")
    from runtime_triton.tile_plans import amd, nvidia, padded_head_size

    a, n = amd.PLANS, nvidia.PLANS
    block_m, tile_n, splits, warps = a.attention(**sizes)
    n_block_m, n_tile_n, n_splits, n_warps = n.attention(**sizes)
    assert (block_m, splits) == (n_block_m, n_splits) and 16 <= tile_n <= n_tile_n
    assert warps * a.warp_size == n_warps * n.warp_size
    row_bytes = padded_head_size(sizes["head_size"]) * sizes["dtype"].itemsize
    assert (block_m + 2 * tile_n) * row_bytes <= LDS_BYTES
    if (n_block_m + 2 * n_tile_n) * row_bytes <= LDS_BYTES:
        assert tile_n == n_tile_n


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)])
def test_amd_skinny_matmul_stages_fit_the_lds(shape):
    pytest.importorskip("triton")
    from runtime_triton.tile_plans.amd import PLANS

    plan = PLANS.skinny_matmul(*shape)
    weight_tile = plan["block_n"] * plan["block_k"] * 2  # bf16
    rows_tile = 16 * plan["block_k"] * 2
    assert plan["num_stages"] * (weight_tile + rows_tile) <= LDS_BYTES
    assert plan["num_warps"] * PLANS.warp_size <= 1024  # a workgroup's limit


def test_fp8_weights_in_the_fnuz_format():
    """gfx942's e4m3 is FNUZ: largest 240, not e4m3fn's 448; dequantized weights within one
    e4m3 step (2^-3 relative) of the float64 original, per output channel."""
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 10, 64)[:, None]
    method = RocmFp8Method(arch="gfx942")
    stored = method.quantize(weight)
    assert stored.weight.dtype == torch.float8_e4m3fnuz and not stored.scaled_mm  # CPU weights: no fp8 matmul here
    assert stored.weight.float().abs().amax(dim=1).eq(240).all()
    dequantized = stored.weight.double() * stored.scale.T.double()
    error = (dequantized - weight.double()).abs()
    assert (error <= weight.double().abs() * 2 ** -4 + stored.scale.T.double() * 2 ** -9).all()
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(method.apply(stored, x), x @ dequantized.float().T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, stored_dtype", [("gfx942", torch.float8_e4m3fnuz), ("gfx950", torch.float8_e4m3fn)])
def test_fp8_checkpoint_weights_load_exactly_in_the_architectures_format(arch, stored_dtype):
    """An FP8 checkpoint's OCP e4m3 weights (negative zero and the largest values included) load
    converted to FNUZ on gfx942 and as stored on gfx950; either way the stored weight times its
    scale is the checkpoint's exactly (the conversion only moves a factor 2 into the scale)."""
    generator = torch.Generator().manual_seed(2)
    values = (torch.randn(32, 64, generator=generator) * 100).clamp(-448, 448)
    values[0, :4] = torch.tensor([-0.0, 448.0, -448.0, 2 ** -9])
    checkpoint = values.to(torch.float8_e4m3fn)
    assert checkpoint.view(torch.uint8)[0, 0] == 0x80  # negative zero: FNUZ's NaN pattern
    scale = torch.rand(32, generator=generator) + 0.01
    raw = RawQuantizedTensor("fp8", "fp8_e4m3", Fp8Data(checkpoint, scale), (32, 64))
    stored = RocmFp8Method(arch=arch).load(raw, torch.float32, torch.device("cpu"))
    assert stored.weight.dtype == stored_dtype and not stored.scaled_mm
    exact = checkpoint.double() * scale.double()[:, None]
    assert torch.equal(stored.weight.double() * stored.scale.T.double(), exact)
    x = torch.randn(3, 64, generator=generator)
    torch.testing.assert_close(RocmFp8Method(arch=arch).apply(stored, x).double(), x.double() @ exact.T, atol=1e-3, rtol=1e-5)
