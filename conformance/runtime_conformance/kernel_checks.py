"""One check per op of the contract (``runtime.platform.reference.OPS``): the platform's kernel
against the core's reference on the same fresh random inputs.

Each check is ``check(fn, dtype, device, generator)`` (``copy_blocks`` also takes the cache
layouts to copy in) and raises AssertionError naming the op,
the variant (shape, epsilon, rope scaling, ...) and the worst mismatch. Inputs are built on the
CPU, the reference runs there, the kernel runs on the platform's device. Numeric results are
held to the exact result (the reference on the inputs widened to float64) by both rules of
:mod:`runtime_conformance.compare`, the baseline being the reference on the inputs as given.
"""

from __future__ import annotations

from typing import Callable

import torch

from runtime.platform.reference import OPS, build_cos_sin_cache, host_cache_shape

from .compare import assert_close, assert_precise
from .tolerances import ELEMENTWISE_FLOOR


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _on(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device) for t in tensors]


def _wide(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def reference(op: str, *args, **kwargs):
    """(exact, baseline): the reference op on the inputs widened to float64, and on them as given."""
    return OPS[op](*map(_wide, args), **kwargs), OPS[op](*args, **kwargs)


def _magnitude(t: torch.Tensor) -> float:
    """Scale for the absolute tolerance of results that are far from magnitude 1."""
    return max(1.0, t.float().abs().max().item())


def check_rms_norm(fn, dtype, device, g):
    for shape, eps in (((16, 64), 1e-6), ((7, 1000), 1e-5), ((5, 4, 32), 1e-6)):
        # Rows from 1e-3 to 10 in magnitude: where mean(x^2) is near eps, epsilon decides the result.
        scale = 10 ** (torch.rand(*shape[:-1], 1, generator=g) * 4 - 3)
        x = (_randn(g, *shape) * scale).to(dtype)
        weight = (1 + 0.1 * _randn(g, shape[-1])).to(dtype)
        exact, baseline = reference("rms_norm", x, weight, eps)
        assert_precise(fn(*_on(device, x, weight), eps), exact, baseline, dtype,
                       f"rms_norm (input {list(shape)}, eps {eps})", floor=ELEMENTWISE_FLOOR)


def check_fused_add_rms_norm(fn, dtype, device, g):
    for shape, eps in (((16, 64), 1e-6), ((7, 1000), 1e-5)):
        scale = 10 ** (torch.rand(shape[0], 1, generator=g) * 4 - 3)
        x, residual = (_randn(g, *shape) * scale).to(dtype), (_randn(g, *shape) * scale).to(dtype)
        weight = (1 + 0.1 * _randn(g, shape[-1])).to(dtype)
        exact, baseline = reference("fused_add_rms_norm", x, residual, weight, eps)
        got = fn(*_on(device, x, residual, weight), eps)
        what = f"fused_add_rms_norm (input {list(shape)}, eps {eps})"
        assert isinstance(got, tuple) and len(got) == 2, f"{what}: must return (normed, residual + x)"
        assert_precise(got[1], exact[1], baseline[1], dtype, f"{what}, returned residual", floor=ELEMENTWISE_FLOOR)
        assert_precise(got[0], exact[0], baseline[0], dtype, f"{what}, normed output", floor=ELEMENTWISE_FLOOR)


ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 256},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}


def check_rotary_embedding(fn, dtype, device, g):
    head_size, max_positions = 64, 1024
    positions = torch.randint(0, max_positions, (13,), generator=g)
    query, key = _randn(g, 13, 4, head_size, dtype=dtype), _randn(g, 13, 2, head_size, dtype=dtype)
    for name, scaling in ROPE_SCALINGS.items():
        for rotary_dim in (head_size, head_size // 2):
            cache = build_cos_sin_cache(rotary_dim, 10000.0, max_positions, scaling)
            for is_neox in (True, False):
                exact, baseline = reference("rotary_embedding", positions, query, key, cache, is_neox)
                got = fn(*_on(device, positions, query, key, cache), is_neox)
                what = f"rotary_embedding (rope {name}, rotary_dim {rotary_dim} of {head_size}, is_neox={is_neox})"
                assert_precise(got[0], exact[0], baseline[0], dtype, f"{what}, query")
                assert_precise(got[1], exact[1], baseline[1], dtype, f"{what}, key")


def check_qk_norm_rotary_embedding(fn, dtype, device, g):
    head_size, max_positions, eps = 64, 1024, 1e-6
    positions = torch.randint(0, max_positions, (13,), generator=g)
    # Heads from 1e-3 to 10 in magnitude (epsilon decides the smallest), q and k read from one fused
    # projection's output as the model does: token rows wider than the heads.
    scale = 10 ** (torch.rand(13, 6, 1, generator=g) * 4 - 3)
    qkv = (_randn(g, 13, 6, head_size) * scale).to(dtype)
    q_weight, k_weight = ((1 + 0.1 * _randn(g, head_size)).to(dtype) for _ in range(2))
    for name in ("default", "llama3"):
        for rotary_dim in (head_size, head_size // 2):
            cache = build_cos_sin_cache(rotary_dim, 10000.0, max_positions, ROPE_SCALINGS[name])
            for is_neox in (True, False):
                query, key = qkv[:, :4], qkv[:, 4:]
                exact, baseline = reference("qk_norm_rotary_embedding", positions, query, key, q_weight, k_weight, eps,
                                            cache, is_neox)
                on = _on(device, positions, qkv, q_weight, k_weight, cache)
                got = fn(on[0], on[1][:, :4], on[1][:, 4:], on[2], on[3], eps, on[4], is_neox)
                what = (f"qk_norm_rotary_embedding (rope {name}, rotary_dim {rotary_dim} of {head_size}, "
                        f"is_neox={is_neox})")
                assert_precise(got[0], exact[0], baseline[0], dtype, f"{what}, query", floor=ELEMENTWISE_FLOOR)
                assert_precise(got[1], exact[1], baseline[1], dtype, f"{what}, key", floor=ELEMENTWISE_FLOOR)


def check_silu_and_mul(fn, dtype, device, g):
    for shape in ((9, 128), (3, 5, 200)):
        x = (3 * _randn(g, *shape)).to(dtype)
        assert_precise(fn(*_on(device, x)), *reference("silu_and_mul", x), dtype, f"silu_and_mul (input {list(shape)})",
                       floor=ELEMENTWISE_FLOOR)


def check_gelu_and_mul(fn, dtype, device, g):
    x = (3 * _randn(g, 9, 128)).to(dtype)
    for approximate in ("none", "tanh"):
        assert_precise(fn(*_on(device, x), approximate=approximate), *reference("gelu_and_mul", x, approximate=approximate),
                       dtype, f"gelu_and_mul (approximate={approximate!r})", floor=ELEMENTWISE_FLOOR)


def check_linear(fn, dtype, device, g):
    # Row counts on both sides of 16 (kernels often special-case few rows), reductions that
    # are not a multiple of a tile, and one as long as a large model's MLP, where accumulating
    # in a narrow dtype shows; weights scaled so outputs are of magnitude 1.
    for rows, n, k, bias in ((8, 64, 8192, False), (1, 96, 200, False), (5, 130, 64, True), (16, 64, 520, False),
                             (17, 48, 96, True), (64, 200, 136, False)):
        x = _randn(g, rows, k, dtype=dtype)
        weight = (_randn(g, n, k) * k ** -0.5).to(dtype)
        b = _randn(g, n, dtype=dtype) if bias else None
        got = fn(*_on(device, x, weight), None if b is None else b.to(device))
        assert_precise(got, *reference("linear", x, weight, b), dtype,
                       f"linear ({rows} x {k} by [{n}, {k}]{', bias' if bias else ''})")


# Steps of the engine, as adapter slots per token (-1: no adapter). Tokens of one request are
# contiguous and share a slot; slot LORA_PADDED_SLOT holds an adapter of rank LORA_PADDED_RANK
# zero-padded to the slots' rank LORA_RANK, as every adapter of a smaller rank is.
LORA_STEPS = {
    "decode": [3, 0, -1, 2, 4, -1, 1],  # one token per request, each on its own adapter
    "prefill": [1] * 6 + [-1] * 3 + [4] * 9 + [0] * 5,  # prompt chunks: runs of tokens on one adapter
    "mixed": [2] * 12 + [0, -1, 2, 4, 2],  # a chunk, then decodes, some on the chunk's adapter
    "one_token": [3],
}
LORA_SLOTS, LORA_RANK, LORA_PADDED_SLOT, LORA_PADDED_RANK = 5, 16, 4, 6


def _lora_weights(g: torch.Generator, features: int, rank_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Every slot's lora_a [S, r, in] (rank_dim 1) or lora_b [S, out, r] (rank_dim 2), scaled so products
    are of magnitude 1; the padded slot's weights past its rank are zero."""
    shape = [LORA_SLOTS, features, features]
    shape[rank_dim] = LORA_RANK
    weights = _randn(g, *shape) * shape[2] ** -0.5
    weights[LORA_PADDED_SLOT].narrow(rank_dim - 1, LORA_PADDED_RANK, LORA_RANK - LORA_PADDED_RANK).zero_()
    return weights.to(dtype)


def _lora_what(op: str, step: str, features: str) -> str:
    return (f"{op} ({step} step, slots {LORA_STEPS[step]}, {LORA_SLOTS} adapters of rank {LORA_RANK}, "
            f"slot {LORA_PADDED_SLOT} zero-padded from rank {LORA_PADDED_RANK}, {features})")


def _check_padded_slot(got: torch.Tensor, unpadded: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
                       what: str) -> None:
    """The padded slot's tokens must get what its unpadded adapter gives them."""
    if rows.numel():
        assert_close(got.cpu()[rows], unpadded, dtype, f"{what}: the tokens of the zero-padded slot",
                     scale=_magnitude(unpadded))


def check_lora_shrink(fn, dtype, device, g):
    in_features, scale = 200, 0.37
    lora_a = _lora_weights(g, in_features, rank_dim=1, dtype=dtype)
    for name, step in LORA_STEPS.items():
        slots = torch.tensor(step)
        x = _randn(g, len(step), in_features, dtype=dtype)
        exact, baseline = reference("lora_shrink", x, lora_a, slots, scale)
        got = fn(*_on(device, x, lora_a, slots), scale)
        what = _lora_what("lora_shrink", name, f"{in_features} input features, scale {scale}")
        assert_precise(got, exact, baseline, dtype, what, scale=_magnitude(exact))
        rows = (slots == LORA_PADDED_SLOT).nonzero().flatten()
        unpadded = OPS["lora_shrink"](x[rows], lora_a[LORA_PADDED_SLOT, None, :LORA_PADDED_RANK],
                                      torch.zeros_like(rows), scale)
        padding = torch.zeros(len(rows), LORA_RANK - LORA_PADDED_RANK, dtype=dtype)
        _check_padded_slot(got, torch.cat([unpadded, padding], 1), rows, dtype, what)


def check_lora_expand(fn, dtype, device, g):
    out_features = 130
    lora_b = _lora_weights(g, out_features, rank_dim=2, dtype=dtype)
    for name, step in LORA_STEPS.items():
        slots = torch.tensor(step)
        shrunk, base = _randn(g, len(step), LORA_RANK, dtype=dtype), _randn(g, len(step), out_features, dtype=dtype)
        exact, baseline = reference("lora_expand", shrunk, lora_b, slots, base)
        got = fn(*_on(device, shrunk, lora_b, slots, base))
        what = _lora_what("lora_expand", name, f"{out_features} output features")
        assert_precise(got, exact, baseline, dtype, what, scale=_magnitude(exact))
        rows = (slots == LORA_PADDED_SLOT).nonzero().flatten()
        unpadded_b = lora_b[LORA_PADDED_SLOT, None, :, :LORA_PADDED_RANK]
        unpadded = OPS["lora_expand"](shrunk[rows, :LORA_PADDED_RANK], unpadded_b, torch.zeros_like(rows), base[rows])
        _check_padded_slot(got, unpadded, rows, dtype, what)


# A fused projection's partitions (q, k and v of qkv: columns 0-129, 130-169, 170-209), and a
# projection of one.
LORA_SLICES = {"fused": (130, 40, 40), "single": (130,)}


def check_lora_add(fn, dtype, device, g):
    in_features, scale = 200, 0.37
    for layout, slices in LORA_SLICES.items():
        # Each partition's A and B as check_lora_shrink/expand draw them, stacked: A along the rank, B along the output.
        lora_a = torch.cat([_lora_weights(g, in_features, rank_dim=1, dtype=dtype) for _ in slices], 1)
        lora_b = torch.cat([_lora_weights(g, width, rank_dim=2, dtype=dtype) for width in slices], 1)
        for name, step in LORA_STEPS.items():
            slots = torch.tensor(step)
            x, y = _randn(g, len(step), in_features, dtype=dtype), _randn(g, len(step), sum(slices), dtype=dtype)
            exact, baseline = reference("lora_add", y.clone(), x, lora_a, lora_b, slots, slices, scale)
            target = y.to(device, copy=True)  # y itself stays as it was, for the checks below
            got = fn(target, *_on(device, x, lora_a, lora_b, slots), slices, scale)
            what = _lora_what("lora_add", name, f"partitions {list(slices)} of {in_features} input features, scale {scale}")
            assert got is target or (got.data_ptr() == target.data_ptr() and got.shape == target.shape), \
                f"{what}: must add into y in place and return it"
            base_rows = slots < 0
            assert torch.equal(target.cpu()[base_rows], y[base_rows]), \
                f"{what}: changed rows of tokens without an adapter (slot -1)"
            assert_precise(target, exact, baseline, dtype, what, scale=_magnitude(exact))
            rows = (slots == LORA_PADDED_SLOT).nonzero().flatten()
            unpadded_a = torch.cat([lora_a[LORA_PADDED_SLOT, None, i * LORA_RANK:i * LORA_RANK + LORA_PADDED_RANK]
                                    for i in range(len(slices))], 1)
            unpadded_b = lora_b[LORA_PADDED_SLOT, None, :, :LORA_PADDED_RANK]
            unpadded = OPS["lora_add"](y[rows].clone(), x[rows], unpadded_a, unpadded_b, torch.zeros_like(rows),
                                       slices, scale)
            _check_padded_slot(target, unpadded, rows, dtype, what)


def check_linear_lora(fn, dtype, device, g):
    in_features, scale = 200, 0.37
    for layout, slices in LORA_SLICES.items():
        lora_a = torch.cat([_lora_weights(g, in_features, rank_dim=1, dtype=dtype) for _ in slices], 1)
        lora_b = torch.cat([_lora_weights(g, width, rank_dim=2, dtype=dtype) for width in slices], 1)
        weight = (_randn(g, sum(slices), in_features) * in_features ** -0.5).to(dtype)
        bias = _randn(g, sum(slices), dtype=dtype) if layout == "single" else None
        on_bias = None if bias is None else bias.to(device)
        for name, step in LORA_STEPS.items():
            slots = torch.tensor(step)
            x = _randn(g, len(step), in_features, dtype=dtype)
            exact, baseline = reference("linear_lora", x, weight, bias, lora_a, lora_b, slots, slices, scale)
            got = fn(*_on(device, x, weight), on_bias, *_on(device, lora_a, lora_b, slots), slices, scale)
            what = _lora_what("linear_lora", name, f"a [{sum(slices)}, {in_features}] weight{' and bias' if layout == 'single' else ''}, "
                                                   f"partitions {list(slices)}, scale {scale}")
            assert_precise(got, exact, baseline, dtype, what, scale=_magnitude(exact))
            base_rows = slots < 0
            if base_rows.any():
                assert_precise(got.cpu()[base_rows], *reference("linear", x[base_rows], weight, bias), dtype,
                               f"{what}: the tokens without an adapter (slot -1) must get the projection alone")
            rows = (slots == LORA_PADDED_SLOT).nonzero().flatten()
            unpadded_a = torch.cat([lora_a[LORA_PADDED_SLOT, None, i * LORA_RANK:i * LORA_RANK + LORA_PADDED_RANK]
                                    for i in range(len(slices))], 1)
            unpadded = OPS["linear_lora"](x[rows], weight, bias, unpadded_a, lora_b[LORA_PADDED_SLOT, None, :, :LORA_PADDED_RANK],
                                          torch.zeros_like(rows), slices, scale)
            _check_padded_slot(got, unpadded, rows, dtype, what)


# Mixture-of-experts steps (E experts, top-k, tokens): routing skewed so one or two experts take
# most pairs and others none (router logits biased by +6 and -30), every top-k from 1 to 8 (8 of
# 8: every expert for every token), widths that are no multiple of a tile, and a rank holding
# half of the experts (expert parallelism: pairs of the others add nothing).
MOE_CASES = [
    # (tokens, experts, top_k, hidden, width, skew)
    (1, 8, 2, 64, 96, False),       # batch-1 decode, Mixtral's routing
    (3, 16, 8, 72, 40, False),      # a few decodes, Qwen3-MoE's k
    (37, 8, 1, 64, 48, True),       # a prefill chunk onto few experts, the rest empty
    (29, 8, 4, 48, 64, True),
    (12, 8, 8, 32, 32, False),      # every expert for every token
    (64, 12, 3, 40, 56, True),
]


def _moe_logits(g: torch.Generator, tokens: int, experts: int, skew: bool) -> torch.Tensor:
    logits = 2 * _randn(g, tokens, experts)
    if skew:  # uneven loads: the first expert takes most pairs, the second many; the last three none
        logits[:, 0] += 6
        logits[:, 1] += 3
        logits[:, -3:] -= 30
    return logits


def _moe_exact(x, logits, w13, w2, top_k, renormalize, **kwargs) -> torch.Tensor:
    """The reference in float64 (no intermediate rounding; routing weights and the activation in
    float32); float8 weights enter dequantized."""
    w13_scale, w2_scale = kwargs.pop("w13_scale", None), kwargs.pop("w2_scale", None)
    if w13_scale is not None:
        w13, w2 = w13.double() * w13_scale.double()[..., None], w2.double() * w2_scale.double()[..., None]
    return OPS["fused_moe"](x.double(), logits, w13.double(), w2.double(), top_k, renormalize, **kwargs)


def _fp8_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert and output channel e4m3 weights and float32 scales, as ``quantize_experts`` gives them."""
    scale = w.float().abs().amax(dim=-1).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (w.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def check_fused_moe(fn, dtype, device, g):
    for tokens, experts, top_k, hidden, width, skew in MOE_CASES:
        x = _randn(g, tokens, hidden, dtype=dtype)
        logits = _moe_logits(g, tokens, experts, skew)
        w13 = (_randn(g, experts, 2 * width, hidden) * hidden ** -0.5).to(dtype)
        w2 = (_randn(g, experts, hidden, width) * 2 * width ** -0.5).to(dtype)
        local = torch.arange(experts) % 2 == 1  # this rank's experts: the odd ones
        expert_map = torch.where(local, local.cumsum(0) - 1, -1).to(torch.int32)
        q13, s13 = _fp8_experts(w13)
        q2, s2 = _fp8_experts(w2)
        renormalize = top_k % 2 == 0
        variants = {
            "": ((x, logits, w13, w2), {}),
            ", this rank holding the odd experts": ((x, logits, w13[local], w2[local]), {"expert_map": expert_map}),
            ", float8 e4m3 weights with per-channel scales": ((x, logits, q13, q2), {"w13_scale": s13, "w2_scale": s2}),
        }
        for variant, (args, kwargs) in variants.items():
            exact = _moe_exact(*args, top_k, renormalize, **kwargs)
            baseline = OPS["fused_moe"](*args, top_k, renormalize, **kwargs)
            got = fn(*_on(device, *args), top_k, renormalize, "silu",
                     **{k: v.to(device) for k, v in kwargs.items()})
            loads = torch.bincount(torch.topk(logits, top_k).indices.flatten(), minlength=experts).tolist()
            what = (f"fused_moe ({tokens} tokens x top-{top_k} of {experts} experts, pairs per expert {loads}, "
                    f"hidden {hidden}, expert width {width}, renormalize={renormalize}{variant})")
            assert_precise(got, exact, baseline, dtype, what, scale=_magnitude(exact))


def check_copy_blocks(fn, dtype, device, g, layouts: list[tuple[Callable[[int], tuple[int, ...]], int]]):
    """``layouts``: (cache shape for n blocks, block dimension) of every attention backend's cache."""
    for shape_of, block_dim in layouts:
        caches = [_randn(g, *shape_of(10), dtype=dtype) for _ in range(2)]
        pairs = torch.tensor([[1, 6], [2, 7], [9, 3]], dtype=torch.int64)
        expected = [c.clone() for c in caches]
        OPS["copy_blocks"](expected, pairs, block_dim)
        got = _on(device, *caches)
        fn(got, pairs.to(device), block_dim)
        for layer, (ours, ref) in enumerate(zip(got, expected)):
            changed = (ours.cpu() != ref).movedim(block_dim, 0).flatten(1).any(1).nonzero().flatten().tolist()
            assert not changed, (f"copy_blocks (cache {list(shape_of(10))}, block dim {block_dim}, src->dst "
                                 f"{pairs.tolist()}): layer {layer} blocks {changed} differ from the reference")


def check_swap_blocks(fn, dtype, device, g, layouts: list[tuple[Callable[[int], tuple[int, ...]], int]]):
    """Offload blocks to a host copy (pinned where the device is not the CPU) and load others
    back, for every attention backend's cache layout. The results are read only through work
    queued after the calls, which the contract orders after the copies."""
    for shape_of, block_dim in layouts:
        caches = [_randn(g, *shape_of(10), dtype=dtype) for _ in range(2)]
        hosts = [_randn(g, *host_cache_shape(shape_of(10), block_dim, 6), dtype=dtype) for _ in range(2)]
        out_pairs = torch.tensor([[1, 4], [7, 0], [3, 2]], dtype=torch.int64)
        in_pairs = torch.tensor([[5, 4], [2, 0], [9, 5]], dtype=torch.int64)
        expected_caches, expected_hosts = [c.clone() for c in caches], [h.clone() for h in hosts]
        OPS["swap_blocks"](expected_caches, expected_hosts, out_pairs, block_dim, to_host=True)
        OPS["swap_blocks"](expected_caches, expected_hosts, in_pairs, block_dim, to_host=False)
        got_caches = _on(device, *caches)
        got_hosts = [h.pin_memory() if device.type != "cpu" else h.clone() for h in hosts]
        fn(got_caches, got_hosts, out_pairs, block_dim, to_host=True)
        fn(got_caches, got_hosts, in_pairs, block_dim, to_host=False)
        got_caches = [c.cpu() for c in got_caches]  # queued after both calls: the copies are done
        what = f"swap_blocks (cache {list(shape_of(10))}, block dim {block_dim}, to host {out_pairs.tolist()}, back {in_pairs.tolist()})"
        for layer, (ours, ref) in enumerate(zip(got_hosts, expected_hosts)):
            changed = (ours != ref).flatten(1).any(1).nonzero().flatten().tolist()
            assert not changed, f"{what}: layer {layer} host blocks {changed} differ from the reference"
        for layer, (ours, ref) in enumerate(zip(got_caches, expected_caches)):
            changed = (ours != ref).movedim(block_dim, 0).flatten(1).any(1).nonzero().flatten().tolist()
            assert not changed, f"{what}: layer {layer} device blocks {changed} differ from the reference"


def check_apply_top_k_top_p_min_p(fn, dtype, device, g):
    logits = 3 * _randn(g, 6, 100)  # logits are float32 whatever the model dtype
    settings = {"top_k": [0, 5, 50, 1, 0, 100], "top_p": [1.0, 0.9, 0.5, 1.0, 0.3, 1.0], "min_p": [0.0, 0.0, 0.1, 0.0, 0.0, 0.05]}
    top_k, top_p, min_p = torch.tensor(settings["top_k"]), torch.tensor(settings["top_p"]), torch.tensor(settings["min_p"])
    expected = OPS["apply_top_k_top_p_min_p"](logits, top_k, top_p, min_p)
    got = fn(*_on(device, logits, top_k, top_p, min_p)).cpu()
    differ = ((got == float("-inf")) != (expected == float("-inf"))).sum(-1).tolist()
    assert not any(differ), (f"apply_top_k_top_p_min_p ({settings}): the tokens kept differ from the reference's "
                             f"in rows {[i for i, n in enumerate(differ) if n]} (by {differ} tokens)")
    kept = expected != float("-inf")
    assert torch.equal(got[kept], expected[kept]), "apply_top_k_top_p_min_p changed the logits it kept"


def check_apply_token_bitmask(fn, dtype, device, g):
    """Rows of a vocabulary not a multiple of 32 (the last word partly past it), masks with the
    sign bit set and words all ones or all zeros, a subset of the rows in no particular order."""
    for batch, vocab, rows in ((6, 100, [4, 0, 2]), (3, 70, [0, 1, 2]), (5, 1000, [3])):
        logits = 3 * _randn(g, batch, vocab)
        words = (vocab + 31) // 32
        bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), generator=g, dtype=torch.int64).to(torch.int32)
        bitmask[0, 0] = -1  # every token of the word allowed
        if words > 1:
            bitmask[-1, 1] = 0  # none of them
        index = torch.tensor(rows)
        expected = OPS["apply_token_bitmask"](logits.clone(), bitmask, index)
        target = logits.to(device, copy=True)
        got = fn(target, *_on(device, bitmask, index))
        what = f"apply_token_bitmask (logits [{batch}, {vocab}], rows {rows})"
        assert got.data_ptr() == target.data_ptr() and got.shape == target.shape, \
            f"{what}: must mask the logits in place and return them"
        differ = ((got.cpu() == float("-inf")) != (expected == float("-inf"))).sum(-1).tolist()
        assert not any(differ), f"{what}: the tokens masked differ from the reference's by {differ} tokens per row"
        kept = expected != float("-inf")
        assert torch.equal(got.cpu()[kept], expected[kept]), f"{what}: changed logits it must keep"


def check_propose_ngram_batched(fn, dtype, device, g):
    """Rows of small vocabularies (runs of every length repeat, so every n in [min_n, max_n] is
    the answer somewhere), lengths from 1 to the full width, and past each row's length the
    tokens that would make the longest match there: a kernel that reads past a row finds it."""
    for batch, capacity, vocab, k, min_n, max_n in ((6, 40, 3, 4, 1, 3), (5, 300, 4, 5, 2, 5), (4, 1100, 6, 3, 2, 4),
                                                    (3, 64, 2, 1, 1, 1)):
        history = torch.randint(0, vocab, (batch, capacity), generator=g)
        lengths = torch.randint(1, capacity + 1, (batch,), generator=g)
        lengths[0], lengths[-1] = 1, capacity
        for row, length in enumerate(lengths.tolist()):
            tail = history[row, max(0, length - max_n):length]
            room = capacity - length
            history[row, length:] = tail.repeat(room // max(1, len(tail)) + 1)[:room]
        expected = OPS["propose_ngram_batched"](history, lengths, k, min_n, max_n)
        got = fn(*_on(device, history, lengths), k, min_n, max_n)
        what = f"propose_ngram_batched ([{batch}, {capacity}] of {vocab} tokens, k {k}, n in [{min_n}, {max_n}])"
        assert torch.equal(got[1].cpu(), expected[1]), f"{what}: counts {got[1].tolist()}, reference {expected[1].tolist()}"
        assert torch.equal(got[0].cpu(), expected[0]), f"{what}: proposals differ from the reference's"


CHECKS: dict[str, Callable] = {
    "linear": check_linear,
    "rms_norm": check_rms_norm,
    "fused_add_rms_norm": check_fused_add_rms_norm,
    "rotary_embedding": check_rotary_embedding,
    "qk_norm_rotary_embedding": check_qk_norm_rotary_embedding,
    "silu_and_mul": check_silu_and_mul,
    "gelu_and_mul": check_gelu_and_mul,
    "lora_shrink": check_lora_shrink,
    "lora_expand": check_lora_expand,
    "lora_add": check_lora_add,
    "linear_lora": check_linear_lora,
    "fused_moe": check_fused_moe,
    "copy_blocks": check_copy_blocks,
    "swap_blocks": check_swap_blocks,
    "apply_top_k_top_p_min_p": check_apply_top_k_top_p_min_p,
    "apply_token_bitmask": check_apply_token_bitmask,
    "propose_ngram_batched": check_propose_ngram_batched,
}
DTYPE_INDEPENDENT = {"apply_top_k_top_p_min_p", "apply_token_bitmask", "propose_ngram_batched"}
"""Ops whose inputs have one dtype whatever the model's (logits are float32, token ids int64)."""
