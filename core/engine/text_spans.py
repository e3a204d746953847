"""Helpers for splitting a streamed output into spans (thinking, content, tool calls) as it arrives.

A streaming splitter may emit text only once no later text can change where it belongs: a suffix
that could begin a marker waits for the next delta, and whitespace at the edges of a span waits
until the span goes on. Fed the whole text at once or piece by piece, it then gives the same spans.
"""

from __future__ import annotations


def partial_marker_len(text: str, marker: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``marker``: the
    characters that must wait, because the next delta may complete the marker."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


class TrimmedText:
    """One span's text with the whitespace at both ends removed, as it streams: ``feed`` returns
    what may be sent now; leading whitespace is dropped and trailing whitespace held until more
    text follows it. What ``feed`` returns, joined, is the whole span's ``text.strip()``."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def feed(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        return body
