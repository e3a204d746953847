"""Sampling metadata padded to a static-shape bucket (platforms with ``static_shape_buckets``).

A graph compiler (XLA, HPU graphs) compiles the step once per distinct set of shapes *and* per
distinct graph structure. The plain :class:`~runtime.sample.sampler.SamplingMetadata` has both
vary with the batch: one row per sampling request, optional groups present or not, a logprobs
width and token-count widths taken from the requests. Here every size is padded so the
sampling part of a step depends only on its sequence bucket and on which feature groups are in
use:

- rows: padded to the bucket with neutral rows (greedy, no truncation, no seed), whose tokens
  the runner never reads;
- greedy and random rows: both paths always computed (``all_greedy``/``all_random`` False) and
  top-k/top-p/min-p always applied (neutral values keep everything): a batch's mix of settings
  does not change the graph;
- logit bias and the min_tokens mask: one (rows, ids, values) list added with ``accumulate``
  (``-inf`` for a blocked stop token, which equals setting it), padded to a power of two with
  zeros added to row 0's token 0;
- penalties' token counts: the token lists padded to a power-of-two width;
- seeded rows: their Exp(1) noise drawn on the host from generators kept on the host (torch-xla
  has no device generators) and uploaded as one [rows, V] tensor beside the device's own draw
  for the other rows: a seeded request samples what it samples on the CPU platform;
- logprobs: the top-k width padded to a power of two (the runner keeps each request's own k);
- a grammar's bitmask: every row, all bits set on rows it does not constrain.

A feature group (seeds, logprobs, penalties, bias/min_tokens, grammar) is one more program per bucket
the first time a step uses it; the padded widths add at most one per power of two reached.
"""

from __future__ import annotations

import torch

from ..sched.request import Request
from ..worker.input_buffers import host_to_device
from .params import SamplingParams
from .sampler import SamplingMetadata, add_penalties, request_generator, row_columns, stop_tokens_blocked

NEUTRAL = SamplingParams(temperature=0.0)
"""A padding row's settings: greedy, nothing to truncate, no penalty, bias or logprobs."""


def power_of_two_at_least(size: int) -> int:
    """The smallest power of two >= ``size`` (1 for 0)."""
    return 1 << max(size - 1, 0).bit_length()


def static_sampling_metadata(requests: list[Request], rows: int, vocab_size: int, device: torch.device | str,
                             generators: dict[str, torch.Generator]) -> SamplingMetadata:
    """:meth:`SamplingMetadata.from_requests` for ``requests`` padded to ``rows`` rows (the step's
    sequence bucket), with the shapes and structure described in the module docstring."""
    if rows < len(requests):
        raise ValueError(f"{len(requests)} sampling rows do not fit the sequence bucket {rows}")
    device = torch.device(device)
    params = [r.sampling_params for r in requests] + [NEUTRAL] * (rows - len(requests))
    asked = [p.logprobs for p in params if p.logprobs is not None]
    meta = SamplingMetadata(
        **row_columns(params, device),
        all_greedy=False,
        all_random=False,
        needs_top_k_top_p_min_p=True,
        generators=[None] * rows,
        max_num_logprobs=min(power_of_two_at_least(max(asked)), vocab_size) if asked else None,
    )
    _seeded_noise(meta, requests, rows, vocab_size, device, generators)
    padding = [[]] * (rows - len(requests))
    add_penalties(meta, params, lambda: [list(r.output_token_ids) for r in requests] + padding,
                  lambda: [list(r.prompt_token_ids) for r in requests] + padding, vocab_size, device,
                  width=lambda token_lists: power_of_two_at_least(max(len(t) for t in token_lists)))
    _bias_and_blocked(meta, requests, params, vocab_size, device)
    return meta


def _seeded_noise(meta: SamplingMetadata, requests: list[Request], rows: int, vocab_size: int,
                  device: torch.device, generators: dict[str, torch.Generator]) -> None:
    """Seeded random rows draw their noise on the host, from generators kept on the host, as
    ``exponential_noise`` would draw each row: the same tokens as the plain sampler on the CPU."""
    seeded = [i for i, r in enumerate(requests) if r.sampling_params.seed is not None and not r.sampling_params.greedy]
    if not seeded:
        return
    drawn = torch.ones(rows, vocab_size, dtype=torch.float32)
    for i in seeded:
        drawn[i].exponential_(generator=request_generator(requests[i], torch.device("cpu"), generators))
    drawn.clamp_(min=torch.finfo(drawn.dtype).tiny)
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[seeded] = True
    meta.seeded_noise = (mask.to(device), drawn.to(device))


def _bias_and_blocked(meta: SamplingMetadata, requests: list[Request], params: list[SamplingParams],
                      vocab_size: int, device: torch.device) -> None:
    """logit_bias and the min_tokens mask as one padded accumulate list (``SamplingMetadata.logit_bias``)."""
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items() if 0 <= t < vocab_size]
    entries += [(i, t, float("-inf")) for i, r in enumerate(requests) for t in stop_tokens_blocked(r)
                if 0 <= t < vocab_size]
    if not entries:
        return
    entries += [(0, 0, 0.0)] * (power_of_two_at_least(len(entries)) - len(entries))
    rows, cols, values = zip(*entries)
    meta.logit_bias = (host_to_device(rows, torch.long, device), host_to_device(cols, torch.long, device),
                       host_to_device(values, torch.float32, device))


def full_grammar_mask(rows: list[int], bitmask: torch.Tensor, padded_rows: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A grammar's (bitmask, rows) over all ``padded_rows`` rows: rows it does not constrain allow every token."""
    full = torch.full((padded_rows, bitmask.shape[1]), -1, dtype=torch.int32)
    full[torch.tensor(rows, dtype=torch.int64)] = bitmask
    return full.to(device), torch.arange(padded_rows, device=device)
