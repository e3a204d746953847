"""Self-attention: projections, optional q/k norm, rotary, and the platform's paged attention."""

from __future__ import annotations

import torch
from torch import nn

from ...platform import AttentionBackend, KernelSet
from ..batch import ForwardBatch
from .linear import Linear
from .norm import RMSNorm
from .rotary import RotaryEmbedding


class SelfAttention(nn.Module):
    def __init__(self, layer_index: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 backend: AttentionBackend, rotary: RotaryEmbedding, ops: KernelSet, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm_eps: float | None = None):
        super().__init__()
        self.layer_index, self.num_heads, self.num_kv_heads, self.head_dim = layer_index, num_heads, num_kv_heads, head_dim
        self.qkv_proj = Linear(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], ops,
                              bias=qkv_bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, ops, bias=o_bias)
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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(batch.positions, q, k)
        out = self.backend.forward(q, k, v, batch.kv_caches[self.layer_index], batch.attn)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))
