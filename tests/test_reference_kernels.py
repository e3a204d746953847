"""The core's reference kernels against formulas written out here in float64 (or against
transformers' own RoPE initialisation), so the conformance suite's yardstick is itself checked.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from runtime.platform import AttentionMetadata
from runtime.platform.reference import (
    apply_top_k_top_p_min_p,
    build_cos_sin_cache,
    copy_blocks,
    fused_add_rms_norm,
    gelu_and_mul,
    lora_add,
    lora_expand,
    lora_shrink,
    paged_attention,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
)
from runtime.platform.reference.rotary import rope_inv_freq
from runtime_conformance.kernel_checks import CHECKS

# A float64 result rounded once to the output dtype, against the kernel's float32 math
# rounded once: about one unit in the last place apart.
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_matches(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected64, **TOLERANCE[dtype])


def rms64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x, weight = x.double(), weight.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


# --- norms and activations -------------------------------------------------------------------

@DTYPES
def test_rms_norm(dtype):
    x = (3 * torch.randn(7, 96, generator=gen())).to(dtype)
    weight = torch.randn(96, generator=gen(1)).to(dtype)
    assert_matches(rms_norm(x, weight, 1e-6), rms64(x, weight, 1e-6), dtype)


@DTYPES
def test_fused_add_rms_norm(dtype):
    x = torch.randn(5, 64, generator=gen()).to(dtype)
    residual = torch.randn(5, 64, generator=gen(1)).to(dtype)
    weight = torch.randn(64, generator=gen(2)).to(dtype)
    normed, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert_matches(summed, x.double() + residual.double(), dtype)
    # The contract normalises the residual it returns, rounding included.
    assert_matches(normed, rms64(summed, weight, 1e-5), dtype)


@DTYPES
def test_silu_and_mul(dtype):
    x = (3 * torch.randn(6, 2 * 48, generator=gen())).to(dtype)
    gate, up = x.double()[:, :48], x.double()[:, 48:]
    assert_matches(silu_and_mul(x), gate / (1 + torch.exp(-gate)) * up, dtype)


@DTYPES
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_mul(dtype, approximate):
    x = (3 * torch.randn(6, 2 * 48, generator=gen())).to(dtype)
    gate, up = x.double()[:, :48], x.double()[:, 48:]
    if approximate == "none":
        gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    else:
        gelu = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
    assert_matches(gelu_and_mul(x, approximate=approximate), gelu * up, dtype)


# --- rotary embedding ------------------------------------------------------------------------

def rotate_complex(x: torch.Tensor, angles: torch.Tensor, rotary_dim: int, is_neox: bool) -> torch.Tensor:
    """Each feature pair as a complex number times e^(i*angle); angles [T, rotary_dim/2]."""
    x = x.double()
    rot = x[..., :rotary_dim]
    if is_neox:
        z = torch.complex(rot[..., :rotary_dim // 2], rot[..., rotary_dim // 2:])
    else:
        z = torch.complex(rot[..., 0::2], rot[..., 1::2])
    z = z * torch.polar(torch.ones_like(angles), angles).unsqueeze(1)
    if is_neox:
        rotated = torch.cat([z.real, z.imag], dim=-1)
    else:
        rotated = torch.view_as_real(z).flatten(-2)
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


@DTYPES
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [64, 32], ids=["full", "partial"])
def test_rotary_embedding(dtype, is_neox, rotary_dim):
    head_size, max_pos = 64, 300
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    table = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    cache = torch.cat([table.cos(), table.sin()], dim=-1).float()
    positions = torch.randint(0, max_pos, (9,), generator=gen())
    query = torch.randn(9, 4, head_size, generator=gen(1)).to(dtype)
    key = torch.randn(9, 2, head_size, generator=gen(2)).to(dtype)
    q_out, k_out = rotary_embedding(positions, query, key, cache, is_neox=is_neox)
    angles = table[positions]
    assert_matches(q_out, rotate_complex(query, angles, rotary_dim, is_neox), dtype)
    assert_matches(k_out, rotate_complex(key, angles, rotary_dim, is_neox), dtype)
    assert torch.equal(q_out[..., rotary_dim:], query[..., rotary_dim:])


# Each case: rope_scaling as a checkpoint writes it, max_position_embeddings of the config, and
# the cache length asked for.
ROPE_CASES = {
    "default": (None, 512, 512),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 512, 512),
    "linear_legacy_key": ({"type": "linear", "factor": 2.0}, 512, 512),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}, 512, 512),
    "llama3_8k": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}, 131072, 512),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256, 256),
    "yarn_betas": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                    "beta_fast": 16.0, "beta_slow": 2.0}, 256, 256),
    "yarn_attention_factor": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "attention_factor": 1.3}, 256, 256),
    "yarn_deepseek_mscale": ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                              "mscale": 0.707, "mscale_all_dim": 1.0}, 163840, 512),
    "yarn_deepseek_equal_mscale": ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                    "mscale": 1.0, "mscale_all_dim": 1.0}, 163840, 512),
    "yarn_untruncated": ({"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                          "truncate": False}, 131072, 512),
    "dynamic_within": ({"rope_type": "dynamic", "factor": 2.0}, 256, 200),
    "dynamic_beyond": ({"rope_type": "dynamic", "factor": 2.0}, 256, 1000),
}


@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5], ids=["full", "partial"])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_cos_sin_cache_matches_transformers(case, rotary_fraction):
    scaling, max_position_embeddings, max_positions = ROPE_CASES[case]
    head_dim, base = 64, 10000.0
    rotary_dim = int(head_dim * rotary_fraction)
    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, rope_theta=base,
                         max_position_embeddings=max_position_embeddings, partial_rotary_factor=rotary_fraction,
                         rope_scaling=dict(scaling) if scaling else None)
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        if rotary_fraction != 1.0:
            # Llama's default init ignores partial_rotary_factor; the textbook formula over rotary_dim.
            hf_inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
            hf_factor = 1.0
        else:
            hf_inv_freq, hf_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        # transformers applies dynamic NTK for the current length; the cache covers max_positions.
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[kind](config, seq_len=max_positions)
    ours_scaling = dict(scaling or {})
    if kind == "dynamic":
        # transformers reads the pretraining length from the config; the reference from rope_scaling.
        ours_scaling["original_max_position_embeddings"] = max_position_embeddings

    inv_freq, factor = rope_inv_freq(rotary_dim, base, ours_scaling, max_positions)
    torch.testing.assert_close(inv_freq, hf_inv_freq.double(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf_factor, rel=1e-12)

    cache = build_cos_sin_cache(rotary_dim, base, max_positions, ours_scaling)
    assert cache.shape == (max_positions, rotary_dim) and cache.dtype == torch.float32
    # transformers' inv_freq is float32: the angle at position p inherits p times its rounding.
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), hf_inv_freq.double())
    expected = torch.cat([angles.cos(), angles.sin()], dim=-1) * hf_factor
    torch.testing.assert_close(cache.double(), expected, atol=2e-4, rtol=0)


# --- LoRA ------------------------------------------------------------------------------------

def test_lora_shrink_and_expand():
    tokens, d_in, d_out, rank, num_slots = 11, 40, 24, 8, 3
    x = torch.randn(tokens, d_in, generator=gen())
    lora_a = torch.randn(num_slots, rank, d_in, generator=gen(1))
    lora_b = torch.randn(num_slots, d_out, rank, generator=gen(2))
    base = torch.randn(tokens, d_out, generator=gen(3))
    slots = torch.tensor([0, 2, -1, 1, 1, -1, 0, 2, 2, -1, 0])
    scale = 0.5

    shrunk = lora_shrink(x, lora_a, slots, scale)
    out = lora_expand(shrunk, lora_b, slots, base)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert torch.equal(shrunk[t], torch.zeros(rank))
            assert torch.equal(out[t], base[t])
            continue
        expected_shrunk = scale * (lora_a[slot].double() @ x[t].double())
        torch.testing.assert_close(shrunk[t].double(), expected_shrunk, atol=1e-4, rtol=1e-5)
        expected_out = base[t].double() + lora_b[slot].double() @ shrunk[t].double()
        torch.testing.assert_close(out[t].double(), expected_out, atol=1e-4, rtol=1e-5)


def test_lora_keeps_base_dtype_and_untouched_rows():
    base = torch.randn(4, 16, generator=gen()).to(torch.bfloat16)
    shrunk = torch.randn(4, 4, generator=gen(1)).to(torch.bfloat16)
    lora_b = torch.randn(2, 16, 4, generator=gen(2)).to(torch.bfloat16)
    out = lora_expand(shrunk, lora_b, torch.tensor([-1, 1, -1, 0]), base)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[[0, 2]], base[[0, 2]])


def test_lora_add_adds_each_partitions_product_in_place():
    """A fused projection of three partitions (q, k, v): partition i's A is rank rows i * r on,
    its B the rows of its output columns; y changes in place, rows of slot -1 not at all."""
    tokens, d_in, slices, rank, num_slots = 9, 40, (24, 8, 8), 4, 3
    x = torch.randn(tokens, d_in, generator=gen())
    lora_a = torch.randn(num_slots, len(slices) * rank, d_in, generator=gen(1))
    lora_b = torch.randn(num_slots, sum(slices), rank, generator=gen(2))
    y = torch.randn(tokens, sum(slices), generator=gen(3))
    slots = torch.tensor([0, 2, -1, 1, 1, -1, 0, 2, 2])
    before = y.clone()
    assert lora_add(y, x, lora_a, lora_b, slots, slices, 0.5) is y
    starts = [0, 24, 32]
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert torch.equal(y[t], before[t])
            continue
        for i, (start, width) in enumerate(zip(starts, slices)):
            shrunk = 0.5 * (lora_a[slot, i * rank:(i + 1) * rank].double() @ x[t].double())
            expected = before[t, start:start + width].double() + lora_b[slot, start:start + width].double() @ shrunk
            torch.testing.assert_close(y[t, start:start + width].double(), expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="do not hold partitions"):
        lora_add(y, x, lora_a, lora_b, slots, (24, 16), 0.5)


def test_the_lora_add_check_catches_what_it_must():
    """A copy instead of an in-place add, one partition's A used for all, and rows without an
    adapter touched: each fails the conformance check."""
    def copies(y, x, a, b, slots, slices, scale):
        return lora_add(y.clone(), x, a, b, slots, slices, scale)

    def first_partition_only(y, x, a, b, slots, slices, scale):
        return lora_add(y, x, a[:, :b.shape[2]].repeat(1, len(slices), 1), b, slots, slices, scale)

    def touches_base_rows(y, x, a, b, slots, slices, scale):
        y[slots < 0] += 1e-3
        return lora_add(y, x, a, b, slots, slices, scale)

    for fn, message in [(copies, "must add into y in place"), (first_partition_only, "outside the float32 tolerance"),
                        (touches_base_rows, "rows of tokens without an adapter")]:
        with pytest.raises(AssertionError, match=message):
            CHECKS["lora_add"](fn, torch.float32, torch.device("cpu"), gen(6))


@DTYPES
@pytest.mark.parametrize("op", [lora_shrink, lora_expand, lora_add], ids=lambda op: op.__name__)
def test_lora_passes_its_conformance_check(op, dtype):
    """The suite's LoRA steps (decode, prefill, mixed, one token, a zero-padded adapter) hold for the yardstick."""
    CHECKS[op.__name__](op, dtype, torch.device("cpu"), gen(5))


# --- KV block copy ---------------------------------------------------------------------------

@pytest.mark.parametrize("block_dim", [1, 0])
def test_copy_blocks(block_dim):
    shape = (2, 9, 4, 2, 8) if block_dim == 1 else (9, 2, 4, 2, 8)
    caches = [torch.randn(shape, generator=gen(i)) for i in range(3)]
    originals = [c.clone() for c in caches]
    # One source copied twice (copy-on-write of a shared prefix block), destinations disjoint from sources.
    pairs = [(1, 5), (3, 0), (1, 7)]
    copy_blocks(caches, torch.tensor(pairs, dtype=torch.int64), block_dim=block_dim)
    for cache, original in zip(caches, originals):
        expected = original.clone()
        for src, dst in pairs:
            expected.select(block_dim, dst).copy_(original.select(block_dim, src))
        assert torch.equal(cache, expected)
    copy_blocks(caches, torch.empty(0, 2, dtype=torch.int64), block_dim=block_dim)


# --- top-k / top-p / min-p -------------------------------------------------------------------

def keep_mask_direct(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row, written out: sort, walk the cumulative probability, compare with the maximum."""
    vocab = row.numel()
    logits = row.double()
    probs = logits.softmax(-1)
    ordered = torch.sort(logits, descending=True).values
    keep = torch.ones(vocab, dtype=torch.bool)
    if 0 < top_k < vocab:
        keep &= logits >= ordered[top_k - 1]
        ordered = ordered[:top_k]
    if top_p < 1:
        # top-p is judged on the distribution renormalised over the top-k survivors.
        cumulative, last = 0.0, ordered[0]
        for value in ordered:
            if cumulative >= top_p:
                break
            last = value
            cumulative += math.exp(value - torch.logsumexp(ordered, 0))
        keep &= logits >= last
    if min_p > 0:
        keep &= probs >= min_p * probs.max()
    return keep


@pytest.mark.parametrize("integer_logits", [False, True], ids=["continuous", "with_ties"])
def test_top_k_top_p_min_p(integer_logits):
    batch, vocab = 24, 50
    g = gen()
    if integer_logits:
        logits = torch.randint(-4, 5, (batch, vocab), generator=g).float()
    else:
        logits = 2 * torch.randn(batch, vocab, generator=g)
    # Every row a different mix: each filter off (its neutral value) or on.
    top_k = torch.tensor([[0, 1, 5, 20, vocab, vocab + 3][i % 6] for i in range(batch)])
    top_p = torch.tensor([[1.0, 0.9, 0.5, 0.05][i % 4] for i in range(batch)])
    min_p = torch.tensor([[0.0, 0.1, 0.3][i % 3] for i in range(batch)])

    out = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    for i in range(batch):
        keep = keep_mask_direct(logits[i], int(top_k[i]), float(top_p[i]), float(min_p[i]))
        assert keep.any()
        assert torch.equal(torch.isinf(out[i]), ~keep), f"row {i}"
        assert torch.equal(out[i][keep], logits[i][keep])


def test_filters_off_keep_a_long_tail():
    # Peaked logits over a large vocabulary: a float32 cumulative sum hits 1.0 long before the end.
    logits = 10 * torch.randn(4, 32000, generator=gen())
    off = apply_top_k_top_p_min_p(logits, torch.zeros(4, dtype=torch.long), torch.ones(4), torch.zeros(4))
    assert torch.equal(off, logits)


# --- paged attention -------------------------------------------------------------------------

def dense_attention(q, k, v, position, scale, window, soft_cap):
    """One query vector per head against the first position+1 keys of a sequence, in float64."""
    num_heads, kv_heads = q.shape[0], k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    first = 0 if window is None else max(0, position - window + 1)
    for h in range(num_heads):
        kv = h // (num_heads // kv_heads)
        scores = k[first:position + 1, kv].double() @ q[h].double() * scale
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        weights = torch.exp(scores - scores.max())
        out[h] = (weights / weights.sum()) @ v[first:position + 1, kv].double()
    return out


@pytest.mark.parametrize(("window", "soft_cap"), [(None, None), (6, None), (None, 4.0)])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (4, 1)])
def test_paged_attention_matches_dense(num_heads, num_kv_heads, window, soft_cap):
    head_size, block_size = 16, 4
    # (tokens already cached, new tokens): prefill, chunked prefill, decode, verification.
    seqs = [(0, 6), (9, 3), (13, 1), (4, 4)]
    g = gen()
    full_k = [torch.randn(c + n, num_kv_heads, head_size, generator=g) for c, n in seqs]
    full_v = [torch.randn(c + n, num_kv_heads, head_size, generator=g) for c, n in seqs]
    queries = [2 * torch.randn(n, num_heads, head_size, generator=g) for _, n in seqs]

    blocks_needed = [-(-(c + n) // block_size) for c, n in seqs]
    num_blocks = sum(blocks_needed) + 3
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(n)] for n in blocks_needed]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, generator=g)
    slots = []
    for table, (ctx, new), k, v in zip(tables, seqs, full_k, full_v):
        for pos in range(ctx + new):
            block, offset = table[pos // block_size], pos % block_size
            if pos < ctx:
                cache[0, block, offset], cache[1, block, offset] = k[pos], v[pos]
            else:
                slots.append(block * block_size + offset)

    width = max(blocks_needed)
    starts = [0]
    for _, new in seqs:
        starts.append(starts[-1] + new)
    seq_lens = [c + n for c, n in seqs]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots), max_query_len=max(n for _, n in seqs), max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs)])
    scale = head_size ** -0.5

    out = paged_attention(torch.cat(queries), new_k, new_v, cache, meta, scale, window, soft_cap)
    for i, (ctx, new) in enumerate(seqs):
        for j in range(new):
            expected = dense_attention(queries[i][j], full_k[i], full_v[i], ctx + j, scale, window, soft_cap)
            torch.testing.assert_close(out[starts[i] + j].double(), expected, atol=1e-5, rtol=1e-5)
    flat = cache.view(2, -1, num_kv_heads, head_size)
    assert torch.equal(flat[0, meta.slot_mapping], new_k) and torch.equal(flat[1, meta.slot_mapping], new_v)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn, torch.float8_e5m2])
def test_write_kv_skips_padding_and_saturates_fp8(cache_dtype):
    from runtime.platform.reference.attention import write_kv

    cache = torch.zeros(2, 4, 2, 1, 3, dtype=cache_dtype)  # [K/V, blocks, block size, heads, dims]
    key = torch.tensor([[[1.0, -2.5, 1e6]], [[7.0, 7.0, 7.0]], [[-1e6, 0.5, 3.0]]])
    value = -key
    slots = torch.tensor([5, -1, 2])
    write_kv(key, value, cache, slots)
    limit = torch.finfo(cache_dtype).max
    flat = cache.view(2, 8, 3).float()
    for t, slot in ((0, 5), (2, 2)):
        assert torch.equal(flat[0, slot], key[t, 0].clamp(-limit, limit).to(cache_dtype).float())
        assert torch.equal(flat[1, slot], value[t, 0].clamp(-limit, limit).to(cache_dtype).float())
    untouched = [s for s in range(8) if s not in (5, 2)]
    assert not flat[:, untouched].any()  # the padding token (slot -1) wrote nothing, not even the last slot
