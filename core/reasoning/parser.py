"""Splitting a reasoning model's output into its thinking (``reasoning_content``) and the answer
(``content``), whole or as it streams.

The thinking span runs from the start marker (or from the start of the output, for formats whose
chat template opens it in the prompt) to the end marker; everything after the end marker is the
answer. Output without an end marker is all thinking once the span was opened (the model ran out
of tokens while thinking), and all answer otherwise (qwen3 with thinking switched off). Both parts
are stripped of surrounding whitespace (the templates put newlines around the markers); an empty
part is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..engine.text_spans import TrimmedText, partial_marker_len
from .markers import ReasoningMarkers, reasoning_markers


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningStream:
    """One output's split, fed delta by delta: ``feed(text)`` and ``finish()`` return what is new
    in each part. The parts returned, joined, equal ``ReasoningParser.split`` of the whole text,
    however the text was cut into deltas."""

    _OPENING, _THINKING, _ANSWER = range(3)

    def __init__(self, markers: ReasoningMarkers):
        self.markers = markers
        self._state = self._OPENING
        self._pending = ""
        self._reasoning = TrimmedText()
        self._content = TrimmedText()

    def feed(self, text: str) -> ReasoningDelta:
        self._pending += text
        return self._advance(final=False)

    def finish(self) -> ReasoningDelta:
        return self._advance(final=True)

    def _advance(self, final: bool) -> ReasoningDelta:
        delta = ReasoningDelta()
        if self._state == self._OPENING:
            head = self._pending.lstrip()
            start = self.markers.start
            if head.startswith(start):
                self._pending = head[len(start):]
                self._state = self._THINKING
            elif start.startswith(head) and not final:
                return delta  # empty, or the beginning of the start marker: wait
            else:
                self._state = self._THINKING if self.markers.starts_thinking else self._ANSWER
        if self._state == self._THINKING:
            end = self._pending.find(self.markers.end)
            if end >= 0:
                delta.reasoning = self._reasoning.feed(self._pending[:end])
                self._pending = self._pending[end + len(self.markers.end):]
                self._state = self._ANSWER
            else:
                keep = 0 if final else partial_marker_len(self._pending, self.markers.end)
                delta.reasoning = self._reasoning.feed(self._pending[:len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
        if self._state == self._ANSWER:
            delta.content = self._content.feed(self._pending)
            self._pending = ""
        return delta


class ReasoningParser:
    """The parser named by ``--reasoning-parser`` (``deepseek_r1``, ``qwen3``)."""

    def __init__(self, name: str):
        self.name = name
        self.markers = reasoning_markers(name)

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.markers)

    def split(self, text: str) -> tuple[Optional[str], Optional[str]]:
        """(reasoning, content) of a whole output; an empty part is None."""
        stream = self.stream()
        first, last = stream.feed(text), stream.finish()
        return first.reasoning + last.reasoning or None, first.content + last.content or None
