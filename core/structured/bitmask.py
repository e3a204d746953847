"""What a step's structured output hands the runner: which logit rows to mask, and how."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GrammarBitmask:
    """The allowed tokens of a step's constrained logit rows: bit ``v % 32`` of word ``v // 32``
    of ``bitmask[i]`` is set when token v may follow at logits row ``rows[i]`` (the rows of the
    step's sampled positions, in the runner's order)."""

    rows: list[int]
    bitmask: torch.Tensor
    """[len(rows), ceil(V / 32)] int32, on the host."""

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(bitmask, rows) on ``device``, copied without a host-device sync."""
        rows = torch.tensor(self.rows, dtype=torch.int64)
        if device.type == "cpu":
            return self.bitmask, rows
        return (self.bitmask.pin_memory().to(device, non_blocking=True),
                rows.pin_memory().to(device, non_blocking=True))
