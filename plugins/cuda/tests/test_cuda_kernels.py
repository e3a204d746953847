"""The fused Triton kernels against the core's reference ops, in every dtype the platform runs.

Inputs include what the model really passes: rows of several magnitudes (epsilon matters for
the small ones), q/k as strided views of one fused qkv tensor, partial rotary, both rotary
layouts, rows wider than one activation block.
"""

from __future__ import annotations

import types

import pytest
import torch

from runtime.platform.reference import OPS, build_cos_sin_cache

registry = pytest.importorskip("runtime_triton.registry",
                               reason="needs runtime-cuda and triton (pip install -e plugins/cuda)")
skinny = pytest.importorskip("runtime_triton.skinny_matmul")
from runtime_triton.tile_plans.nvidia import PLANS  # noqa: E402

# What the CUDA plugin registers, by op name: kernels.rms_norm, ...; where an op has several kernels, the
# one the platform picks (the highest priority: the batch-invariant linear only under --deterministic).
KERNELS = registry.kernels("cuda", PLANS)
kernels = types.SimpleNamespace(KERNELS=KERNELS, **{k.op: k.fn for k in sorted(KERNELS, key=lambda k: k.priority)})

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda d: str(d).removeprefix("torch."))


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu(), expected, atol=tol, rtol=tol)


def _rows(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Random rows whose magnitudes range from 1e-3 to 10."""
    scale = 10 ** (torch.rand(*shape[:-1], 1, generator=g) * 4 - 3)
    return torch.randn(*shape, generator=g) * scale


@DTYPES
@pytest.mark.parametrize("shape,eps", [((16, 64), 1e-6), ((7, 1000), 1e-5), ((5, 4, 32), 1e-6)])
def test_rms_norm(shape, eps, dtype, device):
    g = torch.Generator().manual_seed(0)
    x, weight = _rows(g, *shape).to(dtype), (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    _close(kernels.rms_norm(x.to(device), weight.to(device), eps), OPS["rms_norm"](x, weight, eps), dtype)


@DTYPES
@pytest.mark.parametrize("tokens,first,heads", [(6, 0, 2), (6, 128, 1), (1, 0, 2)], ids=["q", "k", "one-token"])
def test_rms_norm_of_a_strided_view(tokens, first, heads, dtype, device):
    """Per-head q/k-norm (Qwen3) normalises a [T, H, D] view of the fused qkv output in place of its
    rows (the query's heads from column 0, the key's after them)."""
    g = torch.Generator().manual_seed(1)
    qkv = _rows(g, tokens, 3 * 64).to(dtype)
    head = qkv[:, first:first + heads * 64].view(tokens, heads, 64)
    weight = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
    got = kernels.rms_norm(qkv.to(device)[:, first:first + heads * 64].view(tokens, heads, 64), weight.to(device), 1e-6)
    assert got.shape == (tokens, heads, 64)
    _close(got, OPS["rms_norm"](head, weight, 1e-6), dtype)


@DTYPES
@pytest.mark.parametrize("shape,eps", [((16, 64), 1e-6), ((7, 1000), 1e-5)])
def test_fused_add_rms_norm(shape, eps, dtype, device):
    g = torch.Generator().manual_seed(2)
    x, residual = _rows(g, *shape).to(dtype), _rows(g, *shape).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    normed, summed = kernels.fused_add_rms_norm(x.to(device), residual.to(device), weight.to(device), eps)
    expected_normed, expected_summed = OPS["fused_add_rms_norm"](x, residual, weight, eps)
    _close(summed, expected_summed, dtype)
    _close(normed, expected_normed, dtype)


@DTYPES
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [64, 32], ids=["full", "partial"])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}],
                         ids=["default", "llama3"])
def test_rotary_embedding(scaling, rotary_dim, is_neox, dtype, device):
    g = torch.Generator().manual_seed(3)
    tokens, heads, kv_heads, head_size = 13, 4, 2, 64
    positions = torch.randint(0, 1024, (tokens,), generator=g)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, generator=g).to(dtype)
    cache = build_cos_sin_cache(rotary_dim, 10000.0, 1024, scaling)

    def views(t):
        q, k, _ = t.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
        return q.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size)

    expected = OPS["rotary_embedding"](positions, *views(qkv), cache, is_neox)
    got = kernels.rotary_embedding(positions.to(device), *views(qkv.to(device)), cache.to(device), is_neox)
    _close(got[0], expected[0], dtype)
    _close(got[1], expected[1], dtype)


@DTYPES
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [64, 32], ids=["full", "partial"])
def test_qk_norm_rotary_embedding(rotary_dim, is_neox, dtype, device):
    """Qwen3's per-head q/k norm and rotary in one launch, q and k read in place from a fused qkv,
    heads of magnitudes 1e-3 to 10: the reference's norm, rounding, then rotation."""
    g = torch.Generator().manual_seed(6)
    tokens, heads, kv_heads, head_size = 13, 4, 2, 64
    positions = torch.randint(0, 1024, (tokens,), generator=g)
    scale = 10 ** (torch.rand(tokens, heads + 2 * kv_heads, 1, generator=g) * 4 - 3)
    qkv = (torch.randn(tokens, heads + 2 * kv_heads, head_size, generator=g) * scale).flatten(1).to(dtype)
    q_weight, k_weight = ((1 + 0.1 * torch.randn(head_size, generator=g)).to(dtype) for _ in range(2))
    cache = build_cos_sin_cache(rotary_dim, 10000.0, 1024, None)

    def views(t):
        q, k, _ = t.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
        return q.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size)

    expected = OPS["qk_norm_rotary_embedding"](positions, *views(qkv), q_weight, k_weight, 1e-6, cache, is_neox)
    got = kernels.qk_norm_rotary_embedding(positions.to(device), *views(qkv.to(device)), q_weight.to(device),
                                           k_weight.to(device), 1e-6, cache.to(device), is_neox)
    _close(got[0], expected[0], dtype)
    _close(got[1], expected[1], dtype)


@DTYPES
@pytest.mark.parametrize("shape", [(9, 128), (3, 5, 200), (2, 2 * 3000)], ids=["small", "3d", "multi-block"])
def test_silu_and_mul(shape, dtype, device):
    x = (3 * torch.randn(*shape, generator=torch.Generator().manual_seed(4))).to(dtype)
    _close(kernels.silu_and_mul(x.to(device)), OPS["silu_and_mul"](x), dtype)


@DTYPES
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_mul(approximate, dtype, device):
    x = (3 * torch.randn(9, 2 * 200, generator=torch.Generator().manual_seed(5))).to(dtype)
    _close(kernels.gelu_and_mul(x.to(device), approximate), OPS["gelu_and_mul"](x, approximate=approximate), dtype)


HALF_DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
SKINNY_PLANS = [dict(block_n=16, block_k=256, num_warps=4, num_stages=4), dict(block_n=32, block_k=512, num_warps=4, num_stages=4)]


@HALF_DTYPES
@pytest.mark.parametrize("plan", SKINNY_PLANS, ids=["narrow", "wide"])
@pytest.mark.parametrize("rows,n,k,bias", [(1, 96, 200, False), (3, 40, 1030, True), (16, 130, 64, False), (7, 33, 600, True)])
def test_skinny_matmul_matches_float64(rows, n, k, bias, plan, dtype, device, require_dot):
    """Each tile plan the op uses, on edges that are no multiple of a tile, against a float64 product."""
    require_dot(dtype)
    g = torch.Generator().manual_seed(6)
    x, weight = torch.randn(rows, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    expected = x.double() @ weight.double().T + (b.double() if bias else 0)
    got = skinny.skinny_matmul(x.to(device), weight.to(device), None if b is None else b.to(device), **plan)
    _close(got, expected.to(dtype), dtype)


@HALF_DTYPES
def test_linear_takes_the_skinny_kernel_up_to_16_rows_and_keeps_shape(dtype, device, require_dot):
    require_dot(dtype)
    g = torch.Generator().manual_seed(7)
    weight = (torch.randn(72, 160, generator=g) * 160 ** -0.5).to(dtype)
    for shape in [(2, 8, 160), (17, 160), (40, 160)]:  # 16 rows as [2, 8, K]; then cuBLAS's side of the switch
        x = torch.randn(*shape, generator=g).to(dtype)
        _close(kernels.linear(x.to(device), weight.to(device)), (x.double() @ weight.double().T).to(dtype), dtype)


def test_every_kernel_names_a_contract_op():
    assert {k.op for k in kernels.KERNELS} <= set(OPS)
    assert all(k.platform == "cuda" for k in kernels.KERNELS)


LORA_OPS = pytest.mark.parametrize("op", ["lora_shrink", "lora_expand", "lora_add", "linear_lora"])
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _lora_slots(layout: str, tokens: int, num_slots: int, g: torch.Generator) -> torch.Tensor:
    """``decode``: one token per request, slots drawn at random (-1 among them); ``chunks``: four
    prompt chunks of equal length, one without an adapter."""
    if layout == "decode":
        return torch.randint(-1, num_slots, (tokens,), generator=g)
    chunk_slots = torch.tensor([0, -1, num_slots - 1, 1 % num_slots])
    return chunk_slots.repeat_interleave(-(-tokens // 4))[:tokens]


def _lora_float64(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, base: torch.Tensor | None = None,
                  scale: float = 1.0) -> torch.Tensor:
    """scale * x @ weights[slot].T (+ base) in float64, one adapter at a time, rounded to base's (or x's) dtype."""
    out = torch.zeros(x.shape[0], weights.shape[1], dtype=torch.float64) if base is None else base.double()
    for slot in slots.unique().tolist():
        if slot >= 0:
            rows = slots == slot
            out[rows] += scale * (x[rows].double() @ weights[slot].double().T)
    return out.to(x.dtype if base is None else base.dtype)


@DTYPES
@LORA_OPS
def test_lora_passes_the_conformance_checks(op, dtype, device, require_dot):
    """Decode and prefill steps, slot -1 among them, one token, a zero-padded adapter: against the reference."""
    require_dot(dtype)
    checks = pytest.importorskip("runtime_conformance.kernel_checks", reason="needs runtime-conformance")
    checks.CHECKS[op](getattr(kernels, op), dtype, device, torch.Generator().manual_seed(8))


@DTYPES
@pytest.mark.parametrize("tokens,in_features,rank,layout", [(3, 1000, 20, "decode"), (17, 64, 8, "decode"),
                                                            (300, 200, 16, "chunks"), (5, 96, 80, "decode")],
                         ids=["split-reduction", "two-tiles", "wide-tiles", "two-rank-tiles"])
def test_lora_shrink_tiles(tokens, in_features, rank, layout, dtype, device, require_dot):
    """A reduction split in slices (few tokens), ranks below tl.dot's 16 and over one tile, tiles that mix
    prompt chunks."""
    require_dot(dtype)
    g = torch.Generator().manual_seed(9)
    slots = _lora_slots(layout, tokens, 3, g)
    x = torch.randn(tokens, in_features, generator=g).to(dtype)
    lora_a = (torch.randn(3, rank, in_features, generator=g) * in_features ** -0.5).to(dtype)
    got = kernels.lora_shrink(x.to(device), lora_a.to(device), slots.to(device), 0.37)
    _close(got, _lora_float64(x, lora_a, slots, scale=0.37), dtype)


def test_lora_shrink_splits_few_tokens_over_many_programs():
    from runtime_triton.lora import shrink_splits

    assert shrink_splits(3, 1000, 128) == 8  # every 128-feature block its own program
    assert shrink_splits(16, 14336, 128) >= 16
    assert shrink_splits(8192, 4096, 128) == 1  # 128 tiles of 64 tokens fill the GPU alone


@DTYPES
@pytest.mark.parametrize("tokens,out_features,rank,layout", [(17, 200, 8, "decode"), (300, 130, 80, "chunks")],
                         ids=["two-tiles", "rank-over-one-block"])
def test_lora_expand_tiles(tokens, out_features, rank, layout, dtype, device, require_dot):
    require_dot(dtype)
    g = torch.Generator().manual_seed(10)
    slots = _lora_slots(layout, tokens, 3, g)
    shrunk = torch.randn(tokens, rank, generator=g).to(dtype)
    base = torch.randn(tokens, out_features, generator=g).to(dtype)
    lora_b = (torch.randn(3, out_features, rank, generator=g) * rank ** -0.5).to(dtype)
    got = kernels.lora_expand(shrunk.to(device), lora_b.to(device), slots.to(device), base.to(device))
    _close(got, _lora_float64(shrunk, lora_b, slots, base), dtype)
    assert torch.equal(got.cpu()[slots < 0], base[slots < 0])


def _lora_add_float64(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      slots: torch.Tensor, slices: list[int], scale: float) -> torch.Tensor:
    """lora_add's result per partition in float64: the shrunk values rounded to x's dtype, then y's
    columns plus their product, rounded once."""
    rank, start, out = lora_b.shape[2], 0, y.clone()
    for i, width in enumerate(slices):
        shrunk = _lora_float64(x, lora_a[:, i * rank:(i + 1) * rank], slots, scale=scale)
        out[:, start:start + width] = _lora_float64(shrunk, lora_b[:, start:start + width], slots, y[:, start:start + width])
        start += width
    return out


def _lora_add_inputs(tokens, in_features, slices, rank, layout, dtype, g, num_slots=3):
    slots = _lora_slots(layout, tokens, num_slots, g)
    x = torch.randn(tokens, in_features, generator=g).to(dtype)
    lora_a = (torch.randn(num_slots, len(slices) * rank, in_features, generator=g) * in_features ** -0.5).to(dtype)
    lora_b = (torch.randn(num_slots, sum(slices), rank, generator=g) * rank ** -0.5).to(dtype)
    y = torch.randn(tokens, sum(slices), generator=g).to(dtype)
    return slots, x, lora_a, lora_b, y


@DTYPES
@pytest.mark.parametrize("tokens,in_features,slices,rank,layout", [
    (1, 1000, [40, 24, 24], 8, "decode"),        # one token, the reduction in 8 slices; one tile spans 3 partitions
    (17, 200, [200, 72], 16, "decode"),          # two token tiles; a tile spans the partitions' boundary
    (300, 64, [130], 16, "chunks"),              # 64-token tiles of prompt chunks, one partition
    (5, 96, [30, 20, 10, 40, 50], 8, "decode"),  # more partitions than one launch tells apart: two groups
    (6, 300, [256, 128, 128], 80, "decode"),     # rank 80: shrink tiles of 64 across partitions, partial sums in 2 blocks
    (3, 130, [128, 256], 16, "chunks"),          # partitions on tile boundaries
], ids=["one-token-split", "two-tiles", "chunks", "groups", "rank-80", "aligned"])
def test_lora_add_tiles(tokens, in_features, slices, rank, layout, dtype, device, require_dot):
    """lora_add against float64: y changed in place, rows of slot -1 left bit for bit."""
    require_dot(dtype)
    g = torch.Generator().manual_seed(13)
    slots, x, lora_a, lora_b, y = _lora_add_inputs(tokens, in_features, slices, rank, layout, dtype, g)
    assert (slots >= 0).any()
    target = y.to(device, copy=True)
    got = kernels.lora_add(target, x.to(device), lora_a.to(device), lora_b.to(device), slots.to(device), slices, 0.37)
    assert got is target
    _close(target, _lora_add_float64(y, x, lora_a, lora_b, slots, slices, 0.37), dtype)
    assert torch.equal(target.cpu()[slots < 0], y[slots < 0])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_lora_add_row_does_not_depend_on_the_other_rows_adapters(dtype):
    """A decode step of 16 tokens over 8 adapters: each row's result is bit for bit the one it gets
    when every other row has no adapter (the expand adds other adapters' products as exact zeros)."""
    g = torch.Generator().manual_seed(21)
    slots, x, lora_a, lora_b, y = (t.cuda() for t in _lora_add_inputs(16, 4096, [512, 128, 128], 16, "decode",
                                                                      dtype, g, num_slots=8))
    slots = torch.arange(16, device="cuda", dtype=torch.int32) % 9 - 1  # every adapter and none
    together = kernels.lora_add(y.clone(), x, lora_a, lora_b, slots, [512, 128, 128], 0.5)
    for row in range(16):
        alone_slots = torch.full_like(slots, -1)
        alone_slots[row] = slots[row]
        alone = kernels.lora_add(y.clone(), x, lora_a, lora_b, alone_slots, [512, 128, 128], 0.5)
        assert torch.equal(alone[row], together[row]), f"row {row} (adapter {slots[row].item()})"


@DTYPES
def test_lora_add_into_a_strided_output(dtype, device, require_dot):
    """y a column slice of a wider tensor (rows not contiguous): added in place, the rest untouched."""
    require_dot(dtype)
    g = torch.Generator().manual_seed(14)
    slots, x, lora_a, lora_b, y = _lora_add_inputs(7, 64, [48, 16], 16, "decode", dtype, g)
    wide = torch.randn(7, 100, generator=g).to(dtype)
    wide[:, 10:74] = y
    target = wide.to(device, copy=True)
    kernels.lora_add(target[:, 10:74], x.to(device), lora_a.to(device), lora_b.to(device), slots.to(device), [48, 16], 1.0)
    _close(target[:, 10:74], _lora_add_float64(y, x, lora_a, lora_b, slots, [48, 16], 1.0), dtype)
    assert torch.equal(target.cpu()[:, :10], wide[:, :10]) and torch.equal(target.cpu()[:, 74:], wide[:, 74:])


@pytest.mark.parametrize("tokens,layout", [(1, "decode"), (16, "decode"), (256, "decode"), (2048, "chunks")])
@pytest.mark.parametrize("in_features,out_features", [(4096, 14336), (14336, 4096)], ids=["up", "down"])
@pytest.mark.parametrize("rank,num_slots", [(8, 1), (64, 8)])
@pytest.mark.gpu
@needs_gpu
def test_lora_model_sized_on_gpu(in_features, out_features, rank, num_slots, tokens, layout):
    """Llama-3-8B's MLP shapes at decode and prefill step sizes in bfloat16, against float64."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(11)
    slots = _lora_slots(layout, tokens, num_slots, g)
    x = torch.randn(tokens, in_features, generator=g).to(dtype)
    lora_a = (torch.randn(num_slots, rank, in_features, generator=g) * in_features ** -0.5).to(dtype)
    lora_b = (torch.randn(num_slots, out_features, rank, generator=g) * rank ** -0.5).to(dtype)
    base = torch.randn(tokens, out_features, generator=g).to(dtype)
    shrunk = kernels.lora_shrink(x.cuda(), lora_a.cuda(), slots.cuda(), 0.5)
    _close(shrunk, _lora_float64(x, lora_a, slots, scale=0.5), dtype)
    _close(kernels.lora_expand(shrunk, lora_b.cuda(), slots.cuda(), base.cuda()),
           _lora_float64(shrunk.cpu(), lora_b, slots, base), dtype)


@pytest.mark.gpu
@needs_gpu
def test_lora_in_a_cuda_graph_reads_each_replays_slots():
    """Captured once, the ops must follow the slots written into the graph's input before each replay."""
    g = torch.Generator().manual_seed(12)
    tokens, num_slots = 16, 4
    x = torch.randn(tokens, 512, generator=g).to(torch.bfloat16).cuda()
    lora_a = (torch.randn(num_slots, 16, 512, generator=g) * 512 ** -0.5).to(torch.bfloat16).cuda()
    lora_b = (torch.randn(num_slots, 1024, 16, generator=g) * 0.25).to(torch.bfloat16).cuda()
    base = torch.randn(tokens, 1024, generator=g).to(torch.bfloat16).cuda()
    slots = torch.full((tokens,), -1, device="cuda")
    kernels.lora_expand(kernels.lora_shrink(x, lora_a, slots, 2.0), lora_b, slots, base)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.lora_expand(kernels.lora_shrink(x, lora_a, slots, 2.0), lora_b, slots, base)
    for layout in ("decode", "chunks"):
        step = _lora_slots(layout, tokens, num_slots, g)
        slots.copy_(step.cuda())
        graph.replay()
        shrunk = OPS["lora_shrink"](x.cpu(), lora_a.cpu(), step, 2.0)
        expected = OPS["lora_expand"](shrunk, lora_b.cpu(), step, base.cpu())
        _close(out, expected, torch.bfloat16)


@pytest.mark.parametrize("tokens,layout", [(1, "decode"), (16, "decode"), (256, "decode"), (2048, "chunks")])
@pytest.mark.parametrize("slices", [[4096, 1024, 1024], [14336, 14336], [4096]], ids=["qkv", "gate_up", "o"])
@pytest.mark.parametrize("rank,num_slots", [(8, 1), (64, 8)])
@pytest.mark.gpu
@needs_gpu
def test_lora_add_model_sized_on_gpu(slices, rank, num_slots, tokens, layout):
    """Llama-3-8B's fused projections in bfloat16 at decode and prefill step sizes, against float64."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(15)
    slots, x, lora_a, lora_b, y = _lora_add_inputs(tokens, 4096, slices, rank, layout, dtype, g, num_slots)
    target = y.cuda()
    kernels.lora_add(target, x.cuda(), lora_a.cuda(), lora_b.cuda(), slots.cuda(), slices, 0.5)
    _close(target, _lora_add_float64(y, x, lora_a, lora_b, slots, slices, 0.5), dtype)
    assert torch.equal(target.cpu()[slots < 0], y[slots < 0])


@pytest.mark.gpu
@needs_gpu
def test_lora_add_in_a_cuda_graph_reads_each_replays_slots():
    """Captured once (two launches, no other op), lora_add follows the slots written before each replay,
    and repeated replays on the same inputs give the same bits (the partial sums are added in a fixed order)."""
    g = torch.Generator().manual_seed(16)
    tokens, num_slots, slices = 16, 4, [1024, 256, 256]
    slots_host, x, lora_a, lora_b, y = _lora_add_inputs(tokens, 512, slices, 16, "decode", torch.bfloat16, g, num_slots)
    x, lora_a, lora_b = x.cuda(), lora_a.cuda(), lora_b.cuda()
    target = y.cuda()
    slots = torch.full((tokens,), -1, device="cuda")
    kernels.lora_add(target, x, lora_a, lora_b, slots, slices, 2.0)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.lora_add(target, x, lora_a, lora_b, slots, slices, 2.0)
    for layout in ("decode", "chunks"):
        step = _lora_slots(layout, tokens, num_slots, g)
        slots.copy_(step.cuda())
        results = []
        for _ in range(2):
            target.copy_(y.cuda())
            graph.replay()
            results.append(target.cpu())
        expected = OPS["lora_add"](y.clone(), x.cpu(), lora_a.cpu(), lora_b.cpu(), step, slices, 2.0)
        _close(results[0], expected, torch.bfloat16)
        assert torch.equal(results[0], results[1])


def _linear_lora_float64(x, weight, bias, lora_a, lora_b, slots, slices, scale) -> torch.Tensor:
    """The projection and every partition's adapter product in float64, rounded once to x's dtype."""
    out = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    rank, start = lora_b.shape[2], 0
    for i, width in enumerate(slices):
        for slot in slots.unique().tolist():
            if slot >= 0:
                rows = slots == slot
                shrunk = scale * x[rows].double() @ lora_a[slot, i * rank:(i + 1) * rank].double().T
                out[rows, start:start + width] += shrunk @ lora_b[slot, start:start + width].double().T
        start += width
    return out.to(x.dtype)


@DTYPES
@pytest.mark.parametrize("tokens,in_features,slices,rank,layout,bias", [
    (1, 1000, [40, 24, 24], 8, "decode", False),   # one token, the shrink in 8 slices; a tile spans 3 partitions
    (7, 200, [200, 72], 16, "decode", True),       # a tile across the partitions' boundary, a bias
    (16, 96, [64], 16, "chunks", False),           # 16 rows, runs of tokens on one adapter
    (6, 300, [256, 128, 128], 80, "decode", True),  # rank 80: partial sums in 2 blocks, ranks past one step
    (5, 96, [30, 20, 10, 40, 50], 8, "decode", False),  # more partitions than one launch tells apart: two ops
    (17, 64, [48, 16], 16, "decode", True),        # past the skinny kernel's 16 rows: linear, then lora_add
], ids=["one-token-split", "two-partitions", "sixteen-rows", "rank-80", "groups", "seventeen-rows"])
def test_linear_lora_tiles(tokens, in_features, slices, rank, layout, bias, dtype, device, require_dot):
    """linear_lora against float64; rows without an adapter bit for bit the projection alone."""
    require_dot(dtype)
    g = torch.Generator().manual_seed(17)
    slots, x, lora_a, lora_b, _ = _lora_add_inputs(tokens, in_features, slices, rank, layout, dtype, g)
    if tokens > 1:
        slots[tokens // 2] = -1  # a row without an adapter beside the others
    assert (slots >= 0).any()
    weight = (torch.randn(sum(slices), in_features, generator=g) * in_features ** -0.5).to(dtype)
    b = torch.randn(sum(slices), generator=g).to(dtype) if bias else None
    on = [t.to(device) for t in (x, weight)] + [None if b is None else b.to(device)]
    got = kernels.linear_lora(*on, lora_a.to(device), lora_b.to(device), slots.to(device), slices, 0.37)
    _close(got, _linear_lora_float64(x, weight, b, lora_a, lora_b, slots, slices, 0.37), dtype)
    alone = skinny.linear(*on, plan=PLANS.skinny_matmul)
    assert torch.equal(got.cpu()[slots < 0], alone.cpu()[slots < 0])


def test_linear_lora_adds_the_adapters_in_the_projections_launch(monkeypatch):
    """Up to 16 rows of a 16-bit weight no expand kernel runs (the skinny matmul adds the products);
    past 16 rows, and past one row of a weight over FUSED_MAX_WEIGHT elements, linear_lora is linear
    and then lora_add's two launches."""
    lora = pytest.importorskip("runtime_triton.lora")
    expands = []
    original = lora._two_launch_add
    monkeypatch.setattr(lora, "_two_launch_add", lambda *args: expands.append(args[0].shape[0]) or original(*args))
    g = torch.Generator().manual_seed(18)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight = (torch.randn(64, 64, generator=g) * 0.125).to(torch.float16)
    for tokens, fused_max in ((16, 4096), (17, 4096), (1, 4095), (2, 4095)):
        monkeypatch.setattr(lora, "FUSED_MAX_WEIGHT", fused_max)
        slots, x, lora_a, lora_b, _ = _lora_add_inputs(tokens, 64, [48, 16], 16, "decode", torch.float16, g)
        got = kernels.linear_lora(x.to(device), weight.to(device), None, lora_a.to(device), lora_b.to(device),
                                  slots.to(device), [48, 16], 1.0)
        _close(got, _linear_lora_float64(x, weight, None, lora_a, lora_b, slots, [48, 16], 1.0), torch.float16)
    assert expands == [17, 2]


def test_linear_lora_shrink_leaves_its_tickets_at_zero(device):
    """The shrink's last program of a tile adds the partial sums and resets the tile's counter: the
    counters are all zero after a call, and the same call again gives the same bits."""
    from runtime_triton.tickets import TICKETS

    g = torch.Generator().manual_seed(22)
    slots, x, lora_a, lora_b, _ = _lora_add_inputs(3, 1000, [40, 24, 24], 80, "decode", torch.float16, g)
    weight = (torch.randn(88, 1000, generator=g) * 1000 ** -0.5).to(torch.float16)
    args = [t.to(device) for t in (x, weight)] + [None] + [t.to(device) for t in (lora_a, lora_b, slots)]
    first = kernels.linear_lora(*args, [40, 24, 24], 0.37)
    assert int(TICKETS[first.device].count_nonzero()) == 0
    assert torch.equal(first, kernels.linear_lora(*args, [40, 24, 24], 0.37))
    _close(first, _linear_lora_float64(x, weight, None, lora_a, lora_b, slots, [40, 24, 24], 0.37), torch.float16)


@pytest.mark.parametrize("release_after_products", [False, True], ids=["release-at-start", "release-after-products"])
@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("slices", [[4096, 1024, 1024], [14336, 14336], [4096]], ids=["qkv", "gate_up", "o"])
@pytest.mark.gpu
@needs_gpu
def test_linear_lora_model_sized_on_gpu(slices, tokens, release_after_products, monkeypatch):
    """Llama-3-8B's fused projections in bfloat16 at decode sizes, 8 adapters of rank 16, against
    float64; the projection let launch at the shrink's start or once it has its products (on GPUs
    with programmatic dependent launches: the projection waits for the shrink's sums either way)."""
    from runtime_triton import lora

    monkeypatch.setattr(lora, "RELEASE_AFTER_PRODUCTS", release_after_products)
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(19)
    slots, x, lora_a, lora_b, _ = _lora_add_inputs(tokens, 4096, slices, 16, "decode", dtype, g, num_slots=8)
    weight = (torch.randn(sum(slices), 4096, generator=g) * 4096 ** -0.5).to(dtype)
    got = kernels.linear_lora(x.cuda(), weight.cuda(), None, lora_a.cuda(), lora_b.cuda(), slots.cuda(), slices, 0.5)
    _close(got, _linear_lora_float64(x, weight, None, lora_a, lora_b, slots, slices, 0.5), dtype)


@pytest.mark.gpu
@needs_gpu
def test_linear_lora_in_a_cuda_graph_reads_each_replays_slots():
    """Captured once, the fused projection follows the slots written before each replay."""
    g = torch.Generator().manual_seed(20)
    tokens, slices = 16, [1024, 256, 256]
    _, x, lora_a, lora_b, _ = _lora_add_inputs(tokens, 512, slices, 16, "decode", torch.bfloat16, g, num_slots=4)
    weight = (torch.randn(sum(slices), 512, generator=g) * 512 ** -0.5).to(torch.bfloat16)
    x, weight, lora_a, lora_b = x.cuda(), weight.cuda(), lora_a.cuda(), lora_b.cuda()
    slots = torch.full((tokens,), -1, device="cuda")
    kernels.linear_lora(x, weight, None, lora_a, lora_b, slots, slices, 2.0)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.linear_lora(x, weight, None, lora_a, lora_b, slots, slices, 2.0)
    for layout in ("decode", "chunks"):
        step = _lora_slots(layout, tokens, 4, g)
        slots.copy_(step.cuda())
        graph.replay()
        _close(out, _linear_lora_float64(x.cpu(), weight.cpu(), None, lora_a.cpu(), lora_b.cpu(), step, slices, 2.0),
               torch.bfloat16)


@pytest.mark.parametrize("vocab,rows", [(100, [4, 0, 2]), (70, [1]), (3000, [0, 5, 2, 3])])
def test_apply_token_bitmask(vocab, rows, device):
    """Masks with the sign bit, words all ones and all zeros, a vocabulary ending mid-word."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, vocab, generator=g)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[0, 0] = -1
    bitmask[-1, -1] = 0
    index = torch.tensor(rows)
    expected = OPS["apply_token_bitmask"](logits.clone(), bitmask, index)
    got = logits.to(device)
    assert kernels.apply_token_bitmask(got, bitmask.to(device), index.to(device)) is got
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("capacity,vocab,k,min_n,max_n", [(48, 3, 4, 1, 3), (700, 5, 5, 2, 5), (90, 2, 1, 1, 1)])
def test_propose_ngram_batched(capacity, vocab, k, min_n, max_n, device):
    """Row by row against the host's proposer (``propose_ngram``, numpy) on each row's tokens:
    lengths from 1 to the full width, and past each row's length tokens that would continue its
    longest match (a kernel that reads them proposes differently)."""
    import numpy as np

    from runtime.spec.ngram import propose_ngram
    g = torch.Generator().manual_seed(capacity)
    for _ in range(4):
        batch = 7
        history = torch.randint(0, vocab, (batch, capacity), generator=g)
        lengths = torch.randint(1, capacity + 1, (batch,), generator=g)
        lengths[0], lengths[-1] = 1, capacity
        for row, length in enumerate(lengths.tolist()):
            history[row, length:] = history[row, length - 1]
        proposals, counts = kernels.propose_ngram_batched(history.to(device), lengths.to(device), k, min_n, max_n)
        assert proposals.shape == (batch, k) and proposals.dtype == torch.int64
        for row, length in enumerate(lengths.tolist()):
            expected = propose_ngram(np.asarray(history[row, :length]), k, min_n, max_n)
            assert counts[row].item() == len(expected)
            assert proposals[row].tolist() == expected + [0] * (k - len(expected))


@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "linear"])
def test_a_dependent_kernel_reads_its_input_only_after_the_launch_before_it_ends(op, device):
    """On sm_90 and later these kernels are launched as programmatic dependents
    (``runtime_triton/dependent.py``): they may start while the launch before runs. Here that
    launch releases its dependents at once and writes the input (zeros until then) after about a
    millisecond of arithmetic: a kernel reading it before its wait computes on zeros."""
    from runtime_triton.dependent import dependent_launches

    if device.type != "cuda" or not dependent_launches(device):
        pytest.skip("programmatic dependent launches need an NVIDIA GPU of sm_90 or later")
    from late_launch import late_copy

    g = torch.Generator().manual_seed(8)
    dtype = torch.bfloat16
    tokens, heads, kv_heads, head_size = 3, 32, 8, 128
    others = {"weight": (1 + 0.1 * torch.randn(4096, generator=g)).to(dtype),
              "residual": _rows(g, tokens, 4096).to(dtype),
              "positions": torch.randint(0, 1024, (tokens,), generator=g),
              "cos_sin": build_cos_sin_cache(head_size, 10000.0, 1024, None),
              "projection": (0.02 * torch.randn(6144, 4096, generator=g)).to(dtype)}

    def rotary(reference, t, o):
        q, k, _ = t.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
        return reference(o["positions"], q.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size),
                         o["cos_sin"])

    calls = {  # op: (the input the launch before writes, the op on it and the other inputs)
        "rms_norm": (_rows(g, tokens, 4096), lambda f, x, o: f(x, o["weight"], 1e-6)),
        "fused_add_rms_norm": (_rows(g, tokens, 4096), lambda f, x, o: f(x, o["residual"], o["weight"], 1e-6)),
        "silu_and_mul": (3 * torch.randn(tokens, 2 * 14336, generator=g), lambda f, x, o: f(x)),
        "rotary_embedding": (torch.randn(tokens, (heads + 2 * kv_heads) * head_size, generator=g), rotary),
        "linear": (torch.randn(1, 4096, generator=g), lambda f, x, o: f(x, o["projection"], None)),
    }
    source, call = calls[op]
    source = source.to(dtype)
    expected = call(OPS[op], source, others)
    expected = expected if isinstance(expected, tuple) else (expected,)
    # Everything on the device before the late launch: a copy between it and the op would wait for it.
    others, source = {name: t.to(device) for name, t in others.items()}, source.to(device)
    for _ in range(3):
        late = torch.zeros(source.shape, dtype=dtype, device=device)
        late_copy(source, late)
        got = call(getattr(kernels, op), late, others)
        for got_part, expected_part in zip(got if isinstance(got, tuple) else (got,), expected):
            _close(got_part, expected_part, dtype)
