"""Tool calling: parsing calls out of model output (``--tool-call-parser``), the constraint behind
``tool_choice`` "required" and named functions, and tools in the prompt."""

from .calls import ToolCall, call_from_json, new_call_id
from .choice import required_calls_schema, tool_choice_constraint
from .parsers import TOOL_CALL_PARSERS, JsonArrayScanner, check_tool_call_parser
from .prompt import prompt_messages
from .stream import (ChatMessageParts, MessageDelta, MessageStream, NamedCallStream, ParsedCallStream, ToolCallDelta,
                     ToolStream)

__all__ = ["TOOL_CALL_PARSERS", "ChatMessageParts", "JsonArrayScanner", "MessageDelta", "MessageStream",
           "NamedCallStream", "ParsedCallStream", "ToolCall", "ToolCallDelta", "ToolStream", "call_from_json",
           "check_tool_call_parser", "new_call_id", "prompt_messages", "required_calls_schema",
           "tool_choice_constraint"]
