"""Structured output's mask (contract 1.7): the tokens a grammar rules out get -inf."""

import torch


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """In place, for each i: ``logits[rows[i], v] = -inf`` where bit ``v % 32`` of
    ``bitmask[i, v // 32]`` is 0 (the token is not allowed). Returns ``logits``.

    logits [B, V] float; bitmask [N, ceil(V / 32)] int32 (xgrammar's layout: bit j of word w is
    token 32 w + j, the sign bit included); rows [N] int64, distinct. Rows not named are unchanged.
    """
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    masked = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy_(0, rows, masked)
