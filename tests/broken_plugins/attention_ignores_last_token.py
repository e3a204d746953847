"""Fault: decode attention never reads the newest token's K/V (its context length is one short)."""

import dataclasses

from runtime_cpu.attention import CpuAttentionBackend

from ._cpu import cpu_plugin

PLATFORM = "broken-attention-last-token"


class IgnoresLastToken(CpuAttentionBackend):
    def forward(self, query, key, value, kv_cache, meta):
        # Sequences decoding one token (after the first) attend to one token fewer than they hold.
        decode = (meta.query_start_loc[1:] - meta.query_start_loc[:-1] == 1) & (meta.seq_lens > 1)
        seq_lens = meta.seq_lens - decode.int()
        short = dataclasses.replace(meta, seq_lens=seq_lens, seq_lens_cpu=seq_lens.tolist())
        return super().forward(query, key, value, kv_cache, short)


plugin = cpu_plugin(PLATFORM, attention=IgnoresLastToken)
