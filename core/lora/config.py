"""LoRA settings, resolved once by the engine and given to the runner."""

from __future__ import annotations

from dataclasses import dataclass

RANKS = (8, 16, 32, 64, 128, 256)
"""Values --max-lora-rank takes (vLLM's)."""


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 1
    """Distinct adapters in one step (device slots)."""
    max_lora_rank: int = 16
    max_cpu_loras: int = 1
    """Adapters kept loaded on the host (at least ``max_loras``)."""

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"--max-loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank not in RANKS:
            raise ValueError(f"--max-lora-rank must be one of {', '.join(map(str, RANKS))}, got {self.max_lora_rank}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"--max-cpu-loras ({self.max_cpu_loras}) must be at least --max-loras ({self.max_loras})")
