"""The text that opens and closes each reasoning parser's thinking span.

The engine core needs only the closing marker's token ids (structured output starts after it);
the API process splits the text into ``reasoning_content`` and ``content``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningMarkers:
    start: str
    end: str
    starts_thinking: bool
    """True when the chat template already opened the span (DeepSeek-R1 puts ``<think>`` in the
    prompt), so output before ``end`` is thinking even without ``start``."""

    def end_token_ids(self, tokenizer) -> list[int]:
        """The token ids of ``end``; it must be one token (as it is for the models these parsers serve)."""
        ids = tokenizer.encode(self.end, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"reasoning end marker {self.end!r} is {len(ids)} tokens for this tokenizer, "
                             "not one: this model does not use this reasoning parser's format")
        return ids


REASONING_PARSERS = {
    "deepseek_r1": ReasoningMarkers("<think>", "</think>", starts_thinking=True),
    "qwen3": ReasoningMarkers("<think>", "</think>", starts_thinking=False),
}


def reasoning_markers(name: str) -> ReasoningMarkers:
    """The markers of parser ``name``; an unknown name is an error listing the known ones."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(sorted(REASONING_PARSERS))}") from None
