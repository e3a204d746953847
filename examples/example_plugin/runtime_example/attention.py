"""Paged attention, one sequence at a time: gather the sequence's K/V through its block table,
then a masked softmax in float32. Simple rather than fast; the contract's semantics, nothing more."""

from __future__ import annotations

import torch

from runtime.platform import AttentionBackend, AttentionMetadata


class ExampleAttentionBackend(AttentionBackend):
    name = "example_attention"
    platform = "example"
    priority = 10
    supported_dtypes = (torch.float32, torch.bfloat16)
    supports_sliding_window = True
    # No logits soft-capping: models that need it (Gemma 2) are refused with a clear reason,
    # and runtime-conformance reports it as unsupported.

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # Default layout [2, blocks, block_size, Hkv, D]: flat slot s is row s of view(2, -1, Hkv, D).
        flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
        flat[0, meta.slot_mapping] = key.to(kv_cache.dtype)
        flat[1, meta.slot_mapping] = value.to(kv_cache.dtype)
        block_size = kv_cache.shape[2]
        out = torch.empty_like(query)
        starts = meta.query_start_loc_cpu
        for i, seq_len in enumerate(meta.seq_lens_cpu):
            q = query[starts[i]:starts[i + 1]].float()
            positions = torch.arange(seq_len, device=query.device)
            slots = meta.block_table[i, positions // block_size].long() * block_size + positions % block_size
            k, v = flat[0, slots].float(), flat[1, slots].float()
            group = q.shape[1] // k.shape[1]  # GQA: query head h reads KV head h // group
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * self.spec.scale
            q_pos = positions[seq_len - q.shape[0]:].unsqueeze(1)
            visible = positions.unsqueeze(0) <= q_pos
            if self.spec.sliding_window is not None:
                visible &= positions.unsqueeze(0) > q_pos - self.spec.sliding_window
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out[starts[i]:starts[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
        return out
