"""Tool-call parsers (``--tool-call-parser``): the formats models write their calls in.

Each parser reads one output incrementally: ``feed(delta)`` and ``finish()`` return events, either
content text or a ``ToolCall``, in output order. A call is returned once its JSON is complete and
valid; text that is not a well-formed call (a malformed or unfinished one) stays content, tags
included. A parser decides only what no later text can change, so the events do not depend on
how the output was cut into deltas: streamed and whole outputs parse the same.

- ``hermes`` (Qwen 2.5/3, Hermes, SmolLM): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call; text around the blocks is content.
- ``llama3_json`` (Llama 3.1-3.3): the output is ``{"name": ..., "parameters": {...}}`` objects
  separated by ``;`` (optionally after ``<|python_tag|>``); an output not starting with one is content.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name": ..., "arguments": {...}}`` (v3
  tokenizers), or ``[TOOL_CALLS]name[ARGS]{...}`` per call (v11+); text before it is content.
"""

from __future__ import annotations

import re
from typing import Union

from ..engine.text_spans import partial_marker_len
from .calls import ToolCall, call_from_json, json_value_end

Event = Union[str, ToolCall]


class CallScanner:
    """The incremental reader every format shares: ``_pending`` holds text received and not yet
    decided; each format's ``_step`` decides what it can and says whether to step again."""

    def __init__(self) -> None:
        self._pending = ""
        self._events: list[Event] = []

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        return self._run(final=True)

    def _run(self, final: bool) -> list[Event]:
        while self._step(final):
            pass
        events, self._events = self._events, []
        return events

    def _step(self, final: bool) -> bool:
        raise NotImplementedError

    def _content(self, text: str) -> None:
        if text:
            self._events.append(text)

    def _take(self, count: int) -> str:
        taken, self._pending = self._pending[:count], self._pending[count:]
        return taken

    def _content_until(self, tag: str, final: bool) -> bool:
        """Send the content before ``tag`` and consume the tag: True when it was there. A suffix
        that may begin the tag waits for more text (unless ``final``)."""
        at = self._pending.find(tag)
        if at >= 0:
            self._content(self._take(at))
            self._take(len(tag))
            return True
        keep = 0 if final else partial_marker_len(self._pending, tag)
        self._content(self._take(len(self._pending) - keep))
        return False


class HermesScanner(CallScanner):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._in_call = False

    def _step(self, final: bool) -> bool:
        if not self._in_call:
            self._in_call = self._content_until(self.START, final)
            return self._in_call
        end = self._pending.find(self.END)
        if end < 0 and not final:
            return False
        # At the end of the output an unclosed block still counts if its JSON is complete.
        body = self._take(end if end >= 0 else len(self._pending))
        closing = self._take(len(self.END)) if end >= 0 else ""
        call = call_from_json(body)
        if call is not None:
            self._events.append(call)
        else:
            self._content(self.START + body + closing)
        self._in_call = False
        return True


class Llama3JsonScanner(CallScanner):
    TAG = "<|python_tag|>"
    _SEPARATORS = " \t\r\n;"

    def __init__(self) -> None:
        super().__init__()
        self._state = "opening"

    def _step(self, final: bool) -> bool:
        if self._state == "opening":
            head = self._pending.lstrip()
            if head.startswith(self.TAG):
                self._pending, self._state = head[len(self.TAG):], "calls"
            elif self.TAG.startswith(head) and not final:
                return False  # nothing yet, or the beginning of the tag
            else:
                self._state = "calls" if head.startswith("{") else "content"
            return True
        if self._state == "calls":
            rest = self._pending.lstrip(self._SEPARATORS)
            if not rest:
                return False
            end = json_value_end(rest) if rest[0] == "{" else None
            if end is None and rest[0] == "{" and not final:
                return False
            call = call_from_json(rest[:end]) if end is not None else None
            if call is None:  # from here on, the output is content
                self._pending, self._state = rest, "content"
                return True
            self._events.append(call)
            self._pending = rest[end:]
            return True
        self._content(self._take(len(self._pending)))
        return False


class JsonArrayScanner(CallScanner):
    """A JSON list of call objects, ``[{"name": ..., "arguments": {...}}, ...]``: what
    ``tool_choice="required"`` constrains the output to, and Mistral's list after its tag.
    Each call is returned as its object completes; text from a malformed one on is content."""

    def __init__(self) -> None:
        super().__init__()
        self._state = "opened"
        self._undecided = ""
        """Text consumed since the last call (the tag, the bracket): content if what follows fails."""

    def _step(self, final: bool) -> bool:
        if self._state == "opened":
            return self._open(final)
        if self._state == "list":
            return self._list_item(final)
        if self._state == "after":
            return self._after(final)
        self._content(self._take(len(self._pending)))
        return False

    def _open(self, final: bool) -> bool:
        rest = self._pending.lstrip()
        if not rest:
            return self._fail() if final else False
        if rest[0] != "[":
            return self._fail()
        self._undecided += self._take(len(self._pending) - len(rest) + 1)
        self._state = "list"
        return True

    def _list_item(self, final: bool) -> bool:
        rest = self._pending.lstrip(" \t\r\n,")
        if not rest:
            return self._fail() if final else False
        if rest[0] == "]":
            self._pending, self._undecided, self._state = rest[1:], "", "after"
            return True
        end = json_value_end(rest) if rest[0] == "{" else None
        if end is None and rest[0] == "{" and not final:
            return False
        call = call_from_json(rest[:end]) if end is not None else None
        if call is None:
            if not self._undecided:  # after a call: the content starts at the item that failed
                self._pending = rest
            return self._fail()
        self._events.append(call)
        self._pending, self._undecided = rest[end:], ""
        return True

    def _after(self, final: bool) -> bool:
        """After the list: what follows is content."""
        self._state = "content"
        return True

    def _fail(self) -> bool:
        """What follows is not a call: it is content, and so is the rest of the output."""
        self._content(self._undecided + self._take(len(self._pending)))
        self._undecided, self._state = "", "content"
        return False


class MistralScanner(JsonArrayScanner):
    TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"
    _NAME = re.compile(r"[A-Za-z0-9_.\-]+")

    def __init__(self) -> None:
        super().__init__()
        self._state = "outside"

    def _step(self, final: bool) -> bool:
        if self._state == "outside":
            if self._content_until(self.TAG, final):
                self._state, self._undecided = "opened", self.TAG
                return True
            return False
        return super()._step(final)

    def _open(self, final: bool) -> bool:
        rest = self._pending.lstrip()
        if rest[:1] in ("[", ""):
            return super()._open(final)
        name = self._NAME.match(rest)
        if name is None:
            return self._fail()
        after = rest[name.end():]
        if not after.startswith(self.ARGS):
            # The name may still be growing, or [ARGS] still coming.
            return False if (not final and self.ARGS.startswith(after)) else self._fail()
        arguments = after[len(self.ARGS):].lstrip()
        if not arguments or arguments[0] != "{":
            return False if (not final and not arguments) else self._fail()
        end = json_value_end(arguments)
        if end is None:
            return self._fail() if final else False
        call = call_from_json(f'{{"name": "{name.group()}", "arguments": {arguments[:end]}}}')
        if call is None:
            return self._fail()
        self._events.append(call)
        self._pending = arguments[end:]
        self._state, self._undecided = "outside", ""
        return True

    def _after(self, final: bool) -> bool:
        """After the list, look for more calls."""
        self._state = "outside"
        return True


TOOL_CALL_PARSERS: dict[str, type[CallScanner]] = {
    "hermes": HermesScanner,
    "llama3_json": Llama3JsonScanner,
    "mistral": MistralScanner,
}


def check_tool_call_parser(name: str) -> str:
    """``name`` if it is a known parser; an error listing the known ones otherwise."""
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(sorted(TOOL_CALL_PARSERS))}")
    return name
