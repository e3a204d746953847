"""LoRA adapters: PEFT directories loaded on the host, served from device slots, many per batch."""

from .request import LoRARequest

__all__ = ["LoRARequest"]
