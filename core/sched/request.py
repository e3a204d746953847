"""A request as the scheduler owns it: tokens so far, progress, status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..multimodal.inputs import ImageInput
from ..pooling.params import PoolingSpec
from ..sample.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """One sequence being generated. ``n > 1`` is fanned out into n requests above this level."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 2048
    priority: int = 0
    """Lower runs first under the priority policy (vLLM's convention)."""
    lora_id: int = 0
    pooling: PoolingSpec | None = None
    """An embedding request: its whole prompt is computed in one step and pooled into a vector;
    it samples nothing and finishes (freeing its blocks) as that step is applied."""
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose KV is in the cache (prefix hits included), or is being written by a launched step."""
    num_pending_tokens: int = 0
    """Tokens sampled by a launched step and not read back yet (0 or 1): counted, not yet known."""
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    proposal_misses: int = 0
    """Consecutive steps whose proposed tokens were all rejected (speculative decoding)."""
    proposal_pause: int = 0
    """Decode steps left before this request gets room for proposals again."""
    mm_inputs: list[ImageInput] = field(default_factory=list)
    """The prompt's images, in prompt order, with where their placeholder tokens sit."""
    rope_positions: Optional[np.ndarray] = None
    """M-RoPE models (Qwen2-VL) with images: the prompt's [3, P] rotary positions."""
    rope_delta: int = 0
    """M-RoPE: rotary position minus index of every token after the prompt."""

    MAX_PROPOSAL_PAUSE = 63

    def count_proposals(self, num_proposed: int, num_accepted: int, misses_known: int) -> None:
        """Back off proposing for a request whose proposals keep failing: after z all-rejected
        steps in a row, 2^(z-1) - 1 steps without proposals (at most 63). Verifying wrong
        proposals costs a fraction of a step each time; this bounds that cost to a few percent
        of a request's steps, while one accepted token brings proposals back at once.

        ``misses_known``: the misses counted when the step was scheduled. A chained verification
        is launched before the step ahead of it is read back; where that step's miss was counted
        since, this one's is the same run of failures seen late, not a further one (it would
        double the pause), and its acceptance ends the pause that miss started."""
        if not num_proposed:
            return
        if num_accepted:
            self.proposal_misses = self.proposal_pause = 0
            return
        if self.proposal_misses > misses_known:
            return
        self.proposal_misses += 1
        self.proposal_pause = min(2 ** (self.proposal_misses - 1) - 1, self.MAX_PROPOSAL_PAUSE)

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.all_token_ids.extend(self.output_token_ids)
        # Stop at this many tokens (prompt + output): max_tokens or the context length.
        limit = self.max_model_len
        if self.sampling_params.max_tokens is not None:
            limit = min(limit, len(self.prompt_token_ids) + self.sampling_params.max_tokens)
        self.max_total_tokens = limit

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> RequestStatus | None:
        """The finished status the last appended token causes, if any (stop strings are the detokenizer's)."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if len(self.output_token_ids) >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_tokens >= self.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
