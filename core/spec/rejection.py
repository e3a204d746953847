"""Verification of proposed tokens: greedy matching, and rejection sampling that leaves the
target's output distribution exactly what it is without proposals.

A request with proposals d_1..d_m is verified on m + 1 rows: row j holds the target's
distribution p_j of the token after d_1..d_j (penalties and min_tokens see d_1..d_j as output).
The proposers here are deterministic (a proposal is one token, not a distribution q), so
Leviathan et al.'s rule with q = one-hot(d) reads: accept d_{j+1} with probability p_j(d_{j+1});
at the first rejection sample from p_j with d_{j+1} removed and renormalised (max(0, p - q),
normalised); when all m are accepted, sample the token after them from p_m. Each emitted token is
then distributed as p_j exactly (P(x) = p(d) [x = d] + (1 - p(d)) p(x) / (1 - p(d)) [x != d]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..sample.noise import exponential_noise, uniform_noise
from ..sample.params import SamplingParams


@dataclass
class RowView:
    """One verified position, as the sampler sees a request: its output so far includes the
    proposals before this position."""

    request_id: str
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]


class DraftLayout:
    """Where each request's verified rows are: request b has ``num_drafts[b]`` proposals and
    rows ``row_start[b] .. row_start[b] + num_drafts[b]`` (R rows in all)."""

    def __init__(self, requests: list, drafts: list[list[int]], device: torch.device):
        self.num_drafts = np.array([len(d) for d in drafts], dtype=np.int64)
        counts = self.num_drafts + 1
        self.row_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.num_rows = int(counts.sum())
        width = int(counts.max())
        following = np.full(self.num_rows, -1, dtype=np.int64)
        index = np.full((len(drafts), width), self.num_rows, dtype=np.int64)  # past the end: a padding row
        for b, d in enumerate(drafts):
            start = self.row_start[b]
            following[start:start + len(d)] = d
            index[b, :len(d) + 1] = np.arange(start, start + len(d) + 1)
        self.following = torch.from_numpy(following).to(device)
        """[R] the proposal each row verifies (-1 on a request's last row)."""
        self.index = torch.from_numpy(index).to(device)
        """[B, K+1] row of each request's position j (R: none)."""
        self.row_position = torch.from_numpy(np.concatenate([np.arange(n) for n in counts])).to(device)
        """[R] each row's position j among its request's rows."""
        self.row_request = torch.from_numpy(np.repeat(np.arange(len(drafts)), counts)).to(device)
        """[R] each row's request b."""
        self.row_views = [RowView(r.request_id, r.sampling_params, r.prompt_token_ids, r.output_token_ids + d[:j],
                                  r.eos_token_ids)
                          for r, d in zip(requests, drafts) for j in range(len(d) + 1)]


def rejection_sample(probs: Optional[torch.Tensor], greedy_ids: Optional[torch.Tensor], greedy: torch.Tensor,
                     generators: list[Optional[torch.Generator]], layout: DraftLayout
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, K+1] with -1 past each request's count, counts [B], each row's emitted token [R]).

    ``probs`` [R, V]: each row's sampling distribution (None when every row is greedy);
    ``greedy_ids`` [R]: each row's argmax (None when no row is greedy); ``greedy`` [R] bool;
    ``generators``: per row, its request's generator or None. Seeded requests draw from their
    own generators, row after row, so they stay reproducible whatever shares the batch.
    """
    following = layout.following
    has_proposal = following >= 0
    safe = following.clamp(min=0)
    if probs is None:
        accepted = has_proposal & (greedy_ids == following)
        recovered = greedy_ids
    else:
        draws = uniform_noise(layout.num_rows, generators, probs.device)
        accepted = has_proposal & (draws < probs.gather(1, safe.unsqueeze(1)).squeeze(1))
        # The residual: the proposal taken out (a request's last row, with none, keeps p whole).
        at_proposal = probs.gather(1, safe.unsqueeze(1))
        residual = probs.scatter(1, safe.unsqueeze(1), torch.where(has_proposal.unsqueeze(1), 0.0, at_proposal))
        recovered = residual.div_(exponential_noise(residual, generators)).argmax(-1)
        if greedy_ids is not None:
            accepted = torch.where(greedy, has_proposal & (greedy_ids == following), accepted)
            recovered = torch.where(greedy, greedy_ids, recovered)
    pad = torch.zeros(1, dtype=torch.bool, device=following.device)
    accepted_at = torch.cat([accepted, pad])[layout.index]  # [B, K+1]
    num_accepted = accepted_at.long().cumprod(1).sum(1)
    position = torch.arange(layout.index.shape[1], device=following.device).unsqueeze(0)
    pad_token = torch.full((1,), -1, dtype=torch.long, device=following.device)
    proposed = torch.cat([following, pad_token])[layout.index]
    emitted = torch.cat([recovered, pad_token])[layout.index]
    tokens = torch.where(position < num_accepted.unsqueeze(1), proposed,
                         torch.where(position == num_accepted.unsqueeze(1), emitted, -1))
    # Per row, the token emitted at its position (rows past a rejection: unused).
    row_tokens = torch.where(layout.row_position < num_accepted[layout.row_request], safe, recovered)
    return tokens, num_accepted + 1, row_tokens
