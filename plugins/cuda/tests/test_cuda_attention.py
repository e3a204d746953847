"""The unified Triton attention against the core's reference paged attention (float64 math).

Each case is one engine step over a cache whose blocks are shuffled and whose other slots hold
random values: a kernel that reads past a sequence, assumes contiguous blocks or writes
outside ``slot_mapping`` picks up or leaves garbage. Shapes are tiny so the interpreter runs
them on the CPU; the same cases run compiled on a GPU. The same cases run over fp8 caches
(``--kv-cache-dtype fp8``) against a reference whose K/V went through torch's saturating cast.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

from runtime.platform import AttentionMetadata, AttentionSpec
from runtime.platform.reference.attention import paged_attention

triton_attention = pytest.importorskip("runtime_triton.paged_attention",
                                       reason="needs runtime-cuda and triton (pip install -e plugins/cuda)")
from runtime_cuda.backend import CudaTritonAttentionBackend as TritonAttentionBackend  # noqa: E402
from runtime_triton.tile_plans import MAX_SPLITS  # noqa: E402
from runtime_triton.tile_plans.nvidia import attention as plan_launch  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOLERANCE)
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
INTERPRETER_FP8_ROUNDING = ("Triton's interpreter rounds to fp8 without carrying into the exponent "
                            "(triton/runtime/interpreter.py _convert_float: 0.496 becomes 0.25, not 0.5), so "
                            "rounding onto fp8 is checked on a GPU only")
# (cached tokens, new tokens) per sequence: prefill, decode, a chunk after a cached prefix,
# a long decode, a one-token prompt.
MIXED = ((0, 7), (12, 1), (5, 4), (30, 1), (0, 1))
DECODE_HEAVY = ((40, 1), (3, 1), (70, 2), (1, 1))


@dataclass(frozen=True)
class Case:
    heads: int
    kv_heads: int
    head_size: int
    block_size: int
    seqs: tuple[tuple[int, int], ...] = MIXED
    window: int | None = None
    soft_cap: float | None = None
    num_splits: int = 1
    block_m: int = 16


CASES = {
    "mha-d16-bs4": Case(4, 4, 16, 4),
    "gqa-d80-bs16": Case(8, 2, 80, 16, block_m=32),  # head size padded to 128, two query blocks per prefill
    "mqa-d32-bs1": Case(4, 1, 32, 1),
    "window5": Case(4, 2, 16, 4, window=5),
    "window1": Case(4, 2, 16, 8, window=1),
    "softcap5": Case(4, 2, 16, 4, soft_cap=5.0),
    "window7-softcap5": Case(4, 2, 32, 4, window=7, soft_cap=5.0),
    "split4": Case(8, 2, 16, 8, DECODE_HEAVY, num_splits=4),
    "split3-window9": Case(8, 2, 16, 4, DECODE_HEAVY, window=9, num_splits=3),
}


def fp8_cast(x: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """torch's round-to-nearest-even cast, saturating at the format's largest finite value
    (torch's e5m2 cast would give inf beyond it)."""
    limit = torch.finfo(fp8).max
    return x.float().clamp(-limit, limit).to(fp8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, which torch.equal does not implement for fp8 on the CPU."""
    return a.dtype == b.dtype and torch.equal(a.cpu().contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8))


class Step:
    """One step's inputs over a random cache with shuffled blocks (block 0 is never handed out).

    ``cache_dtype``: the cache's element type when it is not ``dtype`` (an fp8 format).
    """

    def __init__(self, case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 cache_dtype: torch.dtype | None = None):
        g = torch.Generator().manual_seed(seed)
        bs = case.block_size
        own = [math.ceil((cached + new) / bs) for cached, new in case.seqs]
        num_blocks = 1 + sum(own) + 2
        pool = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
        tables = [[pool.pop() for _ in range(n)] for n in own]
        starts, slots, lens = [0], [], []
        for (cached, new), table in zip(case.seqs, tables):
            starts.append(starts[-1] + new)
            lens.append(cached + new)
            slots += [table[p // bs] * bs + p % bs for p in range(cached, cached + new)]
        width = max(own)
        tokens = starts[-1]
        self.cache = torch.randn(2, num_blocks, bs, case.kv_heads, case.head_size, generator=g).to(cache_dtype or dtype)
        self.query = (2 * torch.randn(tokens, case.heads, case.head_size, generator=g)).to(dtype)
        self.key = torch.randn(tokens, case.kv_heads, case.head_size, generator=g).to(dtype)
        self.value = torch.randn(tokens, case.kv_heads, case.head_size, generator=g).to(dtype)
        self.meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64), max_query_len=max(n for _, n in case.seqs),
            max_seq_len=max(lens), query_start_loc_cpu=starts, seq_lens_cpu=lens)
        self.case, self.device = case, device

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, cache after the write) of the reference, on the CPU.

        Over an fp8 cache the reference stores :func:`fp8_cast` of K/V and computes on those values.
        """
        cache = self.cache.clone()
        c = self.case
        key, value = self.key, self.value
        if cache.dtype in FP8.values():
            key, value = fp8_cast(key, cache.dtype), fp8_cast(value, cache.dtype)
        out = paged_attention(self.query, key, value, cache, self.meta, c.head_size ** -0.5, c.window, c.soft_cap)
        return out, cache

    def on_device(self):
        d = self.device
        m = self.meta
        meta = AttentionMetadata(m.query_start_loc.to(d), m.seq_lens.to(d), m.block_table.to(d), m.slot_mapping.to(d),
                                 m.max_query_len, m.max_seq_len, m.query_start_loc_cpu, m.seq_lens_cpu)
        return self.query.to(d), self.key.to(d), self.value.to(d), self.cache.to(d), meta


def _assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu(), expected, atol=tol, rtol=tol)


def _store_and_attend(step: Step) -> None:
    """Both launches over the step's cache, each checked against the reference."""
    case, device, dtype = step.case, step.device, step.query.dtype
    expected, expected_cache = step.reference()
    query, key, value, cache, meta = step.on_device()
    triton_attention.store_kv(key, value, cache, meta.slot_mapping)
    assert same_bits(cache, expected_cache), "new K/V must land exactly at slot_mapping, nothing else changes"
    out = torch.full_like(query, float("nan"))  # every row must be written
    workspace = None
    if case.num_splits > 1:
        workspace = triton_attention.split_workspace(query.shape[0], case.heads, case.head_size, case.num_splits, device)
    triton_attention.unified_attention(
        query, cache, out, meta.query_start_loc, meta.seq_lens, meta.block_table, len(case.seqs),
        scale=case.head_size ** -0.5, sliding_window=case.window, soft_cap=case.soft_cap,
        block_m=case.block_m, tile_n=16, num_splits=case.num_splits, workspace=workspace)
    _assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", CASES)
def test_unified_attention_matches_reference(name, dtype, device, require_dot):
    require_dot(dtype)
    _store_and_attend(Step(CASES[name], dtype, device))


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", CASES)
def test_attention_over_fp8_cache(name, dtype, fp8, device, require_dot):
    """Every case (prefill, chunks, decode, GQA/MQA, windows, soft-capping, split-K) over an fp8 cache.

    The tolerance is the model dtype's, not one widened for e4m3's 3-bit mantissa: the reference
    holds the same fp8 values (store_kv must round exactly as torch does), and every e4m3 and e5m2
    value is exact in float16, bfloat16 and float32, so reading them costs nothing further.
    """
    require_dot(dtype)
    step = Step(CASES[name], dtype, device, cache_dtype=FP8[fp8])
    if device.type == "cpu":
        # The interpreter's own rounding is wrong (INTERPRETER_FP8_ROUNDING) but it converts values
        # already on the fp8 grid exactly: start the new K/V there, so what is checked is the kernels.
        step.key, step.value = (fp8_cast(t, FP8[fp8]).to(dtype) for t in (step.key, step.value))
    _store_and_attend(step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
def test_backend_reads_back_what_it_wrote(dtype, device):
    """Through the backend (its own launch plan), over two steps: a prefill, then decode and a chunk,
    with the query and value given as strided views of one fused qkv tensor, as the model passes them."""
    heads, kv_heads, head_size, bs = 4, 2, 32, 4
    spec = AttentionSpec(heads, kv_heads, head_size, head_size ** -0.5, dtype, bs, sliding_window=None)
    backend = TritonAttentionBackend(spec)
    cache = torch.randn(2, 12, bs, kv_heads, head_size).to(dtype)
    ref_cache = cache.clone()
    cache = cache.to(device)
    g = torch.Generator().manual_seed(1)
    tables = [[5, 2, 9, 0], [7, 1, 11, 3]]  # 0: padding
    steps = [((0, 6), (0, 9)), ((6, 1), (9, 3))]
    for step in steps:
        starts, lens, slots = [0], [], []
        for (cached, new), table in zip(step, tables):
            starts.append(starts[-1] + new)
            lens.append(cached + new)
            slots += [table[p // bs] * bs + p % bs for p in range(cached, cached + new)]
        tokens = starts[-1]
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, generator=g).to(dtype)
        q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
        q, k, v = (t.view(tokens, -1, head_size) for t in (q, k, v))
        meta = AttentionMetadata(torch.tensor(starts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                                 torch.tensor(tables, dtype=torch.int32), torch.tensor(slots), max(n for _, n in step),
                                 max(lens), starts, lens)
        expected = paged_attention(q, k, v, ref_cache, meta, spec.scale)
        dev_meta = AttentionMetadata(*(t.to(device) for t in (meta.query_start_loc, meta.seq_lens, meta.block_table,
                                                               meta.slot_mapping)), meta.max_query_len, meta.max_seq_len,
                                     starts, lens)
        got = backend.forward(q.to(device), k.to(device), v.to(device), cache, dev_meta)
        _assert_close(got, expected, dtype)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_store_to_fp8_keeps_its_values_and_saturates(dtype, fp8, device):
    """Every finite fp8 value is stored as itself, and what lies beyond the format saturates to
    its largest value instead of becoming NaN (e4m3 has no inf) or inf (e5m2)."""
    fp8 = FP8[fp8]
    limit = torch.finfo(fp8).max
    grid = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    grid = grid[grid.isfinite()]
    beyond = torch.tensor([2 * limit, float("inf")]).clamp(max=torch.finfo(dtype).max)  # float16 ends below 2 * 57344
    values = torch.cat([grid, beyond, -beyond]).to(dtype)
    values = torch.cat([values, values.new_zeros(-values.numel() % 32)]).view(-1, 2, 16)
    tokens = values.shape[0]
    cache = torch.zeros(2, tokens + 1, 1, 2, 16, dtype=fp8, device=device)
    slots = torch.randperm(tokens, generator=torch.Generator().manual_seed(0)) + 1
    triton_attention.store_kv(values.to(device), (-values).to(device), cache, slots.to(device))
    expected = torch.zeros(2, tokens + 1, 2, 16, dtype=fp8)
    expected[0, slots], expected[1, slots] = fp8_cast(values, fp8), fp8_cast(-values, fp8)
    assert same_bits(cache.view(2, -1, 2, 16), expected)
    assert cache.float().isfinite().all()


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_store_to_fp8_rounds_as_torch(dtype, fp8, device):
    """Values off the fp8 grid, from subnormal to beyond the format: bit for bit torch's round-to-nearest-even."""
    if device.type == "cpu":
        pytest.skip(INTERPRETER_FP8_ROUNDING)
    fp8 = FP8[fp8]
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-12, 17, 64, base=2)[:, None]  # e4m3's subnormals start at 2^-9, e5m2's end at 2^16
    values = (torch.randn(64, 512, generator=g) * scales).view(-1, 4, 64).to(dtype)
    tokens = values.shape[0]
    cache = torch.zeros(2, tokens, 1, 4, 64, dtype=fp8, device=device)
    triton_attention.store_kv(values.to(device), (values / 3).to(device), cache, torch.arange(tokens, device=device))
    assert same_bits(cache[0, :, 0], fp8_cast(values, fp8))
    assert same_bits(cache[1, :, 0], fp8_cast(values / 3, fp8))


def test_backend_takes_fp8_caches_the_gpu_can_convert(monkeypatch):
    """e4m3 needs compute capability 8.9 (Triton has no e4m3 type below it); e5m2 Triton emulates anywhere."""
    e4m3 = AttentionSpec(8, 2, 64, 0.125, torch.bfloat16, 16, kv_cache_dtype="fp8")
    e5m2 = dataclasses.replace(e4m3, kv_cache_dtype="fp8_e5m2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "compute capability 8.9" in TritonAttentionBackend.unsupported_reason(e4m3)
    assert TritonAttentionBackend.unsupported_reason(e5m2) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert TritonAttentionBackend.unsupported_reason(e4m3) is None
    assert "not supported" in TritonAttentionBackend.unsupported_reason(dataclasses.replace(e4m3, kv_cache_dtype="int8"))


def test_negative_slots_write_nothing(device):
    """A padding token (slot -1, as fixed-shape batches will use) leaves the cache untouched."""
    cache = torch.randn(2, 3, 4, 2, 16).to(device)
    before = cache.clone()
    key, value = torch.randn(2, 2, 16).to(device), torch.randn(2, 2, 16).to(device)
    triton_attention.store_kv(key, value, cache, torch.tensor([-1, 5], device=device))
    flat = cache.view(2, -1, 2, 16)
    assert torch.equal(flat[0, 5], key[1]) and torch.equal(flat[1, 5], value[1])
    flat[:, 5] = before.view(2, -1, 2, 16)[:, 5]
    assert torch.equal(cache, before)


def _plan(**overrides):
    sizes = dict(num_seqs=1, max_query_len=1, max_seq_len=4096, num_heads=32, num_kv_heads=8, head_size=128,
                 dtype=torch.bfloat16, multiprocessors=132)
    return plan_launch(**{**sizes, **overrides})


def test_plan_splits_only_long_decode_at_small_batch():
    block_m, _, splits, _ = _plan()
    assert block_m == 16 and splits == MAX_SPLITS  # 8 programs on 132 multiprocessors: split
    assert _plan(num_seqs=64)[2] == 1  # 512 programs already fill the GPU
    assert _plan(max_seq_len=256)[2] == 1  # too short to pay for the merge
    assert _plan(max_query_len=512)[2] == 1  # prefill: many query blocks already


def test_plan_rows_cover_the_group_and_fit_registers():
    assert _plan(num_heads=64, num_kv_heads=1)[0] == 64  # MQA: all 64 query heads in one block
    assert _plan(max_query_len=2048)[0] == 64
    assert _plan(max_query_len=2048, head_size=256)[0] == 32
    assert _plan(max_query_len=2048, dtype=torch.float32)[0] == 32


@pytest.mark.parametrize("name", ["gqa-d80-bs16", "split4"])
def test_attention_after_the_cache_write_reads_the_cache_only_after_it_ends(name, device):
    """On sm_90 and later attention launched ``after_cache_write`` may start while the launch
    before it runs and reads only the queries and the sequences' layout before waiting for it.
    Here that launch releases its dependents at once and writes the cache (zeros until then) only
    after about a millisecond of arithmetic: a kernel reading keys or values before its wait reads
    zeros."""
    from runtime_triton.dependent import dependent_launches

    if device.type != "cuda" or not dependent_launches(device):
        pytest.skip("programmatic dependent launches need an NVIDIA GPU of sm_90 or later")
    from late_launch import late_copy
    from runtime_triton.tickets import tickets

    case = CASES[name]
    step = Step(case, torch.bfloat16, device)
    expected, expected_cache = step.reference()
    query, _, _, _, meta = step.on_device()
    workspace = None
    if case.num_splits > 1:
        workspace = triton_attention.split_workspace(query.shape[0], case.heads, case.head_size, case.num_splits, device)
    final_cache = expected_cache.to(device)
    # Everything on the device before the late launch: a launch or copy between it and attention
    # would wait for it. The ticket counters too.
    tickets(device, 1 << 16)
    for _ in range(3):
        cache = torch.zeros(expected_cache.shape, dtype=expected_cache.dtype, device=device)
        out = torch.full_like(query, float("nan"))
        late_copy(final_cache, cache)
        triton_attention.unified_attention(
            query, cache, out, meta.query_start_loc, meta.seq_lens, meta.block_table, len(case.seqs),
            scale=case.head_size ** -0.5, sliding_window=case.window, soft_cap=case.soft_cap,
            block_m=case.block_m, tile_n=16, num_splits=case.num_splits, workspace=workspace, after_cache_write=True)
        _assert_close(out, expected, torch.bfloat16)


def test_store_kv_reads_keys_and_values_only_after_the_launch_before_it_ends(device):
    """``store_kv`` is a programmatic dependent on sm_90 and later: behind a launch that writes the
    keys late (``late_launch.py``), the cache still gets them."""
    from runtime_triton.dependent import dependent_launches

    if device.type != "cuda" or not dependent_launches(device):
        pytest.skip("programmatic dependent launches need an NVIDIA GPU of sm_90 or later")
    from late_launch import late_copy

    step = Step(CASES["gqa-d80-bs16"], torch.bfloat16, device)
    _, expected_cache = step.reference()
    _, key, value, cache, meta = step.on_device()
    for _ in range(3):
        late_key = torch.zeros_like(key)
        written = cache.clone()  # before the late launch: a copy after it would wait for it
        late_copy(key, late_key)
        triton_attention.store_kv(late_key, value, written, meta.slot_mapping)
        assert same_bits(written, expected_cache)


@pytest.mark.parametrize("name", ["split4", "split3-window9"])
def test_split_attention_leaves_its_tickets_at_zero_and_repeats_its_bits(name, device):
    """The last split of a query block to finish merges the block's splits and resets its arrival
    counter: every counter is zero after a launch, and the next launch (as a CUDA graph's replay
    would) gives the same bits."""
    from runtime_triton.tickets import TICKETS

    case = CASES[name]
    step = Step(case, torch.float32, device)
    query, key, value, cache, meta = step.on_device()
    triton_attention.store_kv(key, value, cache, meta.slot_mapping)
    workspace = triton_attention.split_workspace(query.shape[0], case.heads, case.head_size, case.num_splits, device)
    results = []
    for _ in range(2):
        out = torch.full_like(query, float("nan"))
        triton_attention.unified_attention(
            query, cache, out, meta.query_start_loc, meta.seq_lens, meta.block_table, len(case.seqs),
            scale=case.head_size ** -0.5, sliding_window=case.window, soft_cap=case.soft_cap,
            block_m=case.block_m, tile_n=16, num_splits=case.num_splits, workspace=workspace)
        assert int(TICKETS[query.device].count_nonzero()) == 0
        results.append(out)
    assert same_bits(results[0], results[1]) and not bool(results[0].isnan().any())
