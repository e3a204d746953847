"""Batched sampling: one step's logits [B, V] -> next token per row (+ logprobs).

The order follows vLLM v1: a grammar's mask (structured output), logit_bias, the min_tokens mask, penalties; then greedy rows take
the argmax and the other rows go through temperature, top-k / top-p / min-p, softmax and an
exponential race. Logprobs describe the raw model distribution, before any of that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..platform.reference import apply_token_bitmask, apply_top_k_top_p_min_p
from ..sched.request import Request
from .params import SamplingParams
from ..spec.rejection import DraftLayout, rejection_sample
from .noise import exponential_noise
from ..worker.input_buffers import host_to_device, host_to_device_columns

TopKTopPMinP = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits [B, V], top_k [B], top_p [B], min_p [B]) -> logits with excluded tokens at -inf."""
TokenBitmask = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits [B, V], bitmask [N, ceil(V / 32)] int32, rows [N]) -> logits, disallowed tokens at -inf in place."""


@dataclass
class SamplingMetadata:
    """Per-row sampling settings of one batch, as tensors on the logits' device.

    Optional groups are None when no row needs them, so the common batch (no penalties, no
    bias, no min_tokens) does no [B, V] work beyond sampling itself.
    """

    temperature: torch.Tensor
    """[B] float32; 1.0 on greedy rows so dividing the whole batch is harmless."""
    greedy: torch.Tensor
    """[B] bool."""
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor
    """[B] int64; 0: off."""
    top_p: torch.Tensor
    """[B] float32; 1.0: off."""
    min_p: torch.Tensor
    """[B] float32; 0.0: off."""
    needs_top_k_top_p_min_p: bool
    """False when no sampled row truncates its distribution: the kernel call is skipped."""
    generators: list[Optional[torch.Generator]]
    """Per row: the request's own generator when it has a seed, else None (shared draw)."""
    max_num_logprobs: Optional[int]
    """The largest ``logprobs`` any row asked for; None: no row asked."""
    output_token_counts: Optional[torch.Tensor] = None
    """[B, V] float32: how often each token occurs in the row's output; set when any penalty is."""
    frequency_penalties: Optional[torch.Tensor] = None
    """[B]; set with presence_penalties when any row has either."""
    presence_penalties: Optional[torch.Tensor] = None
    repetition_penalties: Optional[torch.Tensor] = None
    """[B]; set with prompt_token_mask when any row's repetition_penalty is not 1."""
    prompt_token_mask: Optional[torch.Tensor] = None
    """[B, V] bool: the token occurs in the row's prompt."""
    logit_bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    """(rows, token ids, values), each [N]."""
    min_tokens_blocked: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """(rows, token ids), each [N]: stop tokens a row may not sample yet."""
    grammar: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """(bitmask [N, ceil(V / 32)] int32, rows [N]): what structured output allows in N rows."""
    seeded_noise: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """(rows [B] bool, noise [B, V]): Exp(1) draws made on the host from seeded rows' generators,
    replacing those rows' noise (``runtime.sample.static_shapes``: the device may have no generators)."""

    @classmethod
    def from_requests(cls, requests: list[Request], vocab_size: int, device: torch.device | str,
                      generators: dict[str, torch.Generator],
                      recent: Optional["RecentRowColumns"] = None) -> "SamplingMetadata":
        """Build the batch's metadata, rows in the order of ``requests``.

        ``generators`` maps request_id to the generator of a seeded request. A missing entry is
        created here from the seed, once, so later steps continue the same random stream; the
        caller owns the dict and drops a request's entry when it finishes. ``recent``: reuse the
        device copy of the per-row settings of a recent batch that had the same ones.
        """
        params = [r.sampling_params for r in requests]
        greedy = [p.greedy for p in params]

        device = torch.device(device)

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return host_to_device(values, dtype, device)

        meta = cls(
            **(row_columns(params, device) if recent is None else recent.columns(params, device)),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            needs_top_k_top_p_min_p=any(
                (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0) for p, g in zip(params, greedy) if not g),
            generators=[request_generator(r, device, generators) for r in requests],
            max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=None),
        )

        add_penalties(meta, params, lambda: [r.output_token_ids for r in requests],
                      lambda: [r.prompt_token_ids for r in requests], vocab_size, device)

        # Ids outside the vocabulary are the API's to reject; here they would crash the whole batch.
        bias = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items() if 0 <= t < vocab_size]
        if bias:
            rows, cols, values = zip(*bias)
            meta.logit_bias = (column(rows, torch.long), column(cols, torch.long), column(values, torch.float32))

        blocked = [(i, t) for i, r in enumerate(requests) for t in stop_tokens_blocked(r) if 0 <= t < vocab_size]
        if blocked:
            rows, cols = zip(*blocked)
            meta.min_tokens_blocked = (column(rows, torch.long), column(cols, torch.long))
        return meta


@dataclass
class SamplerOutput:
    """The sampled tokens of a batch; the logprob fields are set when any row asked for logprobs."""

    token_ids: torch.Tensor
    """[B] int64."""
    logprob_token_ids: Optional[torch.Tensor] = None
    """[B, K+1] int64: column 0 the sampled token, then the row's top-K tokens, best first."""
    logprobs: Optional[torch.Tensor] = None
    """[B, K+1] float32: raw-model logprobs of ``logprob_token_ids``."""
    sampled_ranks: Optional[torch.Tensor] = None
    """[B] int64: 1 + the number of tokens with a strictly higher raw logprob than the sampled one."""
    num_tokens: Optional[torch.Tensor] = None
    """Set by :meth:`Sampler.verify`: [B] int64 tokens per request (accepted proposals + 1);
    ``token_ids`` is then [B, K+1] (-1 past ``num_tokens``) and the logprob fields have one
    row per verified position ([R, ...], see ``DraftLayout``). Left None by a verification whose
    rows are all greedy, without logprobs: ``token_ids`` is then each row's argmax [R], and
    ``DraftLayout.emitted`` matches the proposals on the host, a few compares of R numbers
    in place of a dozen device ops."""


class Sampler:
    """Turns a batch of logits into tokens, each row with its own sampling settings.

    ``top_k_top_p_min_p`` and ``apply_token_bitmask`` let a platform pass its own kernels (same
    contract as the reference).
    """

    def __init__(self, top_k_top_p_min_p: TopKTopPMinP = apply_top_k_top_p_min_p,
                 apply_token_bitmask: TokenBitmask = apply_token_bitmask) -> None:
        self.top_k_top_p_min_p = top_k_top_p_min_p
        self.apply_token_bitmask = apply_token_bitmask

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits [B, V] (any float dtype; left unchanged) -> SamplerOutput."""
        raw_logprobs = logits.float().log_softmax(-1) if meta.max_num_logprobs is not None else None
        # One float32 copy, so every step below may work in place without touching the caller's tensor.
        logits = logits.to(torch.float32, copy=True)
        self._apply_grammar(logits, meta)
        _apply_bias_and_penalties(logits, meta)
        token_ids = self._sample(logits, meta)
        if raw_logprobs is None:
            return SamplerOutput(token_ids)
        return _with_logprobs(token_ids, raw_logprobs, meta.max_num_logprobs)

    def verify(self, logits: torch.Tensor, meta: SamplingMetadata, layout: DraftLayout) -> SamplerOutput:
        """Speculative decoding: logits [R, V] of every verified position (``layout``), rows
        sampled as ``meta`` says (built from ``layout.row_views``) -> each request's accepted
        proposed tokens and the token after them. Greedy rows accept a proposal equal to the
        argmax; other rows by rejection sampling (see ``spec.rejection``), which leaves each
        request's output distribution what it is without proposals."""
        raw_logprobs = logits.float().log_softmax(-1) if meta.max_num_logprobs is not None else None
        logits = logits.to(torch.float32, copy=True)
        self._apply_grammar(logits, meta)
        _apply_bias_and_penalties(logits, meta)
        greedy_ids = None if meta.all_random else logits.argmax(-1)
        if meta.all_greedy and raw_logprobs is None:
            return SamplerOutput(greedy_ids)  # matched against the proposals on the host (DraftLayout.emitted)
        probs = None if meta.all_greedy else self._probabilities(logits, meta)
        token_ids, num_tokens, row_tokens = rejection_sample(probs, greedy_ids, meta.greedy, meta.generators, layout,
                                                             row_tokens=raw_logprobs is not None)
        if raw_logprobs is None:
            return SamplerOutput(token_ids, num_tokens=num_tokens)
        out = _with_logprobs(row_tokens, raw_logprobs, meta.max_num_logprobs)
        out.token_ids, out.num_tokens = token_ids, num_tokens
        return out

    def _apply_grammar(self, logits: torch.Tensor, meta: SamplingMetadata) -> None:
        if meta.grammar is not None:
            self.apply_token_bitmask(logits, *meta.grammar)

    def _probabilities(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """In place: temperature, top-k / top-p / min-p, softmax (greedy rows: meaningless)."""
        logits.div_(meta.temperature.unsqueeze(1))
        if meta.needs_top_k_top_p_min_p:
            logits = self.top_k_top_p_min_p(logits, meta.top_k, meta.top_p, meta.min_p)
        return logits.softmax(-1)

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        greedy_ids = None if meta.all_random else logits.argmax(-1)
        if meta.all_greedy:
            return greedy_ids
        probs = self._probabilities(logits, meta)
        # Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i,
        # without a cumsum/searchsorted, and each row's noise can come from its own generator.
        noise = exponential_noise(probs, meta.generators)
        if meta.seeded_noise is not None:
            seeded, drawn = meta.seeded_noise
            noise = torch.where(seeded.unsqueeze(1), drawn, noise)
        sampled = probs.div_(noise).argmax(-1)
        return sampled if greedy_ids is None else torch.where(meta.greedy, greedy_ids, sampled)


def _apply_bias_and_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """In place: logit_bias, then the min_tokens mask, then repetition/frequency/presence penalties."""
    if meta.logit_bias is not None:
        rows, cols, values = meta.logit_bias
        logits.index_put_((rows, cols), values, accumulate=True)
    if meta.min_tokens_blocked is not None:
        logits[meta.min_tokens_blocked] = float("-inf")
    counts = meta.output_token_counts
    if meta.repetition_penalties is not None:
        # HF / vLLM: every token seen in prompt or output is made less likely, whatever its sign.
        seen = meta.prompt_token_mask | (counts > 0)
        penalty = meta.repetition_penalties.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    if meta.frequency_penalties is not None:
        # OpenAI: output tokens only, count * frequency + (count > 0) * presence.
        logits.sub_(meta.frequency_penalties.unsqueeze(1) * counts + meta.presence_penalties.unsqueeze(1) * (counts > 0))


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of each row of ``logprobs`` [R, V] and their token ids, largest first,
    equal values in token-id order. torch's topk orders ties by whichever algorithm it picks for
    the tensor's shape (on CUDA, one per row or several blocks per row by the number of rows), so
    a request's list would depend on its batch; the values it returns do not."""
    k = min(k, logprobs.shape[-1])
    if k == 0:
        return logprobs[:, :0], torch.zeros(logprobs.shape[0], 0, dtype=torch.long, device=logprobs.device)
    kth = logprobs.topk(k, dim=-1).values[:, -1:]
    above, ties = logprobs > kth, logprobs == kth
    # Of the values equal to the k-th, the lowest token ids fill the list (an integer count: exact).
    chosen = above | (ties & (ties.cumsum(-1, dtype=torch.int32) <= k - above.sum(-1, keepdim=True)))
    ids = chosen.nonzero()[:, 1].view(logprobs.shape[0], k)
    values = logprobs.gather(1, ids)
    order = values.sort(dim=-1, descending=True, stable=True).indices
    return values.gather(1, order), ids.gather(1, order)


def _with_logprobs(token_ids: torch.Tensor, raw_logprobs: torch.Tensor, k: int) -> SamplerOutput:
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1))
    top_values, top_ids = top_logprobs(raw_logprobs, k)
    return SamplerOutput(
        token_ids=token_ids,
        logprob_token_ids=torch.cat([token_ids.unsqueeze(1), top_ids], dim=1),
        logprobs=torch.cat([sampled, top_values], dim=1),
        sampled_ranks=(raw_logprobs > sampled).sum(-1) + 1,
    )


ROW_COLUMNS = ("temperature", "greedy", "top_k", "top_p", "min_p")
_ROW_DTYPES = (torch.float32, torch.bool, torch.long, torch.float32, torch.float32)


def _row_values(params: list[SamplingParams]) -> tuple[list, ...]:
    return ([1.0 if p.greedy else p.temperature for p in params], [p.greedy for p in params],
            [p.top_k for p in params], [p.top_p for p in params], [p.min_p for p in params])


def row_columns(params: list[SamplingParams], device: torch.device) -> dict[str, torch.Tensor]:
    """The per-row settings every batch has (``SamplingMetadata``'s fields of those names), in one
    copy to the device."""
    return _copied_columns(_row_values(params), device)


def _copied_columns(values: tuple[list, ...], device: torch.device) -> dict[str, torch.Tensor]:
    return dict(zip(ROW_COLUMNS, host_to_device_columns(list(zip(values, _ROW_DTYPES)), device)))


class RecentRowColumns:
    """The device copies of the last few batches' per-row settings, found again by value.

    Consecutive decode steps mostly sample the same rows with the same settings, and each new copy
    costs a pinned staging block and a copy launched from the host: on the critical path of a
    speculative step, whose host work cannot overlap the device's. Matching by value (not by the
    params objects) keeps a copy right when a caller changes a params object between requests.
    The tensors are shared between the batches that match, so nothing may write into them.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: list[tuple[torch.device, tuple[list, ...], dict[str, torch.Tensor]]] = []

    def columns(self, params: list[SamplingParams], device: torch.device) -> dict[str, torch.Tensor]:
        """:func:`row_columns` of ``params``, a recent batch's copy where its settings were the same."""
        values = _row_values(params)
        for index, (where, known, columns) in enumerate(self._entries):
            if where == device and known == values:
                self._entries.insert(0, self._entries.pop(index))
                return columns
        columns = _copied_columns(values, device)
        self._entries.insert(0, (device, values, columns))
        del self._entries[self.size:]
        return columns


def add_penalties(meta: SamplingMetadata, params: list[SamplingParams], outputs: Callable[[], list[list[int]]],
                  prompts: Callable[[], list[list[int]]], vocab_size: int, device: torch.device,
                  width: Callable[[list[list[int]]], int | None] = lambda rows: None) -> None:
    """Set the penalty groups of ``meta`` that some row needs; ``outputs()`` and ``prompts()``
    give the rows' token lists, asked for only where a penalty counts them (a verified row's
    output list is built on demand); ``width(rows)`` pads the token lists counted (None: to the
    longest)."""
    has_repetition = any(p.repetition_penalty != 1.0 for p in params)
    has_additive = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
    if has_repetition or has_additive:
        rows = outputs()
        meta.output_token_counts = token_counts(rows, vocab_size, device, width(rows))
    if has_additive:
        meta.frequency_penalties = host_to_device([p.frequency_penalty for p in params], torch.float32, device)
        meta.presence_penalties = host_to_device([p.presence_penalty for p in params], torch.float32, device)
    if has_repetition:
        meta.repetition_penalties = host_to_device([p.repetition_penalty for p in params], torch.float32, device)
        rows = prompts()
        meta.prompt_token_mask = token_counts(rows, vocab_size, device, width(rows)) > 0


def request_generator(request: Request, device: torch.device | str, generators: dict[str, torch.Generator]) -> Optional[torch.Generator]:
    seed = request.sampling_params.seed
    if seed is None:
        return None
    if request.request_id not in generators:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        generators[request.request_id] = generator
    return generators[request.request_id]


def argmax_only(request: Request) -> bool:
    """Whether the request's next token is the argmax of the raw logits, with nothing else to
    report: greedy, no logprobs, and nothing that changes the logits (penalties, logit_bias, stop
    tokens that min_tokens still blocks; a grammar is the caller's to check)."""
    params = request.sampling_params
    return (params.greedy and params.logprobs is None and not params.logit_bias and params.repetition_penalty == 1.0
            and params.frequency_penalty == 0.0 and params.presence_penalty == 0.0 and not stop_tokens_blocked(request))


def stop_tokens_blocked(request: Request) -> set[int]:
    """Tokens the request may not sample yet: its stop tokens (and EOS unless ignore_eos) until min_tokens are out."""
    params = request.sampling_params
    if not params.min_tokens or len(request.output_token_ids) >= params.min_tokens:
        return set()
    blocked = set(params.stop_token_ids)
    if not params.ignore_eos:
        blocked |= request.eos_token_ids
    return blocked


def token_counts(rows: list[list[int]], vocab_size: int, device: torch.device | str,
                 width: int | None = None) -> torch.Tensor:
    """[B, V] float32 occurrence counts. Rows are padded with id V to ``width`` (default: the
    longest row's length), an extra column dropped at the end, so rows of any length go through
    one scatter_add."""
    width = max((len(row) for row in rows), default=0) if width is None else width
    tokens = host_to_device([row + [vocab_size] * (width - len(row)) for row in rows], torch.long, torch.device(device))
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float32))
    return counts[:, :vocab_size]
