"""A chat request's tools and the server's parsers: what goes into the prompt, the constraint on
the output, and how each choice's text is split into reasoning, content and tool calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from runtime.reasoning import ReasoningParser
from runtime.sample.params import SamplingParams
from runtime.structured.grammar import check
from runtime.tools import (TOOL_CALL_PARSERS, JsonArrayScanner, MessageStream, NamedCallStream, ParsedCallStream,
                           ToolCall, ToolCallDelta, ToolStream, check_tool_call_parser,
                           tool_choice_constraint)

from .errors import bad_request
from .protocol import ChatCompletionRequest, ChatToolCall, FunctionCall, NamedToolChoice

AUTO_NEEDS_FLAGS = ('"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                    '--tool-call-parser; send tool_choice "none", "required" or a named function instead')


@dataclass(frozen=True)
class ChatParsing:
    """The server's side: ``--reasoning-parser``, ``--tool-call-parser``, ``--enable-auto-tool-choice``."""

    reasoning_parser: Optional[str] = None
    tool_call_parser: Optional[str] = None
    enable_auto_tool_choice: bool = False

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None:
            check_tool_call_parser(self.tool_call_parser)
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser "
                             f"({', '.join(sorted(TOOL_CALL_PARSERS))})")

    def plan(self, request: ChatCompletionRequest) -> "ChatPlan":
        """This request's plan; a 400 for ``auto`` when the server does not parse calls."""
        choice = request.tool_choice or ("auto" if request.tools else "none")
        if choice == "auto" and not self.enable_auto_tool_choice:
            raise bad_request(AUTO_NEEDS_FLAGS, "tool_choice")
        functions = [tool.function.model_dump(exclude_none=True) for tool in request.tools or []]
        return ChatPlan(self, choice.function.name if isinstance(choice, NamedToolChoice) else choice, functions,
                        request.parallel_tool_calls is not False)


@dataclass(frozen=True)
class ChatPlan:
    parsing: ChatParsing
    choice: str
    """"none", "auto", "required", or the name of the function to call."""
    functions: list[dict[str, Any]]
    parallel: bool

    @property
    def named(self) -> bool:
        return self.choice not in ("none", "auto", "required")

    @property
    def parses(self) -> bool:
        """Whether the output text is split at all (else it is the content, as generated)."""
        return self.choice != "none" or self.parsing.reasoning_parser is not None

    def prompt_tools(self) -> Optional[list[dict[str, Any]]]:
        """The tools the template renders: none when the model may not call them."""
        if self.choice == "none" or not self.functions:
            return None
        return [{"type": "function", "function": f} for f in self.functions]

    def constrain(self, params: SamplingParams) -> None:
        """Set the output constraint of ``required`` and named choices (a 400 if the request
        constrains its output otherwise already); keep Mistral's call tag in the text."""
        if self.choice == "required" or self.named:
            if params.structured_outputs is not None:
                raise bad_request("tool_choice required or naming a function constrains the output already: "
                                  "drop response_format / structured_outputs, or use tool_choice auto", "tool_choice")
            params.structured_outputs = tool_choice_constraint(self.functions, self.choice if self.named else None,
                                                               self.parallel)
            try:  # here, so that a stream does not start before the engine refuses the constraint
                check(params.structured_outputs)
            except ValueError as exc:
                message = str(exc).split(" is invalid: ", 1)[-1]
                raise bad_request(f"the tools' parameters do not make a valid JSON schema: {message}",
                                  "tools") from None
        elif self.choice == "auto" and self.parsing.tool_call_parser == "mistral":
            params.skip_special_tokens = False  # [TOOL_CALLS] is a special token

    def stream(self) -> MessageStream:
        """A fresh splitter for one choice's text."""
        tools: Optional[ToolStream] = None
        if self.named:
            tools = NamedCallStream(self.choice)
        elif self.choice == "required":
            tools = ParsedCallStream(JsonArrayScanner(), self.parallel)
        elif self.choice == "auto":
            tools = ParsedCallStream(TOOL_CALL_PARSERS[self.parsing.tool_call_parser](), self.parallel)
        reasoning = ReasoningParser(self.parsing.reasoning_parser) if self.parsing.reasoning_parser else None
        return MessageStream(reasoning, tools)


def response_calls(calls: list[ToolCall]) -> list[ChatToolCall]:
    return [ChatToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments)) for call in calls]


def finish_reason(reason: Optional[str], calls: list[ToolCall]) -> Optional[str]:
    """``tool_calls`` when an output that ended normally made calls."""
    return "tool_calls" if calls and reason == "stop" else reason


def delta_rounds(deltas: list[ToolCallDelta]) -> list[list[dict[str, Any]]]:
    """Streamed call pieces (DeltaToolCall dicts) in rounds that name each call once, so a call's
    first piece (id and name) and its arguments travel in consecutive chunks, as OpenAI's do."""
    rounds: list[list[dict[str, Any]]] = []
    last_round: dict[int, int] = {}
    """Call index -> the round holding its latest piece."""
    for delta in deltas:
        piece: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
        if delta.id is not None:
            piece.update(id=delta.id, type="function", function={"name": delta.name, "arguments": delta.arguments})
        number = last_round.get(delta.index, -1) + 1
        if number == len(rounds):
            rounds.append([])
        rounds[number].append(piece)
        last_round[delta.index] = number
    return rounds
