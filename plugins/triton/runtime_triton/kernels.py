"""Fused Triton kernels for the ops where one pass saves memory traffic over torch's several.

Each replaces the reference op of the same name (``runtime.platform.reference``) with its exact
semantics: float32 math, results rounded once to the input dtype (the fused residual add rounds
the sum first, as the reference does, so the norm sees the same values).

- ``rms_norm`` / ``fused_add_rms_norm``: one program per row; the add, the norm and the scale
  in one read and one write instead of four torch kernels.
- ``rotary_embedding``: one program per token rotates every query and key head, NeoX halves or
  GPT-J pairs, partial rotary passing the rest through; ``qk_norm_rotary_embedding`` RMS-norms
  each head in the same program first (Qwen3: two launches a layer fewer than rms_norm twice).
- ``silu_and_mul`` / ``gelu_and_mul``: the activation and the product in one pass.

``registry.py`` registers these and the other modules' ops for a platform.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dependent import as_dependent, wait_for_the_launch_before
from .paged_attention import tanh

# Elements one activation program handles along a row.
ACTIVATION_BLOCK = 1024


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, n_cols, eps,
                     stride_x, stride_r, stride_o, stride_ro, x_heads, stride_x_head,
                     BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr, DEPENDENT: tl.constexpr):
    """One row; ``x``'s rows may be heads of ``x_heads`` a token (token stride ``stride_x``, head
    stride ``stride_x_head``), as a query or key slice of a fused projection's output is.
    ``DEPENDENT``: launched as a programmatic dependent of the launch before (``dependent.py``)."""
    wait_for_the_launch_before(DEPENDENT)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + row // x_heads * stride_x + row % x_heads * stride_x_head
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] as [rows, N] with unit column stride (a view when the layout allows)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _norm_warps(block: int) -> int:
    return min(16, max(1, block // 256))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per row of the last dimension. A [tokens, heads, size] slice of a wider row (a query's or
    key's heads in a fused projection's output, normed per head as Qwen3 does) is read in place:
    no copy to make its rows evenly spaced."""
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.dim() == 3 and x.stride(-1) == 1 and x.stride(1) == n and x.stride(0) != x.shape[1] * n:
        rows, heads, stride_token, stride_head = x, x.shape[1], x.stride(0), x.stride(1)
    else:
        rows = _rows(x)
        heads, stride_token, stride_head = 1, rows.stride(0), 0
    count = out.numel() // n
    block = triton.next_power_of_2(n)
    if count:
        _rms_norm_kernel[(count,)](rows, rows, weight, out, out, n, eps, stride_token, stride_token, n, n, heads,
                                   stride_head, BLOCK=block, ADD_RESIDUAL=False, num_warps=_norm_warps(block),
                                   **as_dependent(x.device))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    rows, res = _rows(x), _rows(residual)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(rows.shape[1])
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, res, weight, out, summed, rows.shape[1], eps,
                                           rows.stride(0), res.stride(0), out.stride(0), summed.stride(0), 1, 0,
                                           BLOCK=block, ADD_RESIDUAL=True, num_warps=_norm_warps(block),
                                           **as_dependent(x.device))
    return out.view(x.shape), summed.view(x.shape)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, token, num_heads, stride_t, stride_h, cos, sin, half,
                  head_size, weight_ptr, eps, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
                  HEAD_PAD: tl.constexpr, IS_NEOX: tl.constexpr, NORM: tl.constexpr):
    """Rotate the first 2 * half features of every head of one token; copy the rest as they are.
    With ``NORM`` each head is first RMS-normed with ``weight_ptr`` [head_size] and rounded to the
    output dtype, as rms_norm would leave it (the features are read once more for the rotation)."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    pairs = tl.arange(0, HALF_PAD)[None, :]
    dims = tl.arange(0, HEAD_PAD)[None, :]
    if IS_NEOX:
        first = pairs
        second = pairs + half
    else:
        first = 2 * pairs
        second = 2 * pairs + 1
    mask = (heads < num_heads) & (pairs < half)
    src = src_ptr + token * stride_t + heads * stride_h
    dst = dst_ptr + token * num_heads * head_size + heads * head_size
    ty = dst_ptr.dtype.element_ty
    rest = (heads < num_heads) & (dims >= 2 * half) & (dims < head_size)
    x1 = tl.load(src + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + second, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        whole = tl.load(src + dims, mask=(heads < num_heads) & (dims < head_size), other=0.0).to(tl.float32)
        inv_rms = tl.math.rsqrt(tl.sum(whole * whole, 1) / head_size + eps)[:, None]
        w1 = tl.load(weight_ptr + first, mask=pairs < half, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + second, mask=pairs < half, other=0.0).to(tl.float32)
        x1 = (x1 * inv_rms * w1).to(ty).to(tl.float32)
        x2 = (x2 * inv_rms * w2).to(ty).to(tl.float32)
        kept = whole * inv_rms * tl.load(weight_ptr + dims, mask=dims < head_size, other=0.0).to(tl.float32)
    else:
        kept = tl.load(src + dims, mask=rest)
    tl.store(dst + first, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(dst + second, (x2 * cos + x1 * sin).to(ty), mask=mask)
    tl.store(dst + dims, kept.to(ty), mask=rest)


@triton.jit
def _rotary_kernel(positions_ptr, q_ptr, k_ptr, cache_ptr, q_out_ptr, k_out_ptr, q_weight_ptr, k_weight_ptr, eps,
                   num_q_heads, num_k_heads, half, head_size, stride_cache,
                   stride_qt, stride_qh, stride_kt, stride_kh,
                   Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
                   HEAD_PAD: tl.constexpr, IS_NEOX: tl.constexpr, NORM: tl.constexpr, DEPENDENT: tl.constexpr):
    """One token. ``DEPENDENT``: launched as a programmatic dependent of the launch before
    (``dependent.py``); it waits before reading anything, even the positions (M-RoPE makes them
    just before)."""
    wait_for_the_launch_before(DEPENDENT)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token)
    pairs = tl.arange(0, HALF_PAD)[None, :]
    row = cache_ptr + position * stride_cache
    cos = tl.load(row + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    sin = tl.load(row + half + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, token, num_q_heads, stride_qt, stride_qh, cos, sin, half, head_size, q_weight_ptr,
                  eps, Q_HEADS_PAD, HALF_PAD, HEAD_PAD, IS_NEOX, NORM)
    _rotate_heads(k_ptr, k_out_ptr, token, num_k_heads, stride_kt, stride_kh, cos, sin, half, head_size, k_weight_ptr,
                  eps, K_HEADS_PAD, HALF_PAD, HEAD_PAD, IS_NEOX, NORM)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
                     is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """query [T, H, D], key [T, Hkv, D] (any token and head strides, e.g. views of a fused qkv)."""
    return _rotary(positions, query, key, cos_sin_cache, is_neox)


def qk_norm_rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, q_weight: torch.Tensor,
                             k_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor,
                             is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_embedding of every query and key head RMS-normed first, in the same one launch."""
    return _rotary(positions, query, key, cos_sin_cache, is_neox, (q_weight, k_weight, eps))


def _rotary_warps(head_elements: int) -> int:
    """4 warps for a token's query heads of up to 4096 features, then twice as many per doubling: on
    sm_90 the normed variant holds 32 heads of 128 in 224 registers at 4 warps; 64 heads spilled
    188 bytes at 4 warps, 4 at 8."""
    return min(16, max(4, head_elements // 1024))


def _rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
            is_neox: bool, norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, q_heads, head_size = query.shape
    k_heads = key.shape[1]
    half = cos_sin_cache.shape[-1] // 2
    query = query if query.stride(-1) == 1 else query.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    q_weight, k_weight, eps = norm if norm is not None else (query, key, 0.0)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if tokens:
        _rotary_kernel[(tokens,)](
            positions, query, key, cache, q_out, k_out, q_weight, k_weight, eps, q_heads, k_heads, half, head_size,
            cache.stride(0), query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            Q_HEADS_PAD=triton.next_power_of_2(q_heads), K_HEADS_PAD=triton.next_power_of_2(k_heads),
            HALF_PAD=triton.next_power_of_2(half), HEAD_PAD=triton.next_power_of_2(head_size), IS_NEOX=is_neox,
            NORM=norm is not None,
            num_warps=_rotary_warps(triton.next_power_of_2(q_heads) * triton.next_power_of_2(head_size)),
            **as_dependent(query.device))
    return q_out, k_out


@triton.jit
def _gated_activation_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o,
                             BLOCK: tl.constexpr, ACTIVATION: tl.constexpr, DEPENDENT: tl.constexpr):
    """out[:, j] = act(x[:, j]) * x[:, n_cols + j]; ACTIVATION is "silu", "gelu" or "gelu_tanh".
    ``DEPENDENT``: launched as a programmatic dependent of the launch before (``dependent.py``)."""
    wait_for_the_launch_before(DEPENDENT)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "silu":
        act = gate * tl.sigmoid(gate)
    elif ACTIVATION == "gelu":
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (1.0 + tanh(inner))
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _gated(x: torch.Tensor, activation: str) -> torch.Tensor:
    rows = _rows(x)
    n_cols = rows.shape[1] // 2
    out = torch.empty(rows.shape[0], n_cols, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = min(ACTIVATION_BLOCK, triton.next_power_of_2(n_cols))
        _gated_activation_kernel[(rows.shape[0], triton.cdiv(n_cols, block))](
            rows, out, n_cols, rows.stride(0), out.stride(0), BLOCK=block, ACTIVATION=activation,
            **as_dependent(x.device))
    return out.view(*x.shape[:-1], n_cols)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gated(x, "silu")


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_and_mul: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _gated(x, "gelu" if approximate == "none" else "gelu_tanh")

