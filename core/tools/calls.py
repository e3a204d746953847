"""A parsed tool call, and reading one from the JSON a model wrote."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional


def new_call_id() -> str:
    """An id in OpenAI's form, ``call_`` and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str
    """The arguments as JSON text (OpenAI's ``function.arguments``)."""
    id: str = field(default_factory=new_call_id)


def call_from_json(text: str) -> Optional[ToolCall]:
    """The call in ``text``, a JSON object ``{"name": ..., "arguments": {...}}`` (``parameters``
    for ``arguments``, as Llama 3 writes it; arguments given as JSON text are accepted too);
    None when ``text`` is not such an object. The arguments are re-serialized, so they are
    always one valid JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def json_value_end(text: str) -> Optional[int]:
    """Where the JSON object or array that ``text`` starts with ends (the index after its closing
    bracket), by bracket depth outside strings; None while it is unclosed. It does not check the
    JSON is valid: ``json.loads`` of the slice does."""
    depth = 0
    in_string = escaped = False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def arguments_object(arguments: str) -> Any:
    """A call's arguments as the object chat templates expect (they serialize it themselves);
    text that is not a JSON object stays text."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments
