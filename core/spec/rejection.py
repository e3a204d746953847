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

import functools
import itertools
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..sample.noise import exponential_noise, uniform_noise
from ..sample.params import SamplingParams
from ..worker.input_buffers import host_to_device


class RowView:
    """One verified position, as the sampler sees a request: its output so far includes the
    proposals before this position (a list made only when the sampler reads it: penalties)."""

    def __init__(self, request, drafts: list[int], position: int):
        self.request_id: str = request.request_id
        self.sampling_params: SamplingParams = request.sampling_params
        self.prompt_token_ids: list[int] = request.prompt_token_ids
        self.eos_token_ids: frozenset[int] = request.eos_token_ids
        self._request, self._drafts, self._position = request, drafts, position

    @functools.cached_property
    def output_token_ids(self) -> list[int]:
        return self._request.output_token_ids + self._drafts[:self._position]


class LayoutTensors(NamedTuple):
    """A :class:`DraftLayout`'s index tensors on the device."""

    following: torch.Tensor
    """[R] the proposal each row verifies (-1 on a request's last row)."""
    row_position: torch.Tensor
    """[R] each row's position j among its request's rows."""
    row_request: torch.Tensor
    """[R] each row's request b."""
    position: torch.Tensor
    """[K+1] 0 .. K."""
    index: torch.Tensor
    """[B, K+1] row of each request's position j (past its rows: its last row)."""
    proposed: torch.Tensor
    """[B, K+1] the proposal at position j (-1 past a request's proposals)."""


class DraftLayout:
    """Where each request's verified rows are: request b has ``num_drafts[b]`` proposals and
    rows ``row_start[b] .. row_start[b] + num_drafts[b]`` (R rows in all).

    Its index tensors reach the device in one copy from pinned memory that does not wait for the
    device, made the first time one is read: a verification whose rows are all greedy, without
    logprobs, is matched on the host (:meth:`emitted`) and needs none of them."""

    def __init__(self, requests: list, drafts: list[list[int]], device: torch.device):
        batch = len(drafts)
        self.num_drafts = np.fromiter(map(len, drafts), dtype=np.int64, count=batch)
        counts = self.num_drafts + 1
        self.row_start = np.zeros(batch, dtype=np.int64)
        np.cumsum(counts[:-1], out=self.row_start[1:])
        self.num_rows = rows = int(counts.sum())
        self._width = width = int(counts.max())
        self._row_request = np.repeat(np.arange(batch), counts)
        self._row_position = np.arange(rows) - self.row_start[self._row_request]
        self._following = np.full(rows, -1, dtype=np.int64)
        has_proposal = self._row_position < self.num_drafts[self._row_request]
        self._following[has_proposal] = np.fromiter(itertools.chain.from_iterable(drafts), dtype=np.int64,
                                                    count=rows - batch)
        # Positions past a request's own rows read its last row, whose proposal is none (-1).
        self._index = self.row_start[:, None] + np.minimum(np.arange(width)[None, :], self.num_drafts[:, None])
        self._device = device
        self._requests, self._drafts = requests, drafts

    @functools.cached_property
    def row_views(self) -> list[RowView]:
        """Each verified row as the sampler sees a request (made when sampling settings are built:
        a verification of argmax rows needs none)."""
        return [RowView(r, d, j) for r, d in zip(self._requests, self._drafts) for j in range(len(d) + 1)]

    @functools.cached_property
    def tensors(self) -> LayoutTensors:
        """The index tensors on the device (copied at the first read)."""
        batch, rows, width = len(self.row_start), self.num_rows, self._width
        position = np.arange(width)
        proposed = np.where(position[None, :] < self.num_drafts[:, None], self._following[self._index], -1)
        packed = host_to_device(np.concatenate([self._following, self._row_position, self._row_request, position,
                                                self._index.ravel(), proposed.ravel()]), torch.int64, self._device)
        following, row_position, row_request, position, index, proposed = \
            packed.split([rows, rows, rows, width, batch * width, batch * width])
        return LayoutTensors(following, row_position, row_request, position, index.view(batch, width),
                             proposed.view(batch, width))

    def emitted(self, sampled) -> list[list[int]]:
        """Each request's tokens from ``Sampler.verify``'s output read back to the host: its
        accepted proposals and the token after them. Where every row was greedy (no
        ``num_tokens``), a request accepts the proposals its rows' argmax repeats, so its tokens
        are the argmax of its first accepted + 1 rows."""
        if sampled.num_tokens is not None:
            return [row[:n] for row, n in zip(sampled.token_ids.tolist(), sampled.num_tokens.tolist())]
        argmax = sampled.token_ids.numpy()
        # A request's last row proposes -1, which no argmax equals: each run of matches ends there.
        counts = (argmax == self._following)[self._index].cumprod(1).sum(1) + 1
        return [argmax[start:start + n].tolist() for start, n in zip(self.row_start.tolist(), counts.tolist())]


def rejection_sample(probs: Optional[torch.Tensor], greedy_ids: Optional[torch.Tensor], greedy: torch.Tensor,
                     generators: list[Optional[torch.Generator]], layout: DraftLayout, row_tokens: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(tokens [B, K+1] with -1 past each request's count, counts [B], each row's emitted token
    [R] when ``row_tokens`` else None).

    ``probs`` [R, V]: each row's sampling distribution (None when every row is greedy);
    ``greedy_ids`` [R]: each row's argmax (None when no row is greedy); ``greedy`` [R] bool;
    ``generators``: per row, its request's generator or None. Seeded requests draw from their
    own generators, row after row, so they stay reproducible whatever shares the batch.
    """
    tensors = layout.tensors
    following = tensors.following
    if probs is None:
        # A request's last row proposes -1, which no argmax equals.
        accepted = greedy_ids == following
        recovered = greedy_ids
    else:
        has_proposal = following >= 0
        safe = following.clamp(min=0).unsqueeze(1)
        at_proposal = probs.gather(1, safe)
        draws = uniform_noise(layout.num_rows, generators, probs.device)
        accepted = has_proposal & (draws < at_proposal.squeeze(1))
        # The residual: the proposal taken out (a request's last row, with none, keeps p whole).
        residual = probs.scatter(1, safe, torch.where(has_proposal.unsqueeze(1), 0.0, at_proposal))
        recovered = residual.div_(exponential_noise(residual, generators)).argmax(-1)
        if greedy_ids is not None:
            accepted = torch.where(greedy, greedy_ids == following, accepted)
            recovered = torch.where(greedy, greedy_ids, recovered)
    # Every request's last row accepts nothing, so the run of accepted positions ends there at the latest.
    num_accepted = accepted[tensors.index].long().cumprod(1).sum(1)
    count = num_accepted.unsqueeze(1)
    tokens = torch.where(tensors.position < count, tensors.proposed,
                         torch.where(tensors.position == count, recovered[tensors.index], -1))
    emitted = None
    if row_tokens:
        # Per row, the token emitted at its position (rows past a rejection: unused).
        emitted = torch.where(tensors.row_position < num_accepted[tensors.row_request], following.clamp(min=0),
                              recovered)
    return tokens, num_accepted + 1, emitted
