"""SamplingParams: vLLM's field names, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class StructuredOutputsParams:
    """A constraint on a request's output, in vLLM's shape: set exactly one of the first six fields.

    ``json`` is a JSON schema (a dict or its JSON text), ``regex`` a regular expression, ``choice``
    a list of literal answers, ``grammar`` an EBNF grammar, ``json_object`` any JSON object,
    ``structural_tag`` a JSON text of xgrammar's structural-tag form (free text with constrained
    spans, as tool calls use).
    """

    json: Optional[Any] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[str] = None
    disable_any_whitespace: bool = False
    """JSON without optional whitespace between tokens (shorter outputs)."""
    disable_additional_properties: bool = False
    """Objects in ``json`` accept no property the schema does not name."""
    whitespace_pattern: Optional[str] = None

    KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    def __post_init__(self) -> None:
        kinds = [name for name in self.KINDS if getattr(self, name) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(
                f"structured_outputs needs exactly one of {', '.join(self.KINDS)}, "
                f"got {', '.join(kinds) if kinds else 'none'}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        """The one constraint set: 'json', 'regex', 'choice', 'grammar', 'json_object' or 'structural_tag'."""
        return next(name for name in self.KINDS if getattr(self, name) not in (None, False))


@dataclass
class SamplingParams:
    """How to sample one request's output. Field names and defaults follow vLLM.

    Invalid values raise ``ValueError`` naming the field, so the CLI and the HTTP API can
    report them as they are.
    """

    n: int = 1
    """Independent completions for the prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1: off."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    """Per-request seed: the output is reproducible whatever else shares the batch."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    """Generate past end-of-sequence; a structured output still ends where its grammar does (as vLLM)."""
    max_tokens: Optional[int] = 16
    """None: up to the model's context length."""
    min_tokens: int = 0
    logprobs: Optional[int] = None
    """Number of top logprobs to return per generated token (the sampled one always included)."""
    prompt_logprobs: Optional[int] = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: Optional[StructuredOutputsParams] = None
    """Constrain the output to a JSON schema, regex, choice or grammar."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, name: str, requirement: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {requirement}, got {getattr(self, name)!r}")

        check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1")
        check(self.temperature >= 0, "temperature", ">= 0")
        check(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "0 or -1 (off) or a positive integer")
        check(0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]")
        check(self.repetition_penalty > 0, "repetition_penalty", "> 0")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1), "max_tokens", "an integer >= 1")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "<= max_tokens")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0), "logprobs", "an integer >= 0")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
              "prompt_logprobs", "an integer >= 0")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "a list of token ids")
        check(self.seed is None or isinstance(self.seed, int), "seed", "an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
