"""Results as vLLM shapes them: RequestOutput holding one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


SampleLogprobs = list[dict[int, Logprob]]
"""One dict per generated token: the chosen token and the top-k alternatives."""
PromptLogprobs = list[Optional[dict[int, Logprob]]]
"""One entry per prompt token; the first is None (nothing predicts it)."""


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None
    """"stop", "length" or "abort"; None while running."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended it; None for EOS or length."""
    delta_text: str = ""
    """Text new since the previous output of this request (for streaming)."""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: Optional[SampleLogprobs] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0


@dataclass
class EmbeddingOutput:
    embedding: list[float]
    """The vector (its first ``dimensions`` components where a request asked for fewer)."""


@dataclass
class EmbeddingRequestOutput:
    """One prompt's embedding, as vLLM's ``LLM.embed`` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
