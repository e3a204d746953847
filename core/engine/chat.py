"""Chat prompts: the model's chat template (or one given with --chat-template) applied to messages."""

from __future__ import annotations

import os
from typing import Any, Optional

from ..tools.prompt import prompt_messages

ROLES = ("system", "user", "assistant", "tool", "developer")


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """``--chat-template`` takes a file path or the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"messages[{i}] must be an object with a role and content")
        if message["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role {message['role']!r} is not one of {', '.join(ROLES)}")
    return messages


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], template: Optional[str],
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: Optional[list[dict[str, Any]]] = None, tool_call_parser: Optional[str] = None) -> str:
    """The prompt text for ``messages``; raises ValueError when the model has no chat template.

    ``tools`` (OpenAI's ``{"type": "function", "function": {...}}``) and messages with
    ``tool_calls`` or the ``tool`` role go through the template when it knows them, and as text
    in the format of ``tool_call_parser`` (default hermes) when it does not (runtime.tools.prompt).
    """
    validate_messages(messages)
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the model has no chat template: pass one with --chat-template (a file or the template text)")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
    messages, tools = prompt_messages(messages, tools, template, tool_call_parser)
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, tools=tools,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message)
