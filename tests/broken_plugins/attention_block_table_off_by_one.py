"""Fault: attention reads each sequence's blocks one entry late in its block table."""

import dataclasses

from runtime_cpu.attention import CpuAttentionBackend

from ._cpu import cpu_plugin

PLATFORM = "broken-attention-block-table"


class ReadsNextBlock(CpuAttentionBackend):
    def forward(self, query, key, value, kv_cache, meta):
        shifted = dataclasses.replace(meta, block_table=meta.block_table.roll(-1, dims=1))
        return super().forward(query, key, value, kv_cache, shifted)


plugin = cpu_plugin(PLATFORM, attention=ReadsNextBlock)
