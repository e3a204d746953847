"""Batch invariance (contract 1.10, ``--deterministic``): every kernel, quantization method and
attention backend of the platform that claims ``batch_invariant`` computes a row bitwise the same
alone and inside batches of 2 to 64 random rows (see :mod:`runtime_conformance.batch_invariance`).
A platform without ``supports_deterministic`` has nothing to prove here."""

from __future__ import annotations

import torch

from runtime.platform import AttentionMetadata, AttentionSpec

from ..batch_invariance import RowOp, assert_batch_invariant, row_ops
from ..compare import dtype_name
from ..params import case, parametrize, unsupported
from ..quant_data import random_weight, unsupported_reason

COLS = 512


def pytest_generate_tests(metafunc):
    make = {"test_kernel_batch_invariant": _kernels, "test_quantization_batch_invariant": _methods,
            "test_attention_batch_invariant": _backends}
    parametrize(metafunc, make[metafunc.function.__name__])


def _claims(target):
    return target.platform is not None and target.platform.supports_deterministic


def _kernels(target):
    claimed = [k for k in target.kernels if k.batch_invariant and k.op in row_ops(None, torch.float32, None)]
    if not _claims(target) or not claimed:
        yield unsupported("none", "the platform claims no batch-invariant row kernel (--deterministic)")
        return
    for kernel in claimed:
        for dtype in target.platform.supported_dtypes:
            yield case((kernel, dtype), f"{kernel.op}-{kernel.fn.__module__}-{dtype_name(dtype)}")


def _methods(target):
    claimed = [m for m in target.quantization_methods if m.batch_invariant]
    if not _claims(target) or not claimed:
        yield unsupported("none", "no quantization method claims batch invariance (--deterministic)")
        return
    for method in claimed:
        for qtype in sorted(method.supported_qtypes):
            if unsupported_reason(method.name, qtype) is None:
                yield case((method, qtype), f"{method.name}-{qtype}")
        if method.quantizes_dense:
            yield case((method, None), f"{method.name}-quantize")


def _backends(target):
    claimed = [b for b in target.backends if b.batch_invariant]
    if not _claims(target) or not claimed:
        yield unsupported("none", "no attention backend claims batch invariance (--deterministic)")
        return
    for backend in claimed:
        for dtype in backend.supported_dtypes:
            if dtype in target.platform.supported_dtypes:
                yield case((backend, dtype), f"{backend.name}-{dtype_name(dtype)}")


def test_kernel_batch_invariant(case, target):
    kernel, dtype = case
    op = row_ops(kernel.fn, dtype, target.device)[kernel.op]
    assert_batch_invariant(op, f"{kernel.op} ({kernel.fn.__module__}, {dtype_name(dtype)})")


def test_quantization_batch_invariant(case, target):
    method_cls, qtype = case
    method = method_cls()
    method.deterministic = True
    device = target.device
    if qtype is None:
        weight = method.quantize(torch.randn(320, COLS, generator=torch.Generator().manual_seed(2)).to(device))
    else:
        raw, _ = random_weight(method.name, qtype, 64, COLS, seed=1)
        weight = method.load(raw, torch.float32, device)
    op = RowOp(lambda n, g: {"x": torch.randn(n, COLS, generator=g)},
               lambda a, r: method.apply(weight, a["x"][r].to(device)))
    assert_batch_invariant(op, f"{method_cls.__name__}.apply ({method.name} {qtype or 'quantized at load'})")


BLOCK, HEADS, KV_HEADS, DIM = 16, 4, 2, 64


def _attention_op(backend_cls, dtype, device) -> RowOp:
    """Rows are sequences: each a context of random length whose last tokens are new. Sequence 0
    is the target; its new tokens' outputs must not depend on the sequences beside it. Each row's
    new-token count is random (1: decode), so a batch mixes decode rows and prefill chunks."""
    spec = AttentionSpec(HEADS, KV_HEADS, DIM, DIM ** -0.5, dtype, BLOCK, deterministic=True)
    backend = backend_cls(spec)

    def make(n, g):
        lens = torch.randint(1, 80, (n,), generator=g)
        new = torch.minimum(lens, torch.randint(1, 3, (n,), generator=g) ** 3)  # 1 or 8 new tokens
        return {"lens": lens, "new": new, "q": [_r(g, int(m), HEADS, dtype) for m in new],
                "k": [_r(g, int(s), KV_HEADS, dtype) for s in lens], "v": [_r(g, int(s), KV_HEADS, dtype) for s in lens]}

    def forward(cache, table, chunks):
        """One step over ``chunks`` [(table row, first position, q, k, v)]: the backend writes the
        chunk's K/V into its own cache layout and attends; returns each chunk's output."""
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

    def run(a, rows):
        max_blocks = -(-80 // BLOCK)
        cache = torch.zeros(backend_cls.kv_cache_shape(len(rows) * max_blocks + 1, BLOCK, KV_HEADS, DIM),
                            dtype=spec.cache_dtype, device=device)
        table = torch.arange(len(rows) * max_blocks).view(len(rows), max_blocks).int() + 1
        context, new_tokens = [], []
        for i, r in enumerate(rows.tolist()):
            length, new = int(a["lens"][r]), int(a["new"][r])
            old = length - new
            if old:
                context.append((i, 0, torch.zeros(old, HEADS, DIM, dtype=dtype), a["k"][r][:old], a["v"][r][:old]))
            new_tokens.append((i, old, a["q"][r], a["k"][r][old:], a["v"][r][old:]))
        if context:
            forward(cache, table, context)
        return forward(cache, table, new_tokens)

    return RowOp(make, run)


def _r(g, n, heads, dtype):
    return torch.randn(n, heads, DIM, generator=g).to(dtype)


def test_attention_batch_invariant(case, target):
    backend_cls, dtype = case
    assert_batch_invariant(_attention_op(backend_cls, dtype, target.device), f"{backend_cls.name} ({dtype_name(dtype)})")
