"""Paged attention on the CPU: torch's scaled_dot_product_attention over K/V gathered by block.

All decode sequences (one new token) run as one padded batch. Sequences with several new tokens
(prefill, chunked prefill, speculative verification) run one call each: padding them to a common
query length would cost more than the loop, and their own matmuls dominate anyway.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from runtime.platform import AttentionBackend, AttentionMetadata
from runtime.platform.reference.attention import write_kv


class CpuAttentionBackend(AttentionBackend):
    """The CPU platform's attention: SDPA (flash kernel where torch has one), float32 math.

    Every dtype computes in float32 and casts back, so bf16/fp16 results differ from the
    reference only by the final rounding. Logits soft-capping cannot go through SDPA and takes
    a plain softmax path.
    """

    name = "cpu_sdpa"
    platform = "cpu"
    priority = 10
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    supports_sliding_window = True
    supports_logits_soft_cap = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        write_kv(key, value, kv_cache, meta.slot_mapping)
        # Host copies plan the launch; the device tensors are read only by indexing ops.
        starts = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        out = torch.empty_like(query)
        decode = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
        if decode:
            self._decode(query, kv_cache, meta.block_table, starts, seq_lens, decode, out)
        for i, seq_len in enumerate(seq_lens):
            if starts[i + 1] - starts[i] > 1:
                self._prefill(query, kv_cache, meta.block_table[i], starts[i], starts[i + 1], seq_len, out)
        return out

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, starts: list[int],
                seq_lens: list[int], seqs: list[int], out: torch.Tensor) -> None:
        """One query token for each sequence in ``seqs``, batched over a padded context."""
        device = query.device
        rows = torch.tensor([starts[i] for i in seqs], device=device)
        lens = torch.tensor([seq_lens[i] for i in seqs], device=device)
        max_len = max(seq_lens[i] for i in seqs)
        kv = _gather(kv_cache, block_table[torch.tensor(seqs, device=device)], max_len)
        key_pos = torch.arange(max_len, device=device)
        # Padding reads whatever the cache holds there (block 0, stale or never-written slots);
        # a NaN in it would survive the mask (0 * NaN), so clear it. kv is a fresh copy.
        padding = key_pos.unsqueeze(0) >= lens.unsqueeze(1)
        kv.masked_fill_(padding[None, :, :, None, None], 0)
        allowed = self._mask((lens - 1).unsqueeze(1), key_pos)
        out[rows] = self._attend(query[rows].unsqueeze(1), kv[0], kv[1], allowed).squeeze(1).to(out.dtype)

    def _prefill(self, query: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, start: int, end: int,
                 seq_len: int, out: torch.Tensor) -> None:
        """Rows ``start:end`` of ``query``: the last ``end - start`` tokens of one sequence."""
        device = query.device
        q_len = end - start
        k, v = _gather(kv_cache, block_ids.unsqueeze(0), seq_len)
        allowed = None
        # Top-left-aligned is_causal equals our bottom-right causality only when all keys are new;
        # it lets SDPA skip the masked half instead of reading a mask.
        if q_len != seq_len or self.spec.sliding_window is not None or self.spec.logits_soft_cap is not None:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=device).unsqueeze(0)
            allowed = self._mask(q_pos, torch.arange(seq_len, device=device))
        out[start:end] = self._attend(query[start:end].unsqueeze(0), k, v, allowed).squeeze(0).to(out.dtype)

    def _mask(self, q_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """[N, Lq] query positions, [Lk] key positions -> [N, Lq, Lk] True where the key is visible."""
        q_pos = q_pos.unsqueeze(-1)
        allowed = key_pos <= q_pos
        if self.spec.sliding_window is not None:
            allowed &= key_pos > q_pos - self.spec.sliding_window
        return allowed

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """q [N, Lq, H, D], k/v [N, Lk, Hkv, D], allowed [N, Lq, Lk] (None: plain causal) -> [N, Lq, H, D] float32."""
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
        cap = self.spec.logits_soft_cap
        if cap is None:
            mask = None if allowed is None else allowed.unsqueeze(1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=allowed is None,
                                               scale=self.spec.scale, enable_gqa=True)
            return o.transpose(1, 2)
        # Group query heads under their KV head (head h reads KV head h // group) instead of
        # repeating K/V group times.
        n, heads, q_len, d = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        grouped = q.reshape(n, kv_heads, group * q_len, d)
        scores = (grouped @ k.transpose(-1, -2) * self.spec.scale).view(n, kv_heads, group, q_len, -1)
        scores = cap * torch.tanh(scores / cap)
        scores = scores.masked_fill(~allowed[:, None, None], -math.inf)
        probs = scores.softmax(-1).view(n, kv_heads, group * q_len, -1)
        return (probs @ v).view(n, heads, q_len, d).transpose(1, 2)


def _gather(kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """block_ids [N, max_blocks] -> [2, N, length, Hkv, D]: the first ``length`` K/V of each row's blocks."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-length // block_size)
    # Whole-block indexing copies contiguous runs instead of one slot at a time.
    kv = kv_cache[:, block_ids[:, :num_blocks].long()]
    return kv.flatten(2, 3)[:, :, :length]
