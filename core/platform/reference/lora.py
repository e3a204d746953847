"""LoRA shrink/expand with one adapter slot per token (slot -1: no adapter)."""

import torch


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
    """x [T, in], lora_a [S, r, in], slots [T] -> [T, r] = scale * x @ lora_a[slot].T (0 where slot < 0)."""
    valid = slots >= 0
    a = lora_a[slots.clamp(min=0)]
    out = torch.einsum("ti,tri->tr", x.float(), a.float()) * scale
    return (out * valid.unsqueeze(-1)).to(x.dtype)


def lora_expand(shrunk: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """shrunk [T, r], lora_b [S, out, r], base [T, out] -> base + shrunk @ lora_b[slot].T (base where slot < 0)."""
    valid = slots >= 0
    b = lora_b[slots.clamp(min=0)]
    delta = torch.einsum("tr,tor->to", shrunk.float(), b.float()) * valid.unsqueeze(-1)
    return (base.float() + delta).to(base.dtype)
