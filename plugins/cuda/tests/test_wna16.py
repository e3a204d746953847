"""The W4A16/W8A16 Triton GEMM (runtime_triton.wna16) against the float64 product with the weight
dequantized by its format's definition: on a GPU, or on the CPU under Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from runtime.platform.packed import GroupQuantData

wna16 = pytest.importorskip("runtime_triton.wna16")
from runtime_triton.dependent import dependent_launches  # noqa: E402
from runtime_triton.tickets import TICKETS  # noqa: E402


def _group_quant(n: int, k: int, bits: int, group: int, act_order: bool, seed: int, zero_point: int | None = None,
                 offsets: bool = False) -> GroupQuantData:
    """Random zero points a group, or ``zero_point`` for all (symmetric schemes, GGUF); ``offsets``:
    a random offset a group added after scaling (GGUF's minimums)."""
    g = torch.Generator().manual_seed(seed)
    levels = 2 ** bits
    q = torch.randint(0, levels, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half()
    zeros = torch.randint(0, levels, (n, k // group), generator=g).float()
    if zero_point is not None:
        zeros = torch.full_like(zeros, zero_point)
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32) if act_order else None
    shift = (torch.rand(n, k // group, generator=g) - 0.5) * 0.3 if offsets else None
    return GroupQuantData(q, scales, zeros, bits, group, g_idx, offsets=shift)


CASES = [  # rows, n, k, bits, group, act-order, tiles (None: the op's own plan)
    (1, 48, 256, 4, 128, False, None),
    (20, 64, 256, 4, 64, False, None),
    (70, 48, 256, 4, 128, True, None),
    # A few rows: on Hopper the weight-first Gluon kernel's 8-row tile; the pairs kernel for K tiles it
    # cannot split evenly (5) and for 8-bit weights.
    (5, 72, 1024, 4, 128, False, None),
    (12, 64, 640, 4, 128, True, None),
    (9, 64, 1024, 8, 128, False, None),
    (5, 40, 256, 4, 32, True, dict(block_m=16, block_n=32, block_k=64, split_k=3, num_warps=4, num_stages=2)),
    (3, 64, 192, 8, 64, False, dict(block_m=16, block_n=64, block_k=64, split_k=2, num_warps=4, num_stages=2)),
    (37, 72, 128, 4, 64, False, dict(block_m=32, block_n=32, block_k=32, split_k=1, num_warps=4, num_stages=2)),
    # Words read once and spread in registers; K tiles inside one group and across groups.
    (5, 40, 256, 4, 32, True, dict(block_m=16, block_n=32, block_k=32, split_k=3, num_warps=4, num_stages=2,
                                    words_once=True)),
    (3, 64, 192, 8, 64, False, dict(block_m=16, block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=2,
                                     words_once=True)),
    # On the vector units, a row a program: one row; a few rows with act-order, groups smaller than
    # the K tile (a scale and zero point per word row) and the split's partial sums added by the
    # last program of each tile (N not a whole number of tiles); 8 bits; K not a whole number of
    # tiles per split.
    (1, 72, 256, 4, 128, False, dict(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=2, gemv=True)),
    (3, 40, 256, 4, 32, True, dict(block_n=32, block_k=128, split_k=2, num_warps=4, num_stages=2, gemv=True)),
    (2, 64, 192, 8, 64, False, dict(block_n=64, block_k=64, split_k=3, num_warps=4, num_stages=2, gemv=True)),
    (1, 48, 512, 4, 64, True, dict(block_n=32, block_k=64, split_k=3, num_warps=4, num_stages=2, gemv=True)),
    # K tiles deeper than a group (a scale and zero point per word row).
    (1, 64, 768, 4, 128, False, dict(block_n=32, block_k=256, split_k=2, num_warps=4, num_stages=1, gemv=True)),
    # More splits than K tiles: the last split has none to read, and still takes its ticket.
    (1, 64, 128, 4, 128, False, dict(block_n=64, block_k=64, split_k=3, num_warps=4, num_stages=1, gemv=True)),
    # Each K tile requested a tile ahead: splits of one to three tiles, some with none; tiles inside
    # a group and across groups.
    (1, 48, 512, 4, 64, True, dict(block_n=32, block_k=64, split_k=3, num_warps=4, num_stages=1, gemv=True,
                                   prefetch=True)),
    (2, 64, 768, 4, 128, False, dict(block_n=32, block_k=256, split_k=2, num_warps=4, num_stages=1, gemv=True,
                                     prefetch=True)),
    (1, 64, 128, 4, 128, False, dict(block_n=64, block_k=64, split_k=3, num_warps=4, num_stages=1, gemv=True,
                                     prefetch=True)),
    # Levels biased by 2**bits, the zero point taken off once a word row from the row's sums: tiles
    # inside a group and across groups, 4 and 8 bits (the values taken from the high half of a
    # word), act-order, split K with an empty split, a tile requested ahead.
    (1, 72, 256, 4, 128, False, dict(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=2, gemv=True,
                                     zero_from_sums=True)),
    (3, 40, 256, 4, 32, True, dict(block_n=32, block_k=128, split_k=2, num_warps=4, num_stages=2, gemv=True,
                                   zero_from_sums=True)),
    (2, 64, 192, 8, 64, False, dict(block_n=64, block_k=64, split_k=3, num_warps=4, num_stages=2, gemv=True,
                                    zero_from_sums=True)),
    (1, 64, 128, 4, 128, False, dict(block_n=64, block_k=64, split_k=3, num_warps=4, num_stages=1, gemv=True,
                                     zero_from_sums=True)),
    (2, 64, 768, 4, 128, False, dict(block_n=32, block_k=256, split_k=2, num_warps=4, num_stages=1, gemv=True,
                                     prefetch=True, zero_from_sums=True)),
    # Two values a register in the activations' 16-bit type (float32 activations take the dense
    # path): rows and columns not whole tiles, act-order, 8 bits (float16 only), K split (into
    # uneven spans; one with no K tile).
    (70, 48, 256, 4, 64, True, dict(pairs=True, block_m=32, block_n=32, block_k=64, num_warps=4, num_stages=2)),
    (37, 72, 256, 8, 64, False, dict(pairs=True, block_m=16, block_n=64, block_k=32, num_warps=4, num_stages=2)),
    (5, 40, 256, 4, 32, True, dict(pairs=True, block_m=16, block_n=32, block_k=32, split_k=3, num_warps=4,
                                   num_stages=2)),
    (1, 64, 128, 4, 64, False, dict(pairs=True, block_m=16, block_n=64, block_k=64, split_k=3, num_warps=4,
                                    num_stages=2)),
    # The same with the weight as the first operand (the transposed product, stored transposed back).
    (70, 72, 256, 4, 64, True, dict(pairs=True, weight_first=True, block_m=32, block_n=64, block_k=64, num_warps=4,
                                    num_stages=2)),
    (37, 64, 256, 8, 64, False, dict(pairs=True, weight_first=True, block_m=16, block_n=64, block_k=32, num_warps=4,
                                     num_stages=2)),
    (5, 40, 256, 4, 32, True, dict(pairs=True, weight_first=True, block_m=16, block_n=32, block_k=32, split_k=3,
                                   num_warps=4, num_stages=2)),
    # Dequantized once, then the library's GEMM; act-order rows gathered the same way.
    (37, 72, 256, 4, 32, True, dict(dense=True)),
    (9, 64, 192, 8, 64, False, dict(dense=True)),
]


# One zero point for every group (a constant of the kernel), and with GGUF's offsets: each kernel
# (vector and tensor-core tiles, words read once, split K, groups smaller than
# a tile and than a word row's reach, the dense path), 4 and 8 bits, groups of 16 and 32 as GGUF's.
UNIFORM_CASES = [
    (1, 72, 256, 4, 32, False, dict(block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=2, gemv=True,
                                    zero_from_sums=True)),
    (2, 64, 192, 8, 16, False, dict(block_n=64, block_k=64, split_k=3, num_warps=4, num_stages=2, gemv=True)),
    (1, 48, 512, 4, 16, False, dict(block_n=32, block_k=64, split_k=3, num_warps=4, num_stages=1, gemv=True,
                                    prefetch=True, zero_from_sums=True)),
    (1, 64, 256, 8, 32, False, dict(block_n=64, block_k=64, split_k=1, num_warps=4, num_stages=1, gemv=True,
                                    prefetch=True)),
    (5, 40, 256, 4, 32, False, dict(block_m=16, block_n=32, block_k=64, split_k=3, num_warps=4, num_stages=2,
                                    words_once=True)),
    (20, 64, 256, 4, 64, True, dict(block_m=16, block_n=64, block_k=32, split_k=2, num_warps=4, num_stages=2)),
    (70, 48, 256, 4, 16, False, None),
    (1, 48, 256, 8, 32, False, None),
    (9, 64, 192, 8, 32, False, dict(dense=True)),
    (20, 64, 256, 4, 32, False, dict(pairs=True, block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)),
    # Groups smaller than the K tile: the dense path.
    (9, 64, 128, 4, 16, False, dict(pairs=True, block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)),
]


ZERO_KINDS = {"zeros": (None, False), "zero-point": (8, False), "offsets": (0, True)}
"""Zero points a group; one for every group; one for every group and an offset a group."""


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
@pytest.mark.parametrize("rows,n,k,bits,group,act_order,tiles,zero_point,offsets", [
    pytest.param(*case, *ZERO_KINDS[kind], id=f"{name}{i}-{kind}")
    for name, cases, kinds in (("case", CASES, ZERO_KINDS), ("uniform", UNIFORM_CASES, ("zero-point", "offsets")))
    for i, case in enumerate(cases) for kind in kinds])
def test_wna16_matches_float64_dequantized_product(rows, n, k, bits, group, act_order, tiles, zero_point, offsets, dtype,
                                                   device, require_dot):
    require_dot(dtype)
    data = _group_quant(n, k, bits, group, act_order, seed=rows, zero_point=zero_point, offsets=offsets)
    assert wna16.supports(data)
    weight = wna16.repack(data, dtype, device)
    assert weight.qweight.numel() * 4 == n * k * bits // 8  # packed: bits a weight, no dense copy
    assert (weight.zeros is None) == (zero_point is not None) and (weight.offsets is not None) == offsets
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    expected = x.double() @ data.dequantize(torch.float64).T + bias.double()
    got = wna16.matmul(weight, x.to(device), bias.to(device), **(tiles or {})).cpu()
    assert got.dtype == dtype and got.shape == (rows, n)
    # Weights rounded to the activations' dtype once, products accumulated in float32.
    step = {torch.float16: 2 ** -10, torch.float32: 2 ** -20}[dtype]
    allowed = 2 * step * (x.double().abs() @ data.dequantize(torch.float64).abs().T + bias.double().abs()) + 1e-6
    assert bool(((got.double() - expected).abs() <= allowed).all()), ((got.double() - expected).abs() / allowed).max()


@pytest.mark.parametrize("weight_first", [False, True], ids=["weight-second", "weight-first"])
@pytest.mark.parametrize("zero_point,offsets", list(ZERO_KINDS.values()), ids=list(ZERO_KINDS))
@pytest.mark.parametrize("act_order", [False, True], ids=["ordered", "act-order"])
def test_pairs_in_bfloat16_match_the_float64_product(zero_point, offsets, act_order, weight_first, device, require_dot):
    """In bfloat16 ``pairs`` reads its levels with 128's bits (float16 above: 1024's) and rounds
    ``(q - zero) * scale`` once, as the dense path does (with offsets once more, for the addition):
    both products within two roundings of the float64 one."""
    require_dot(torch.bfloat16)
    data = _group_quant(96, 512, 4, 128, act_order, seed=11, zero_point=zero_point, offsets=offsets)
    weight = wna16.repack(data, torch.bfloat16, device)
    x = torch.randn(130, 512, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    got = wna16.matmul(weight, x, pairs=True, weight_first=weight_first, block_m=64, block_n=64, block_k=64,
                       num_warps=4, num_stages=3).double()
    dense = wna16.matmul(weight, x, dense=True).double()
    exact = x.double() @ data.dequantize(torch.float64).to(device).T
    bound = 2 * 2 ** -8 * (x.double().abs() @ data.dequantize(torch.float64).to(device).abs().T) + 1e-6
    assert bool(((got - exact).abs() <= bound).all())
    assert bool(((got - dense).abs() <= bound).all())


def _skip_unless_hopper(device: torch.device) -> None:
    """The Gluon kernel (``wgmma`` plans) runs only on Hopper: not under the interpreter."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        pytest.skip("the Gluon kernel is written for Hopper (sm_90) GPUs")


WGMMA_PLANS = {  # id: (plan, K, activation dtype)
    "64x128": (dict(wgmma=True, block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4), 1024, torch.bfloat16),
    "128x128": (dict(wgmma=True, block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4), 1024,
                torch.bfloat16),
    "128x256": (dict(wgmma=True, block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3), 1024,
                torch.bfloat16),
    # Fewer K tiles than the copies started ahead.
    "few-k-tiles": (dict(wgmma=True, block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=5), 256,
                    torch.bfloat16),
    # K split 3 ways (16 K tiles: 6, 6 and 4), and 3 ways over 2 tiles (the last split has none and
    # still takes its ticket; with overlap the launcher splits 2 ways).
    "split-3": (dict(wgmma=True, block_m=64, block_n=128, block_k=64, split_k=3, num_warps=4, num_stages=4), 1024,
                torch.bfloat16),
    "empty-split": (dict(wgmma=True, block_m=128, block_n=64, block_k=128, split_k=3, num_warps=8, num_stages=3), 256,
                    torch.bfloat16),
    # float16's levels (1024's bits).
    "float16": (dict(wgmma=True, block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4), 1024,
                torch.float16),
    # An odd number of K tiles (weight first: the launcher takes the other kernel).
    "odd-k-tiles": (dict(wgmma=True, block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=4), 384,
                    torch.bfloat16),
}


@pytest.mark.parametrize("plan,k,dtype", list(WGMMA_PLANS.values()), ids=list(WGMMA_PLANS))
@pytest.mark.parametrize("zero_point,offsets", list(ZERO_KINDS.values()), ids=list(ZERO_KINDS))
@pytest.mark.parametrize("act_order", [False, True], ids=["ordered", "act-order"])
@pytest.mark.parametrize("form", [{}, {"overlap": True}, {"weight_first": True}],
                         ids=["first-tile-in-loop", "overlap", "weight-first"])
def test_wgmma_kernel_matches_the_float64_product(plan, k, dtype, zero_point, offsets, act_order, form, device):
    """The Gluon kernels for many rows (wna16_wgmma.py: copies started tiles ahead, the dequantized
    weight in two alternating buffers, a tile's matrix instructions left running while the next is
    dequantized; with ``overlap`` the first tile apart, its instructions not adding to the zeroed
    sums, and K split no finer than its tiles; with ``weight_first`` the weight dequantized into
    the registers the instructions read, two sets of them in turn, K split into even numbers of
    tiles) round as ``pairs`` does: within two roundings of the float64 product and of the dense
    path, with rows and columns that fill no whole tile (masked copies and stores) and K many times
    the pipeline's depth (a buffer or registers reused before their time would show)."""
    _skip_unless_hopper(device)
    plan = {**plan, **form}
    data = _group_quant(200, k, 4, 128, act_order, seed=13, zero_point=zero_point, offsets=offsets)
    weight = wna16.repack(data, dtype, device)
    x = torch.randn(130, k, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    got = wna16.matmul(weight, x, **plan).double()
    dense = wna16.matmul(weight, x, dense=True).double()
    reference = data.dequantize(torch.float64).to(device)
    exact = x.double() @ reference.T
    step = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    bound = 2 * step * (x.double().abs() @ reference.abs().T) + 1e-6
    assert bool(((got - exact).abs() <= bound).all()), ((got - exact).abs() / bound).max()
    assert bool(((got - dense).abs() <= bound).all())


@pytest.mark.parametrize("rows,block_m,block_n,block_k,split,stages", [
    (1, 8, 64, 128, 4, 4), (3, 8, 128, 64, 2, 5), (8, 8, 64, 64, 1, 4), (13, 16, 64, 128, 2, 4),
    (40, 16, 128, 64, 4, 5), (130, 64, 256, 64, 1, 5), (70, 64, 256, 64, 2, 4)])
@pytest.mark.parametrize("zero_point,offsets", list(ZERO_KINDS.values()), ids=list(ZERO_KINDS))
@pytest.mark.parametrize("act_order", [False, True], ids=["ordered", "act-order"])
def test_weight_first_kernel_narrow_and_wide_tiles_match_the_float64_product(rows, block_m, block_n, block_k, split,
                                                                              stages, zero_point, offsets, act_order,
                                                                              device):
    """The weight-first Gluon kernel with 8- and 16-row tiles (the matrix instructions' narrowest
    second operand, for decode at a few rows) and with four warpgroups' columns (256, 16 warps):
    rows that fill part of a tile or several tiles, 200 columns (part of a 256-column tile), K split
    into even numbers of tiles, within two roundings of the float64 product as the other plans."""
    _skip_unless_hopper(device)
    k = 1024
    data = _group_quant(200, k, 4, 128, act_order, seed=17, zero_point=zero_point, offsets=offsets)
    weight = wna16.repack(data, torch.bfloat16, device)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(device, torch.bfloat16)
    got = wna16.matmul(weight, x, wgmma=True, weight_first=True, block_m=block_m, block_n=block_n, block_k=block_k,
                       split_k=split, num_warps=block_n // 16, num_stages=stages).double()
    reference = data.dequantize(torch.float64).to(device)
    exact = x.double() @ reference.T
    bound = 2 * 2 ** -8 * (x.double().abs() @ reference.abs().T) + 1e-6
    assert bool(((got - exact).abs() <= bound).all()), ((got - exact).abs() / bound).max()


@pytest.mark.parametrize("bits,group,dtype,pairs", [
    (4, 128, torch.bfloat16, True), (4, 128, torch.float16, True), (8, 128, torch.float16, True),
    (8, 128, torch.bfloat16, False), (4, 32, torch.bfloat16, False), (4, 64, torch.float16, False),
    (4, 128, torch.float32, False)])
@pytest.mark.parametrize("rows", [2, 16, 40, 64])
@pytest.mark.parametrize("hopper", [False, True], ids=["other-gpu", "hopper"])
def test_the_op_picks_the_pairs_kernel_only_for_weights_it_takes(bits, group, dtype, pairs, rows, hopper,
                                                                 monkeypatch):
    """From 2 to 64 rows the op's own plan multiplies on the pairs kernel where it takes the weight
    (16-bit activations that hold its levels, groups of at least its 128-deep K tile), and on the
    tile kernel otherwise (not the dense path, which ``_pairs`` falls back to); on Hopper the pairs
    kernel's place goes to the Gluon kernel (``wgmma``), for the same weights only."""
    called = []

    def pairs_kernel(weight, x, tiles):
        called.append("wgmma" if tiles.get("wgmma") else "pairs")
        return x.new_zeros(len(x), 64)

    monkeypatch.setattr(wna16, "_pairs", pairs_kernel)
    monkeypatch.setattr(wna16, "_tiled", lambda weight, x, tiles: called.append("tiled") or x.new_zeros(len(x), 64))
    monkeypatch.setattr(wna16, "_hopper", lambda device: hopper)
    weight = wna16.repack(_group_quant(64, 256, bits, group, False, seed=0), dtype, torch.device("cpu"))
    wna16.matmul(weight, torch.zeros(rows, 256, dtype=dtype))
    assert called == ["tiled" if not pairs else "wgmma" if hopper else "pairs"]


def _record_launches(monkeypatch) -> list[tuple[str, int]]:
    """The Gluon and pairs kernels replaced by stand-ins that note each launch: the kernel ("overlap"
    for the shared-memory one with its first K tile apart) and its split."""
    from runtime_triton import wna16_wgmma

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, SPLIT_K, OVERLAP=False, **kwargs: launches.append(
                (self.name if self.name == "weight first" or not OVERLAP else "overlap", SPLIT_K))

    monkeypatch.setattr(wna16_wgmma, "wna16_wgmma_kernel", Recorder("shared"))
    monkeypatch.setattr(wna16_wgmma, "wna16_wgmma_weight_first_kernel", Recorder("weight first"))
    monkeypatch.setattr(wna16, "_wna16_pairs_kernel", Recorder("pairs"))
    return launches


@pytest.mark.parametrize("bits,dtype,k,block_m,block_n,block_k,split,launched", [
    (4, torch.bfloat16, 1024, 64, 64, 64, 1, ("weight first", 1)),  # 16 K tiles
    (4, torch.bfloat16, 1024, 64, 128, 64, 3, ("weight first", 3)),  # 6, 6 and 4
    (4, torch.bfloat16, 768, 64, 64, 128, 4, ("weight first", 3)),  # 6 tiles: 2, 2, 2 and none; then 2, 2, 2
    (4, torch.bfloat16, 256, 64, 64, 128, 2, ("weight first", 1)),  # 2 tiles: 1 and 1; then both
    (4, torch.bfloat16, 384, 64, 64, 128, 1, ("overlap", 1)),  # 3 tiles
    (4, torch.bfloat16, 640, 64, 64, 128, 2, ("overlap", 2)),  # 5 tiles: 3 and 2, odd either way
    (8, torch.float16, 1024, 64, 64, 64, 1, ("overlap", 1)),  # 8-bit words hold two pairs, not four
    (4, torch.bfloat16, 1024, 64, 256, 64, 1, ("weight first", 1)),  # four warpgroups' columns
    (4, torch.bfloat16, 1024, 128, 256, 64, 1, ("overlap", 1)),  # four, on 128 rows: past 128 registers
    (4, torch.bfloat16, 1024, 64, 512, 64, 1, ("overlap", 1)),  # eight: more warps than a program may have
    (4, torch.bfloat16, 1024, 8, 64, 128, 4, ("weight first", 4)),  # 8 tiles: 2 each
    (4, torch.bfloat16, 640, 8, 64, 128, 2, ("pairs", 2)),  # 5 tiles, on a tile narrower than the shared kernel's
    (8, torch.float16, 1024, 16, 64, 128, 4, ("pairs", 4)),  # 8-bit words, likewise
])
def test_weight_first_gluon_plans_launch_with_every_split_even(bits, dtype, k, block_m, block_n, block_k, split,
                                                               launched, monkeypatch):
    """The weight-first Gluon kernel takes K tiles two at a time in every split: the launcher splits
    K no finer than the plan asks into parts of an even number of tiles, at least 2 (as the
    kernel's programs divide them, the last taking what is left), and otherwise, as for 8-bit
    weights and other widths, launches the shared-memory kernel with the first tile apart, or for
    tiles of fewer than its 64 rows the pairs kernel."""
    launches = _record_launches(monkeypatch)
    weight = wna16.repack(_group_quant(block_n, k, bits, 128, False, seed=0), dtype, torch.device("cpu"))
    wna16.matmul(weight, torch.zeros(70, k, dtype=dtype), wgmma=True, weight_first=True, block_m=block_m,
                 block_n=block_n, block_k=block_k, split_k=split, num_warps=block_n // 16, num_stages=3)
    assert launches == [launched]


@pytest.mark.parametrize("block_m,launched", [(8, ["pairs"]), (16, ["pairs"]), (64, [])])
def test_rows_the_gluon_kernel_cannot_copy_go_to_the_pairs_kernel_or_the_dense_path(block_m, launched, monkeypatch):
    """Activation rows not 16-byte aligned, which the Gluon kernels' bulk copies cannot read: a tile
    narrower than 64 rows runs on the pairs kernel, a wider one on the dense path (no launch)."""
    launches = _record_launches(monkeypatch)
    weight = wna16.repack(_group_quant(64, 1024, 4, 128, False, seed=0), torch.bfloat16, torch.device("cpu"))
    x = torch.zeros(12, 1028, dtype=torch.bfloat16)[:, :1024]
    wna16.matmul(weight, x, wgmma=True, weight_first=True, block_m=block_m, block_n=64, block_k=128, split_k=4,
                 num_warps=4, num_stages=4)
    assert [name for name, _ in launches] == launched


@pytest.mark.parametrize("zero_point,offsets", list(ZERO_KINDS.values()), ids=list(ZERO_KINDS))
@pytest.mark.parametrize("rows,n,k,group,act_order,tiles", [
    (1, 72, 512, 128, False, dict(block_n=64, block_k=128, split_k=2, num_warps=4)),
    (2, 64, 768, 128, True, dict(block_n=32, block_k=256, split_k=2, num_warps=4, prefetch=True)),
    (1, 64, 384, 32, False, dict(block_n=64, block_k=128, split_k=3, num_warps=4)),
    (3, 40, 256, 64, True, dict(block_n=32, block_k=64, split_k=1, num_warps=4)),
], ids=["one-group-tiles", "act-order-prefetch", "groups-in-a-tile", "uneven-columns"])
def test_shared_shifts_in_bfloat16_match_the_float64_product(rows, n, k, group, act_order, tiles, zero_point, offsets,
                                                             device):
    """The vector kernel's ``shared_shifts`` (two rows' levels a shift, 256 + q and 16 + q, bfloat16
    ``x`` read two values a load; zero points and offsets taken off from the row sums): within
    two bfloat16 roundings of the float64 product, as the same plan without it, with K split
    unevenly (a split with no tile), groups inside and across K tiles, act-order and columns
    that are not whole tiles."""
    data = _group_quant(n, k, 4, group, act_order, seed=rows + k, zero_point=zero_point, offsets=offsets)
    weight = wna16.repack(data, torch.bfloat16, device)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)
    plan = dict(gemv=True, num_stages=1, zero_from_sums=True, **tiles)
    assert wna16._shared_shifts_fit(weight, x, {**plan, "shared_shifts": True})
    got = wna16.matmul(weight, x, **plan, shared_shifts=True).double()
    exact = x.double() @ data.dequantize(torch.float64).to(device).T
    bound = 2 * 2 ** -8 * (x.double().abs() @ data.dequantize(torch.float64).to(device).abs().T) + 1e-6
    assert bool(((got - exact).abs() <= bound).all()), ((got - exact).abs() / bound).max()
    assert bool(((got - wna16.matmul(weight, x, **plan).double()).abs() <= bound).all())


def test_a_plan_too_large_for_shared_memory_shrinks_and_is_remembered(monkeypatch):
    """A launch whose tile asks more shared memory than the GPU has (Triton's OutOfResources, at
    compile time) is retried with fewer stages, then half the K depth; the plan that fit is used
    straight away next time. The kernel is a stand-in that only fits two stages and K depth 64."""
    from triton.runtime.errors import OutOfResources

    from small_shared_memory import KernelFitting

    launches = []
    monkeypatch.setattr(wna16, "_wna16_kernel", KernelFitting(launches, max_stages=2, max_k=64))
    monkeypatch.setattr(wna16, "FITTED_TILES", {})
    weight = wna16.repack(_group_quant(64, 256, 4, 32, False, seed=0), torch.float16, torch.device("cpu"))
    x = torch.randn(4, 256).half()
    tiles = dict(block_m=16, block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=4)
    wna16.matmul(weight, x, **tiles)
    assert launches == [(128, 4), (128, 3), (128, 2), (128, 1), (64, 2)]
    launches.clear()
    wna16.matmul(weight, x, **tiles)
    assert launches == [(64, 2)]
    # A stand-in that fits nothing: every smaller plan is tried once, then the error is raised.
    monkeypatch.setattr(wna16, "_wna16_kernel", KernelFitting(launches, max_stages=0, max_k=0))
    monkeypatch.setattr(wna16, "FITTED_TILES", {})
    launches.clear()
    with pytest.raises(OutOfResources):
        wna16.matmul(weight, x, **{**tiles, "block_k": 64, "num_stages": 2})
    assert launches == [(64, 2), (64, 1), (32, 2), (32, 1)]


SPLIT_PLANS = {
    "vector": dict(block_n=32, block_k=128, split_k=4, num_warps=4, num_stages=2, gemv=True),
    "tile": dict(block_m=16, block_n=32, block_k=64, split_k=4, num_warps=4, num_stages=2),
    "pairs": dict(pairs=True, block_m=16, block_n=32, block_k=64, split_k=4, num_warps=4, num_stages=2),
    "pairs-weight-first": dict(pairs=True, weight_first=True, block_m=16, block_n=64, block_k=64, split_k=4,
                               num_warps=4, num_stages=2),
    "wgmma": dict(wgmma=True, block_m=64, block_n=64, block_k=64, split_k=4, num_warps=4, num_stages=3),
    "wgmma-overlap": dict(wgmma=True, overlap=True, block_m=64, block_n=64, block_k=64, split_k=4, num_warps=4,
                          num_stages=3),
    "wgmma-weight-first": dict(wgmma=True, weight_first=True, block_m=64, block_n=64, block_k=64, split_k=4,
                               num_warps=4, num_stages=3),
    "wgmma-weight-first-8-rows": dict(wgmma=True, weight_first=True, block_m=8, block_n=64, block_k=64, split_k=4,
                                      num_warps=4, num_stages=4),
}


@pytest.mark.parametrize("kind", SPLIT_PLANS)
def test_split_kernel_leaves_its_tickets_at_zero(kind, device, require_dot):
    """The last program of each output tile adds the split's partial sums and resets the tile's
    arrival counter: every counter is zero after a launch, and the next launch (as a CUDA graph's
    replay would) gives the same result."""
    require_dot(torch.float16)
    if kind.startswith("wgmma"):
        _skip_unless_hopper(device)
    weight = wna16.repack(_group_quant(96, 512, 4, 128, False, seed=3), torch.float16, device)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0)).half().to(device)
    first = wna16.matmul(weight, x, **SPLIT_PLANS[kind])
    assert int(TICKETS[x.device].count_nonzero()) == 0
    again = wna16.matmul(weight, x, **SPLIT_PLANS[kind])
    assert torch.equal(first, again)
    assert not torch.equal(first, torch.zeros_like(first))


@pytest.mark.parametrize("kind", SPLIT_PLANS)
def test_split_kernel_reads_only_the_partial_sums_it_stored(kind, device, require_dot, monkeypatch):
    """The partial sums live in an uninitialized buffer: here every buffer the op allocates starts
    as NaN, so a split stored where the last program does not read, or a sum read before it is
    stored, writes NaN. The result is the float64 product's within float16 rounding. (Under the
    interpreter programs run one after another; on a GPU they arrive in any order.)"""
    require_dot(torch.float16)
    if kind.startswith("wgmma"):
        _skip_unless_hopper(device)

    class NanFilled:
        """``torch`` for the op's module, with ``empty`` filled with NaN."""

        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*shape, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

    data = _group_quant(96, 512, 4, 128, False, seed=5)
    weight = wna16.repack(data, torch.float16, device)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2)).half()
    monkeypatch.setattr(wna16, "torch", NanFilled())
    got = wna16.matmul(weight, x.to(device), **SPLIT_PLANS[kind]).cpu().double()
    expected = x.double() @ data.dequantize(torch.float64).T
    allowed = 2 * 2 ** -10 * (x.double().abs() @ data.dequantize(torch.float64).abs().T) + 1e-6
    assert bool(((got - expected).abs() <= allowed).all())


def test_the_one_row_kernel_reads_x_only_after_the_launch_before_it_ends(device):
    """On sm_90 and later the one-row kernel is launched as a programmatic dependent: it may start
    while the launch before it runs, requests its first weight tile and then waits. Here that launch
    releases its dependents at once and writes ``x`` (zeros until then) only after about a
    millisecond of arithmetic: a kernel reading ``x`` before its wait reads zeros."""
    if device.type != "cuda" or not dependent_launches(device):
        pytest.skip("programmatic dependent launches need an NVIDIA GPU of sm_90 or later")
    from late_launch import late_copy
    from runtime_triton.tickets import tickets

    n = k = 4096
    data = _group_quant(n, k, 4, 128, False, seed=7)
    weight = wna16.repack(data, torch.bfloat16, device)
    plan = wna16.plan(1, n, k)
    assert plan.get("gemv")
    source = torch.randn(1, k, generator=torch.Generator().manual_seed(4)).to(device, torch.bfloat16)
    reference = data.dequantize(torch.float64).to(device)
    exact = source.double() @ reference.T
    bound = 2 * 2 ** -8 * (source.double().abs() @ reference.abs().T) + 1e-6
    tickets(device, 1 << 16)  # allocated now: zeroing it between the late launch and the kernel would wait for it
    for _ in range(3):
        x = torch.zeros_like(source)
        late_copy(source, x)
        got = wna16.matmul(weight, x, **plan).double()
        assert bool(((got - exact).abs() <= bound).all()), ((got - exact).abs() / bound).max()
