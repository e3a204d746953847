"""The n-gram proposer on the device (contract 1.15): the proposals of prompt lookup for every
request of a step at once, from token histories the host has not read back yet (speculative
decoding's chained verifications, ``runtime/worker/verify_chain.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def propose_ngram_batched(history: torch.Tensor, lengths: torch.Tensor, num_tokens: int, min_n: int, max_n: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``runtime.spec.ngram.propose_ngram`` for every row of ``history`` [B, C] (int64 token ids
    >= 0; row b holds ``lengths[b]`` >= 1 tokens, what lies past them is never read; 1 <= min_n <=
    max_n): (proposals [B, num_tokens], their counts [B]), int64; a row's proposals past its count
    are 0. Rows are independent of one another.

    Each position e of a row is an occurrence's possible end: the length of the run of tokens
    ending at e that equals the run ending at the row's last token (up to ``max_n``, counted
    backwards). The largest run length among the ends before the last token, if at least
    ``min_n``, is the n that propose_ngram takes, and the latest end with a run that long the
    occurrence whose next tokens it proposes.
    """
    batch, capacity = history.shape
    device = history.device
    back = torch.arange(max_n, device=device)
    # last[b, t]: the token t places before the row's last (-1 where the row is shorter).
    last_index = lengths.unsqueeze(1) - 1 - back
    last = torch.where(last_index >= 0, history.gather(1, last_index.clamp(min=0)), -1)
    # ending[b, e, t] = history[b, e - t], -2 before the row's start: never equal to a token or to -1.
    ending = F.pad(history, (max_n - 1, 0), value=-2).unfold(1, max_n, 1).flip(2)
    run = (ending == last.unsqueeze(1)).cumprod(2, dtype=torch.int32).sum(2)
    positions = torch.arange(capacity, device=device)
    # An occurrence ends before the last token, so that at least one token follows it.
    run = torch.where(positions < (lengths - 1).unsqueeze(1), run, 0)
    n = run.amax(1)
    found = n >= min_n
    end = torch.where(run >= n.unsqueeze(1), positions, -1).amax(1)
    start = end + 1
    counts = torch.where(found, (lengths - start).clamp(max=num_tokens), 0)
    offsets = torch.arange(num_tokens, device=device)
    proposals = history.gather(1, (start.unsqueeze(1) + offsets).clamp(max=capacity - 1))
    return torch.where(offsets < counts.unsqueeze(1), proposals, 0), counts
