"""Self-attention: projections, optional q/k norm, rotary, and the platform's paged attention."""

from __future__ import annotations

import torch
from torch import nn

from ...platform import AttentionBackend, KernelSet
from ..batch import ForwardBatch
from ..parallel import TensorParallel
from .linear import Linear
from .norm import RMSNorm
from .rotary import RotaryEmbedding


class SelfAttention(nn.Module):
    """Under tensor parallelism (``tp``) a rank computes its share of the query heads and the KV
    heads those read (see models/parallel.py); the output projection sums the shares.
    ``cache_index`` picks this layer's cache from ``batch.kv_caches`` (a pipeline stage caches
    only its own layers)."""

    def __init__(self, cache_index: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 backend: AttentionBackend, rotary: RotaryEmbedding, ops: KernelSet, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm_eps: float | None = None, tp: TensorParallel = TensorParallel()):
        super().__init__()
        q_first, q_end = tp.split(num_heads)
        kv_first, kv_end = tp.kv_heads(num_kv_heads)
        self.cache_index, self.head_dim = cache_index, head_dim
        self.num_heads, self.num_kv_heads = q_end - q_first, kv_end - kv_first
        q_rows, kv_rows = (q_first * head_dim, q_end * head_dim), (kv_first * head_dim, kv_end * head_dim)
        sharded = tp.size > 1
        self.qkv_proj = Linear(hidden_size, [self.num_heads * head_dim, self.num_kv_heads * head_dim,
                                             self.num_kv_heads * head_dim], ops, bias=qkv_bias,
                               rows=[q_rows, kv_rows, kv_rows] if sharded else None,
                               stored=[num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim])
        self.o_proj = Linear(self.num_heads * head_dim, hidden_size, ops, bias=o_bias,
                             columns=q_rows if sharded else None, reduce=tp)
        # Qwen3 normalises each head of q and k before rotary.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps, ops) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps, ops) if qk_norm_eps is not None else None
        self.rotary, self.backend = rotary, backend

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.partitions, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(batch.rotary_positions, q, k, self.q_norm, self.k_norm)
        out = self.backend.forward(q, k, v, batch.kv_caches[self.cache_index], batch.attn)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))
