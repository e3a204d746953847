"""One chat output split into thinking, answer and tool calls, whole or delta by delta.

``MessageStream`` chains the reasoning parser (thinking first) and a tool-call stream (calls in
the answer). Its deltas are what a streamed chat chunk carries: the deltas of each part, joined,
equal what ``message()`` returns for the whole text, because ``message()`` is the same stream fed
at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..engine.text_spans import TrimmedText
from ..reasoning import ReasoningParser
from .calls import ToolCall
from .parsers import CallScanner


@dataclass
class ToolCallDelta:
    """Part of a streamed call: the first delta of a call brings its ``id`` and ``name``, the
    following ones pieces of its ``arguments`` text."""

    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""


@dataclass
class MessageDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def add(self, other: "MessageDelta") -> "MessageDelta":
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


class ParsedCallStream:
    """Calls read by a format parser (``tool_choice`` auto or required): each call is sent whole
    once complete, as a delta with its id and name, then one with its arguments. Content around
    the calls is stripped of surrounding whitespace. ``parallel=False`` keeps the first call only."""

    def __init__(self, scanner: CallScanner, parallel: bool = True):
        self.scanner = scanner
        self.parallel = parallel
        self.calls: list[ToolCall] = []
        self._content = TrimmedText()

    def feed(self, text: str) -> MessageDelta:
        return self._deltas(self.scanner.feed(text))

    def finish(self) -> MessageDelta:
        return self._deltas(self.scanner.finish())

    def _deltas(self, events: list[Union[str, ToolCall]]) -> MessageDelta:
        delta = MessageDelta()
        for event in events:
            if isinstance(event, str):
                delta.content += self._content.feed(event)
            elif self.parallel or not self.calls:
                index = len(self.calls)
                self.calls.append(event)
                delta.tool_calls += [ToolCallDelta(index, event.id, event.name),
                                     ToolCallDelta(index, arguments=event.arguments)]
        return delta


class NamedCallStream:
    """A call of one named function (``tool_choice`` naming it): the output is its arguments,
    sent as they come after a first delta with the id and name."""

    def __init__(self, name: str):
        self.call = ToolCall(name, "")
        self.calls: list[ToolCall] = []
        self._arguments = TrimmedText()

    def feed(self, text: str) -> MessageDelta:
        return self._deltas(self._arguments.feed(text), final=False)

    def finish(self) -> MessageDelta:
        return self._deltas("", final=True)

    def _deltas(self, arguments: str, final: bool) -> MessageDelta:
        delta = MessageDelta()
        if not self.calls and (arguments or final):
            self.calls.append(self.call)
            delta.tool_calls.append(ToolCallDelta(0, self.call.id, self.call.name))
        if arguments:
            self.call.arguments += arguments
            delta.tool_calls.append(ToolCallDelta(0, arguments=arguments))
        return delta


ToolStream = Union[ParsedCallStream, NamedCallStream]


@dataclass
class ChatMessageParts:
    """A whole output's parts; an empty part is None (no calls: an empty list)."""

    reasoning: Optional[str]
    content: Optional[str]
    tool_calls: list[ToolCall]


class MessageStream:
    """One output through the reasoning parser (if any), then the tool-call stream (if any);
    with neither, the text is content as generated."""

    def __init__(self, reasoning: Optional[ReasoningParser] = None, tools: Optional[ToolStream] = None):
        self._reasoning = reasoning.stream() if reasoning is not None else None
        self._tools = tools

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._tools.calls if self._tools is not None else []

    def feed(self, text: str) -> MessageDelta:
        return self._parse(text, final=False)

    def finish(self) -> MessageDelta:
        return self._parse("", final=True)

    def _parse(self, text: str, final: bool) -> MessageDelta:
        """``final``: the output ended (``text`` is then empty); everything held is decided."""
        delta = MessageDelta(content=text)
        if self._reasoning is not None:
            split = self._reasoning.finish() if final else self._reasoning.feed(text)
            delta = MessageDelta(split.reasoning, split.content)
        if self._tools is not None:
            answer, delta.content = delta.content, ""
            delta.add(self._tools.feed(answer))
            if final:
                delta.add(self._tools.finish())
        return delta

    def message(self, text: str) -> ChatMessageParts:
        """The parts of the whole output ``text`` (call once, instead of feeding)."""
        whole = self.feed(text).add(self.finish())
        return ChatMessageParts(whole.reasoning or None, whole.content or None, list(self.tool_calls))
