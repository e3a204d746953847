"""The constraint that makes ``tool_choice`` "required" or a named function always parse: a JSON
schema for the structured-output backend, built from the tools' parameter schemas."""

from __future__ import annotations

from typing import Any, Optional

from ..sample.params import StructuredOutputsParams

EMPTY_PARAMETERS = {"type": "object", "properties": {}}
"""A function declared without ``parameters`` takes none."""


def parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or EMPTY_PARAMETERS


def required_calls_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """A JSON list of one or more calls (exactly one when not ``parallel``), each
    ``{"name": <a declared name>, "arguments": <that function's parameters>}``."""
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [f["name"]]}, "arguments": parameters_schema(f)},
              "required": ["name", "arguments"], "additionalProperties": False}
             for f in functions]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def tool_choice_constraint(functions: list[dict[str, Any]], named: Optional[str],
                           parallel: bool) -> StructuredOutputsParams:
    """The constraint for ``tool_choice`` "required" (``named`` None) or naming a function: for a
    named function the output is its arguments object. The JSON is compact (no optional
    whitespace), so a model cannot run out of tokens writing blanks inside a call."""
    if named is not None:
        function = next(f for f in functions if f["name"] == named)
        return StructuredOutputsParams(json=parameters_schema(function), disable_any_whitespace=True)
    return StructuredOutputsParams(json=required_calls_schema(functions, parallel), disable_any_whitespace=True)
