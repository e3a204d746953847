"""CPU kernels: the reference semantics in fewer, larger torch ops.

On the CPU each small op costs microseconds of dispatch, and a decode step of a small model
runs thousands of them; these versions cut the op count (see benchmarks/offline_vs_hf.py).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from runtime.platform import Kernel
from runtime.platform.reference import linear as reference_linear
from runtime.platform.reference import rotary_embedding as reference_rotary

from . import batch_invariant, native
from .lora import lora_add, lora_expand, lora_shrink
from .moe import batch_invariant_fused_moe, fused_moe


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _norms_natively(x, weight):
        return _native_rms_norm(x, None, weight, eps)
    # torch's fused RMSNorm accumulates in float32 for reduced-precision inputs, like the reference.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    if x.dim() == residual.dim() == 2 and _norms_natively(x, weight) and _norms_natively(residual, weight):
        summed = torch.empty(x.shape)
        return _native_rms_norm(x, residual, weight, eps, summed), summed
    summed = x + residual
    return F.rms_norm(summed, (x.shape[-1],), weight, eps), summed


def _norms_natively(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rows_avx2.c normalizes ``x`` in place of torch: float32 rows [T, D] or heads
    [T, H, D], each row contiguous, the heads of a token too. F.rms_norm is seven small ops on the
    CPU, about 20 us for one 576-wide row (61 a decode token of the embedded model); the C call is
    a few. The test reads strides, never sizes, so a batch of one takes the path a larger batch
    does (``is_contiguous`` would call a one-token view contiguous and a larger one not)."""
    return (x.dtype == weight.dtype == torch.float32 and x.dim() in (2, 3) and x.stride(-1) == 1
            and (x.dim() == 2 or x.stride(1) == x.shape[2]) and weight.is_contiguous() and weight.shape == x.shape[-1:]
            and native.library() is not None)


def _native_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     summed: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty(x.shape)
    native.library().rms_norm(x.data_ptr(), x.stride(0), 1 if x.dim() == 2 else x.shape[1],
                              None if residual is None else residual.data_ptr(), 0 if residual is None else residual.stride(0),
                              weight.data_ptr(), out.data_ptr(), None if summed is None else summed.data_ptr(),
                              out.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
                     is_neox: bool = True):
    """NeoX-style rotation of the full head as one elementwise pass over q and k together:
    out = x * [cos, cos] + roll(x, D/2) * [-sin, sin]. Other layouts take the reference path."""
    head_dim = query.shape[-1]
    if not is_neox or cos_sin_cache.shape[-1] != head_dim:
        return reference_rotary(positions, query, key, cos_sin_cache, is_neox)
    if _rotates_natively(positions, query, key, cos_sin_cache):
        return _native_rotary(positions, query, key, cos_sin_cache)
    cos, sin = _signed_table(cos_sin_cache).index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    heads = query.shape[1]
    qk = torch.cat([query, key], dim=1)
    if qk.dtype != torch.float32:
        qk = qk.float()
    out = torch.addcmul(qk * cos, qk.roll(head_dim // 2, dims=-1), sin)
    if out.dtype != query.dtype:
        out = out.to(query.dtype)
    return out[:, :heads], out[:, heads:]


def _rotates_natively(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor) -> bool:
    """rows_avx2.c's rotation reads float32 heads contiguous within each token, int64 positions
    and a float32 table in place (positions index the table unchecked: the engine keeps them below
    the model's maximum length, which the table covers)."""
    head_dim = query.shape[-1]
    return (query.dtype == key.dtype == cos_sin_cache.dtype == torch.float32 and positions.dtype == torch.int64
            and positions.dim() == 1 and cos_sin_cache.is_contiguous()
            and query.stride()[1:] == key.stride()[1:] == (head_dim, 1) and native.library() is not None)


def _native_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor):
    tokens, heads, head_dim = query.shape
    q_out, k_out = torch.empty(query.shape), torch.empty(key.shape)
    native.library().rotary_neox(positions.data_ptr(), positions.stride(0), query.data_ptr(), query.stride(0),
                                 key.data_ptr(), key.stride(0),
                                 cos_sin_cache.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), tokens, heads,
                                 key.shape[1], head_dim)
    return q_out, k_out


_SIGNED_TABLES: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _signed_table(cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """``[positions, 2 * D]``: ``[cos, cos, -sin, sin]`` of each position, built once per cache
    (a model's rotary buffer lives as long as the model) so a layer's rotation selects its rows
    in one op instead of rebuilding them from the cache's ``[cos, sin]`` in five."""
    entry = _SIGNED_TABLES.get(id(cos_sin_cache))
    if entry is not None and entry[0]() is cos_sin_cache:
        return entry[1]
    cos, sin = cos_sin_cache.chunk(2, dim=-1)
    table = torch.cat([cos, cos, -sin, sin], dim=-1)
    key = id(cos_sin_cache)
    _SIGNED_TABLES[key] = (weakref.ref(cos_sin_cache, lambda _: _SIGNED_TABLES.pop(key, None)), table)
    return table


def swap_blocks(kv_caches: list[torch.Tensor], host_caches: list[torch.Tensor], pairs: torch.Tensor,
                block_dim: int = 1, to_host: bool = True) -> None:
    # Both copies are in the same memory: one gather and one scatter per layer, done on return.
    device_ids, host_ids = pairs[:, 0], pairs[:, 1]
    for cache, host in zip(kv_caches, host_caches):
        blocks = cache.movedim(block_dim, 0)
        if to_host:
            host[host_ids] = blocks[device_ids]
        else:
            blocks[device_ids] = host[host_ids]


# rms_norm and rotary compute each row on its own (a reduction along the row, elementwise); torch's
# matmul does not (see batch_invariant.py): the default mode keeps it (the higher priority), and
# --deterministic, which only considers batch-invariant kernels, takes the padded one (fused_moe
# likewise: the grouped matmul by default, each expert's rows padded under the mode).
KERNELS = [
    Kernel("cpu", "rms_norm", rms_norm, batch_invariant=True),
    Kernel("cpu", "fused_add_rms_norm", fused_add_rms_norm, batch_invariant=True),
    Kernel("cpu", "rotary_embedding", rotary_embedding, batch_invariant=True),
    Kernel("cpu", "linear", reference_linear, priority=1),
    Kernel("cpu", "linear", batch_invariant.linear, batch_invariant=True),
    Kernel("cpu", "lora_shrink", lora_shrink),
    Kernel("cpu", "lora_expand", lora_expand),
    Kernel("cpu", "lora_add", lora_add),
    Kernel("cpu", "fused_moe", fused_moe, priority=1),
    Kernel("cpu", "fused_moe", batch_invariant_fused_moe, batch_invariant=True),
    Kernel("cpu", "swap_blocks", swap_blocks, batch_invariant=True),
]
