"""Fault: new K/V are written one slot after ``slot_mapping``."""

import dataclasses

from runtime_cpu.attention import CpuAttentionBackend

from ._cpu import cpu_plugin

PLATFORM = "broken-attention-kv-slot"


class WritesNextSlot(CpuAttentionBackend):
    def forward(self, query, key, value, kv_cache, meta):
        shifted = dataclasses.replace(meta, slot_mapping=meta.slot_mapping + 1)
        return super().forward(query, key, value, kv_cache, shifted)


plugin = cpu_plugin(PLATFORM, attention=WritesNextSlot)
