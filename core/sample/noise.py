"""Random draws for sampling, row by row: a seeded request's rows from its own generator (so it
samples the same tokens whatever else shares the batch), the other rows from one shared draw."""

from __future__ import annotations

from typing import Optional

import torch


def exponential_noise(probs: torch.Tensor, generators: list[Optional[torch.Generator]]) -> torch.Tensor:
    """Exp(1) noise shaped like ``probs`` [B, V]."""
    noise = torch.empty_like(probs)
    if any(g is None for g in generators):
        noise.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    # A draw of exactly 0 would turn p / E into inf, or NaN for a masked token, and win the argmax.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def uniform_noise(num_rows: int, generators: list[Optional[torch.Generator]], device: torch.device) -> torch.Tensor:
    """[B] float32 draws from U[0, 1)."""
    noise = torch.empty(num_rows, dtype=torch.float32, device=device)
    if any(g is None for g in generators):
        noise.uniform_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row:row + 1].uniform_(generator=generator)
    return noise
