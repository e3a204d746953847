"""SpeculativeConfig: vLLM's ``--speculative-config`` JSON, checked on construction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to propose tokens for the target model to verify. Field names follow vLLM.

    ``ngram``: copy the tokens that followed the latest earlier occurrence of the sequence's last
    n tokens (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``). ``draft_model``: a
    smaller model with the target's vocabulary proposes greedily, with its own KV cache.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    model: Optional[str] = None
    """The draft model (an HF directory or a .gguf file), for ``draft_model``."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            hint = (" (EAGLE heads are not supported yet: use ngram or draft_model)" if self.method.startswith("eagle")
                    else "")
            raise ValueError(f"speculative_config method must be one of {', '.join(METHODS)}, got {self.method!r}{hint}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        if self.method == "ngram":
            low, high = self.prompt_lookup_min, self.prompt_lookup_max
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
                raise ValueError(f"speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                                 f"{low!r} and {high!r}")
        elif not self.model:
            raise ValueError('speculative_config method "draft_model" needs "model": the draft model\'s path')

    @classmethod
    def parse(cls, value: Union[str, dict[str, Any], "SpeculativeConfig", None]) -> Optional["SpeculativeConfig"]:
        """From the JSON text of ``--speculative-config``, a dict (``LLM(speculative_config=...)``)
        or a config; None stays None. ValueError names an unknown or missing key."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--speculative-config is not valid JSON ({exc}); e.g. "
                                 f'\'{{"method": "ngram", "num_speculative_tokens": 4}}\'') from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        if "method" not in value or "num_speculative_tokens" not in value:
            raise ValueError('speculative_config needs "method" and "num_speculative_tokens"')
        fields = dict(value)
        if fields["method"] == "ngram":  # one bound alone keeps the pair ordered
            low, high = fields.get("prompt_lookup_min"), fields.get("prompt_lookup_max")
            if low is None and isinstance(high, int):
                fields["prompt_lookup_min"] = min(2, high)
            if high is None and isinstance(low, int):
                fields["prompt_lookup_max"] = max(5, low)
        return cls(**fields)
