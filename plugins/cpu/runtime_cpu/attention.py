"""Paged attention on the CPU: torch's scaled_dot_product_attention over K/V gathered by block.

All decode sequences (one new token) run as one padded batch. Sequences with several new tokens
(prefill, chunked prefill, speculative verification) run one call each: padding them to a common
query length would cost more than the loop, and their own matmuls dominate anyway.

Where the plugin's C kernels are built (native.py), float32 decode rows take attention_avx2.c
instead: each sequence's keys read where they lie in the cache, no gather, no padding, and in a
step of decode rows only the new K/V written by the same call. For one sequence of 200 tokens
(SmolLM2-135M's heads) the layer's attention went from about 92 to 37 us, most of which is now
the call's own overhead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from runtime.platform import AttentionBackend, AttentionMetadata
from runtime.platform.reference.attention import write_kv

from . import native
from .attention_rows import attend_rows, block_index, gather_blocks, plan_rows


class CpuAttentionBackend(AttentionBackend):
    """The CPU platform's attention: SDPA (flash kernel where torch has one), float32 math.

    Every dtype computes in float32 and casts back, so bf16/fp16 results differ from the
    reference only by the final rounding. Logits soft-capping cannot go through SDPA and takes
    a plain softmax path. Under ``--deterministic`` (``spec.deterministic``) every token takes the
    batch-invariant path of attention_rows.py instead.
    """

    name = "cpu_sdpa"
    platform = "cpu"
    priority = 10
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    supports_sliding_window = True
    supports_logits_soft_cap = True
    batch_invariant = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.spec.deterministic:
            write_kv(key, value, kv_cache, meta.slot_mapping)
            return self._forward_rows(query, kv_cache, meta)
        # Every layer of a step sees the same metadata: derive indices and masks once.
        plan_key = (self.name, kv_cache.shape[:3], self.spec.sliding_window, self.spec.logits_soft_cap)
        plan = meta.backend_cache.get(plan_key)
        if plan is None:
            plan = meta.backend_cache[plan_key] = _StepPlan(self, meta, kv_cache.shape[1], kv_cache.shape[2],
                                                            query.device)
        if plan.decode_only and self._runs_native(query, kv_cache, plan) and plan.every_slot_written \
                and key.dtype == value.dtype == torch.float32 and meta.slot_mapping.dtype == torch.int64 \
                and key.stride()[1:] == value.stride()[1:] == (key.shape[2], 1):
            # Writes the new K and V itself before attending: two torch ops fewer a layer.
            return self._decode_native(query, kv_cache, plan, (key, value, meta.slot_mapping))
        if plan.every_slot_written and key.dtype == kv_cache.dtype:
            # No padding token: both K and V in one index_copy_, without the reference's filtering.
            kv_cache.view(2, -1, *kv_cache.shape[3:]).index_copy_(1, meta.slot_mapping, torch.stack((key, value)))
        else:
            write_kv(key, value, kv_cache, meta.slot_mapping)
        if plan.decode_only:
            # Every row is a decode row, in order: no scatter into a fresh output. A decode step
            # runs thousands of small ops; each one saved is microseconds per layer.
            out = self._decode(query, kv_cache, plan)
            return out if out.dtype == query.dtype else out.to(query.dtype)
        out = torch.empty_like(query)
        if plan.decode_rows is not None:
            rows = plan.decode_rows
            out[rows] = self._decode(query[rows], kv_cache, plan).to(out.dtype)
        for start, end, seq_len, blocks, allowed in plan.prefills:
            k, v = gather_blocks(kv_cache, blocks, seq_len)
            out[start:end] = self._attend(query[start:end].unsqueeze(0), k, v, allowed, causal=allowed is None).squeeze(0).to(out.dtype)
        return out

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, plan: _StepPlan) -> torch.Tensor:
        """The decode rows' queries [N, H, D] -> [N, H, D] float32: on attention_avx2.c where it
        runs (float32 query and cache), else over one padded gather."""
        if self._runs_native(query, kv_cache, plan):
            return self._decode_native(query, kv_cache, plan)
        kv = gather_blocks(kv_cache, plan.decode_blocks, plan.decode_max_len, plan.decode_blocks_index)
        if plan.decode_padded:
            # Padding reads whatever the cache holds there (block 0, stale or never-written slots);
            # a NaN in it would survive the mask (0 * NaN), so clear it. The gather is a fresh copy.
            kv.masked_fill_(plan.decode_padding, 0)
        return self._attend(query.unsqueeze(1), kv[0], kv[1], plan.decode_allowed).squeeze(1)

    @staticmethod
    def _runs_native(query: torch.Tensor, kv_cache: torch.Tensor, plan: _StepPlan) -> bool:
        return (plan.decode_table is not None and query.dtype == kv_cache.dtype == torch.float32
                and query.stride(-1) == 1 and kv_cache.is_contiguous())

    def _decode_native(self, query: torch.Tensor, kv_cache: torch.Tensor, plan: _StepPlan,
                       new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``_decode`` on attention_avx2.c; ``new_kv`` (keys, values, slot mapping): written first."""
        seqs, heads, head_dim = query.shape
        out = torch.empty(seqs, heads, head_dim)
        key, value, slots = new_kv if new_kv is not None else (None, None, None)
        status = native.library().paged_decode_attention(
            query.data_ptr(), query.stride(0), query.stride(1), kv_cache.data_ptr(), plan.decode_table.data_ptr(),
            plan.decode_table.shape[1], plan.decode_lens.data_ptr(), out.data_ptr(), seqs, heads, kv_cache.shape[3],
            head_dim, kv_cache.shape[2], kv_cache.shape[1], self.spec.scale, self.spec.sliding_window or 0,
            self.spec.logits_soft_cap or 0.0, None if key is None else key.data_ptr(), 0 if key is None else key.stride(0),
            None if value is None else value.data_ptr(), 0 if value is None else value.stride(0),
            None if slots is None else slots.data_ptr())
        if status != 0:
            raise MemoryError(f"decode attention: no memory for the scores of {seqs} sequences")
        return out

    def _forward_rows(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        plan_key = (self.name, "rows", kv_cache.shape[2], self.spec.sliding_window)
        groups = meta.backend_cache.get(plan_key)
        if groups is None:
            groups = meta.backend_cache[plan_key] = plan_rows(
                meta.query_start_loc_cpu or meta.query_start_loc.tolist(), meta.seq_lens_cpu or meta.seq_lens.tolist(),
                meta.block_table, kv_cache.shape[2], self.spec.sliding_window)
        out = torch.empty_like(query)
        for group in groups:
            out[group.rows] = attend_rows(query, kv_cache, group, self.spec.scale,
                                          self.spec.logits_soft_cap).to(out.dtype)
        return out

    def _mask(self, q_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """[N, Lq] query positions, [Lk] key positions -> [N, Lq, Lk] True where the key is visible."""
        q_pos = q_pos.unsqueeze(-1)
        allowed = key_pos <= q_pos
        if self.spec.sliding_window is not None:
            allowed &= key_pos > q_pos - self.spec.sliding_window
        return allowed

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                causal: bool = False) -> torch.Tensor:
        """q [N, Lq, H, D], k/v [N, Lk, Hkv, D], allowed [N, Lq, Lk] (None: every key, or with
        ``causal`` plain top-left causality) -> [N, Lq, H, D] float32."""
        q, k, v = (t.transpose(1, 2) if t.dtype == torch.float32 else t.transpose(1, 2).float() for t in (q, k, v))
        cap = self.spec.logits_soft_cap
        if cap is None:
            mask = None if allowed is None else allowed.unsqueeze(1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
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


class _StepPlan:
    """Gather indices and masks for one step, shared by the layers that have the same window.

    Decode sequences (one new token) are batched over a padded context; each sequence with
    several new tokens gets its own entry. Top-left-aligned ``is_causal`` (mask None) equals our
    bottom-right causality only when all keys are new, and lets SDPA skip the masked half.
    """

    def __init__(self, backend: CpuAttentionBackend, meta: AttentionMetadata, cache_blocks: int, block_size: int,
                 device: torch.device):
        starts = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        num_seqs = len(seq_lens)
        decode = [i for i in range(num_seqs) if starts[i + 1] - starts[i] == 1]
        self.every_slot_written = bool((meta.slot_mapping >= 0).all())
        self.decode_rows = None
        self.decode_only = len(decode) == num_seqs == starts[-1] == meta.slot_mapping.shape[0]
        if decode:
            index = torch.tensor(decode, device=device)
            self.decode_rows = torch.tensor([starts[i] for i in decode], device=device)
            decode_lens = [seq_lens[i] for i in decode]
            lens = torch.tensor(decode_lens, device=device)
            self.decode_max_len = max(decode_lens)
            self.decode_blocks = meta.block_table[index]
            self.decode_blocks_index = block_index(self.decode_blocks, self.decode_max_len, block_size, cache_blocks)
            self.decode_lens = lens
            # attention_avx2.c reads int64 block ids in place (head sizes it vectorizes: multiples of 8).
            self.decode_table = None
            if native.library() is not None and device.type == "cpu" and backend.spec.head_size % 8 == 0:
                self.decode_table = self.decode_blocks.to(torch.int64).contiguous()
            key_pos = torch.arange(self.decode_max_len, device=device)
            # One length (always so for one sequence): nothing to pad, and no mask where no window cuts the keys.
            self.decode_padded = min(decode_lens) != self.decode_max_len
            self.decode_padding = (key_pos.unsqueeze(0) >= lens.unsqueeze(1))[:, :, None, None]
            self.decode_allowed = backend._mask((lens - 1).unsqueeze(1), key_pos)
            if not self.decode_padded and backend.spec.sliding_window is None and backend.spec.logits_soft_cap is None:
                self.decode_allowed = None
        self.prefills = []
        for i in range(num_seqs):
            q_len = starts[i + 1] - starts[i]
            if q_len == 1:
                continue
            seq_len = seq_lens[i]
            allowed = None
            if q_len != seq_len or backend.spec.sliding_window is not None or backend.spec.logits_soft_cap is not None:
                q_pos = torch.arange(seq_len - q_len, seq_len, device=device).unsqueeze(0)
                allowed = backend._mask(q_pos, torch.arange(seq_len, device=device))
            self.prefills.append((starts[i], starts[i + 1], seq_len, meta.block_table[i].unsqueeze(0), allowed))

