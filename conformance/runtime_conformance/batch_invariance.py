"""The batch-invariance check of ``--deterministic`` (contract 1.10), shared by every op that claims it.

A row's output must be bitwise equal computed alone and inside batches of 2 to 64 random rows,
at a random position. Each op is described by how to build ``n`` rows of its inputs and how to
run it on a selection of those rows; the check compares row ``target`` of every batch with the
batch of that row alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from runtime.platform import AttentionMetadata, AttentionSpec
from runtime.platform.reference import build_cos_sin_cache

BATCH_SIZES = (2, 3, 5, 8, 9, 17, 33, 64)
TRIALS_PER_SIZE = 1


@dataclass
class RowOp:
    """``make(n, g)`` -> the inputs of n rows; ``run(inputs, rows)`` -> the op's output for those
    rows: a tensor (or tuple of tensors) whose first dimension is the row, or a list of one tensor per row."""

    make: Callable[[int, torch.Generator], dict]
    run: Callable[[dict, torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class RowDims:
    """The sizes the row ops are checked at: small by default (the conformance suite); a plugin's
    own tests pass a real model's (a kernel may change its plan with the width)."""

    hidden: int = 576
    """Input width of the linear and the norms."""
    out_features: int = 320
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    vocab: int = 1000
    rope_theta: float = 10000.0
    experts: int = 8
    """fused_moe: experts, two routed a token (so a batch's tokens share some)."""
    expert_width: int = 96


def _randn(g, *shape, dtype):
    return torch.randn(*shape, generator=g).to(dtype)


def row_ops(fn: Callable, dtype: torch.dtype, device: torch.device, dims: RowDims = RowDims()) -> dict[str, RowOp]:
    """The row form of every op a batch-invariance claim means something for."""
    on = lambda t: t.to(device)  # noqa: E731
    weight_k, weight_n, width, head = dims.hidden, dims.out_features, dims.hidden, dims.head_dim
    return {
        "linear": RowOp(
            lambda n, g: {"x": _randn(g, n, weight_k, dtype=dtype), "w": _randn(g, weight_n, weight_k, dtype=dtype),
                          "b": _randn(g, weight_n, dtype=dtype)},
            lambda a, r: fn(on(a["x"][r]), on(a["w"]), on(a["b"]))),
        "rms_norm": RowOp(
            lambda n, g: {"x": _randn(g, n, width, dtype=dtype), "w": _randn(g, width, dtype=dtype)},
            lambda a, r: fn(on(a["x"][r]), on(a["w"]), 1e-6)),
        "fused_add_rms_norm": RowOp(
            lambda n, g: {"x": _randn(g, n, width, dtype=dtype), "res": _randn(g, n, width, dtype=dtype),
                          "w": _randn(g, width, dtype=dtype)},
            lambda a, r: fn(on(a["x"][r]), on(a["res"][r]), on(a["w"]), 1e-6)),
        "rotary_embedding": RowOp(
            lambda n, g: {"pos": torch.randint(0, 512, (n,), generator=g), "q": _randn(g, n, dims.heads, head, dtype=dtype),
                          "k": _randn(g, n, dims.kv_heads, head, dtype=dtype),
                          "cache": build_cos_sin_cache(head, 512, dims.rope_theta).to(dtype)},
            lambda a, r: fn(on(a["pos"][r]), on(a["q"][r]), on(a["k"][r]), on(a["cache"]), True)),
        "qk_norm_rotary_embedding": RowOp(
            lambda n, g: {"pos": torch.randint(0, 512, (n,), generator=g), "q": _randn(g, n, dims.heads, head, dtype=dtype),
                          "k": _randn(g, n, dims.kv_heads, head, dtype=dtype), "qw": _randn(g, head, dtype=dtype),
                          "kw": _randn(g, head, dtype=dtype), "cache": build_cos_sin_cache(head, 512, dims.rope_theta).to(dtype)},
            lambda a, r: fn(on(a["pos"][r]), on(a["q"][r]), on(a["k"][r]), on(a["qw"]), on(a["kw"]), 1e-6, on(a["cache"]),
                            True)),
        "silu_and_mul": RowOp(lambda n, g: {"x": _randn(g, n, 2 * dims.intermediate, dtype=dtype)},
                              lambda a, r: fn(on(a["x"][r]))),
        "gelu_and_mul": RowOp(lambda n, g: {"x": _randn(g, n, 2 * dims.intermediate, dtype=dtype)},
                              lambda a, r: fn(on(a["x"][r]))),
        "fused_moe": RowOp(
            lambda n, g: {"x": _randn(g, n, width, dtype=dtype), "logits": torch.randn(n, dims.experts, generator=g),
                          "w13": (_randn(g, dims.experts, 2 * dims.expert_width, width, dtype=torch.float32)
                                  * width ** -0.5).to(dtype),
                          "w2": (_randn(g, dims.experts, width, dims.expert_width, dtype=torch.float32)
                                 * dims.expert_width ** -0.5).to(dtype)},
            lambda a, r: fn(on(a["x"][r]), on(a["logits"][r]), on(a["w13"]), on(a["w2"]), 2, True)),
        "apply_top_k_top_p_min_p": RowOp(
            lambda n, g: {"logits": _randn(g, n, dims.vocab, dtype=dtype) * 3,
                          "k": torch.randint(0, 60, (n,), generator=g),
                          "p": torch.rand(n, generator=g) * 0.5 + 0.5, "m": torch.rand(n, generator=g) * 0.1},
            lambda a, r: fn(on(a["logits"][r]), on(a["k"][r]), on(a["p"][r]), on(a["m"][r]))),
    }


def _parts(output, position: int) -> list[torch.Tensor]:
    """The row at ``position`` of each of the op's outputs."""
    if isinstance(output, list):
        return [output[position].cpu()]
    return [t[position:position + 1].cpu() for t in (output if isinstance(output, tuple) else (output,))]


def assert_batch_invariant(op: RowOp, name: str, seed: int = 0, sizes: tuple[int, ...] = BATCH_SIZES) -> None:
    """Every batch size of ``sizes``, row 0 of the inputs at a random position among random rows:
    its output must equal, bitwise, its output alone."""
    g = torch.Generator().manual_seed(seed)
    pool = max(sizes) * 2
    inputs = op.make(pool, g)
    alone = _parts(op.run(inputs, torch.tensor([0])), 0)
    for size in sizes:
        for _ in range(TRIALS_PER_SIZE):
            rows = torch.randperm(pool - 1, generator=g)[:size] + 1
            position = int(torch.randint(0, size, (), generator=g))
            rows[position] = 0
            batch = _parts(op.run(inputs, rows), position)
            for part, (got, expected) in enumerate(zip(batch, alone)):
                if not torch.equal(got, expected):
                    diff = (got.double() - expected.double()).abs().max().item()
                    raise AssertionError(f"{name} is not batch-invariant: output {part} of a row differs alone and "
                                         f"at position {position} of a batch of {size} (max difference {diff:g})")


BLOCK = 16


def attention_row_op(backend_cls, dtype, device, dims: RowDims = RowDims()) -> RowOp:
    """Rows are sequences: each a context of random length whose last tokens are new. Sequence 0
    is the target; its new tokens' outputs must not depend on the sequences beside it. Each row's
    new-token count is random (1: decode), so a batch mixes decode rows and prefill chunks."""
    heads, kv_heads, dim = dims.heads, dims.kv_heads, dims.head_dim
    spec = AttentionSpec(heads, kv_heads, dim, dim ** -0.5, dtype, BLOCK, deterministic=True)
    backend = backend_cls(spec)

    def make(n, g):
        lens = torch.randint(1, 80, (n,), generator=g)
        new = torch.minimum(lens, torch.randint(1, 3, (n,), generator=g) ** 3)  # 1 or 8 new tokens
        return {"lens": lens, "new": new, "q": [_r(g, int(m), heads, dim, dtype) for m in new],
                "k": [_r(g, int(s), kv_heads, dim, dtype) for s in lens],
                "v": [_r(g, int(s), kv_heads, dim, dtype) for s in lens]}

    def run(a, rows):
        max_blocks = -(-80 // BLOCK)
        cache = torch.zeros(backend_cls.kv_cache_shape(len(rows) * max_blocks + 1, BLOCK, kv_heads, dim),
                            dtype=spec.cache_dtype, device=device)
        table = torch.arange(len(rows) * max_blocks).view(len(rows), max_blocks).int() + 1
        context, new_tokens = [], []
        for i, r in enumerate(rows.tolist()):
            length, new = int(a["lens"][r]), int(a["new"][r])
            old = length - new
            if old:
                context.append((i, 0, torch.zeros(old, heads, dim, dtype=dtype), a["k"][r][:old], a["v"][r][:old]))
            new_tokens.append((i, old, a["q"][r], a["k"][r][old:], a["v"][r][old:]))
        if context:
            _forward(backend, device, cache, table, context)
        return _forward(backend, device, cache, table, new_tokens)

    return RowOp(make, run)


def _forward(backend, device, cache, table, chunks):
    """One step over ``chunks`` [(table row, first position, q, k, v)]: the backend writes the
    chunks' K/V into its own cache layout and attends; returns each chunk's output."""
    starts, slots, seq_lens = [0], [], []
    for row, first, q, _, _ in chunks:
        positions = torch.arange(first, first + q.shape[0])
        slots.append(table[row, positions // BLOCK].long() * BLOCK + positions % BLOCK)
        starts.append(starts[-1] + q.shape[0])
        seq_lens.append(first + q.shape[0])
    picked = table[[c[0] for c in chunks]]
    meta = AttentionMetadata(torch.tensor(starts, dtype=torch.int32, device=device),
                             torch.tensor(seq_lens, dtype=torch.int32, device=device), picked.to(device),
                             torch.cat(slots).to(device), max(e - b for b, e in zip(starts, starts[1:])),
                             max(seq_lens), starts, seq_lens)
    q, k, v = (torch.cat([c[i] for c in chunks]).to(device) for i in (2, 3, 4))
    out = backend.forward(q, k, v, cache, meta).cpu()
    return [out[b:e] for b, e in zip(starts, starts[1:])]


CHUNKINGS = ((70,), (1, 69), (7, 63), (16, 54), (33, 37), (64, 6), (65, 1, 1, 1, 1, 1))
"""Ways one 70-token sequence is fed: whole, split anywhere (where a step's token budget ends), decoded."""


def assert_chunking_invariant(backend_cls, dtype, device, dims: RowDims = RowDims()) -> None:
    """One sequence fed in each of :data:`CHUNKINGS`: every query's output bitwise the same. A
    prompt's chunks are cut where the step's token budget runs out, which depends on the batch."""
    heads, kv_heads, dim = dims.heads, dims.kv_heads, dims.head_dim
    backend = backend_cls(AttentionSpec(heads, kv_heads, dim, dim ** -0.5, dtype, BLOCK, deterministic=True))
    g = torch.Generator().manual_seed(0)
    length = sum(CHUNKINGS[0])
    q, k, v = (_r(g, length, h, dim, dtype) for h in (heads, kv_heads, kv_heads))
    table = torch.arange(-(-length // BLOCK)).view(1, -1).int() + 1
    whole = None
    for sizes in CHUNKINGS:
        cache = torch.zeros(backend_cls.kv_cache_shape(table.numel() + 1, BLOCK, kv_heads, dim),
                            dtype=backend.spec.cache_dtype, device=device)
        outputs, first = [], 0
        for size in sizes:
            end = first + size
            outputs += _forward(backend, device, cache, table, [(0, first, q[first:end], k[first:end], v[first:end])])
            first = end
        got = torch.cat(outputs)
        if whole is None:
            whole = got
        elif not torch.equal(got, whole):
            position = int((got != whole).flatten(1).any(1).nonzero()[0])
            diff = (got.double() - whole.double()).abs().max().item()
            raise AssertionError(f"{backend_cls.name} ({dtype}) depends on where a prompt is cut: fed in chunks {sizes}, "
                                 f"query {position} differs from the whole prompt's (max difference {diff:g})")


def _r(g, n, heads, dim, dtype):
    return torch.randn(n, heads, dim, generator=g).to(dtype)
