"""Fault: decode attention never reads the newest token's K/V (its context length is one short)."""

from runtime_cpu.attention import CpuAttentionBackend

from ._cpu import cpu_plugin

PLATFORM = "broken-attention-last-token"


class IgnoresLastToken(CpuAttentionBackend):
    def _decode(self, query, kv_cache, block_table, starts, seq_lens, seqs, out):
        super()._decode(query, kv_cache, block_table, starts, [n - 1 for n in seq_lens], seqs, out)


plugin = cpu_plugin(PLATFORM, attention=IgnoresLastToken)
