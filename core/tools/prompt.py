"""Tools and tool messages in the prompt.

A chat template that knows tools gets them as transformers passes them (``tools=...``, assistant
``tool_calls`` with their arguments as objects, ``tool`` messages). A template that does not (it
never reads ``tools`` or ``tool_calls``, as SmolLM2's) gets plain messages instead:

- the tools, with how to call them in the server's ``--tool-call-parser`` format (hermes when
  none is set), appended to the first system message (or in a new one);
- an assistant message's calls, written in that format after its content;
- each run of ``tool`` messages, one user message holding every result in
  ``<tool_response>`` tags (many templates accept only user and assistant turns).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jinja2
import jinja2.meta

from .calls import arguments_object


def _hermes_calls(calls: list[dict[str, Any]]) -> str:
    return "\n".join("<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
                     + "\n</tool_call>" for c in calls)


def _llama3_calls(calls: list[dict[str, Any]]) -> str:
    return "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]}, ensure_ascii=False) for c in calls)


def _mistral_calls(calls: list[dict[str, Any]]) -> str:
    return "[TOOL_CALLS]" + json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls],
                                       ensure_ascii=False)


def _mistral_call_id(call_id: str) -> str:
    """Mistral's templates refuse ids that are not 9 letters or digits: derive one from the id."""
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


@dataclass(frozen=True)
class CallFormat:
    """How a tool-call parser's format is written into a prompt."""

    how_to_call: str
    write_calls: Callable[[list[dict[str, Any]]], str]
    """Calls ({"name", "arguments": object}) as the model writes them."""
    template_call_id: Callable[[str], str] = str
    """The id a chat template is given for a call id (the same, except for Mistral's templates)."""


CALL_FORMATS = {
    "hermes": CallFormat(
        "To call a function, answer with a JSON object that names it and gives its arguments, inside "
        "<tool_call></tool_call> tags, one block per call:\n"
        '<tool_call>\n{"name": "function_name", "arguments": {"argument_name": "value"}}\n</tool_call>',
        _hermes_calls),
    "llama3_json": CallFormat(
        'To call a function, answer with only a JSON object {"name": "function_name", "parameters": '
        '{"argument_name": "value"}}; separate several calls with "; ".', _llama3_calls),
    "mistral": CallFormat(
        'To call functions, answer with [TOOL_CALLS] and a JSON list of calls, '
        '[{"name": "function_name", "arguments": {"argument_name": "value"}}].', _mistral_calls, _mistral_call_id),
}


@functools.lru_cache(maxsize=16)
def template_reads(template: str) -> tuple[bool, bool]:
    """Whether ``template`` reads the ``tools`` variable, and whether it reads ``tool_calls``
    (cached: a server renders with one or two templates, every request)."""
    try:
        tools = "tools" in jinja2.meta.find_undeclared_variables(
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"]).parse(template))
    except jinja2.TemplateSyntaxError:  # a tag of transformers' own: look at the text instead
        tools = re.search(r"\btools\b", template) is not None
    return tools, "tool_calls" in template


def tools_system_text(tools: list[dict[str, Any]], call_format: CallFormat) -> str:
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (f"You can call the functions described in <tools></tools> (JSON Schema parameters).\n"
            f"{call_format.how_to_call}\n<tools>\n{listed}\n</tools>")


def prompt_messages(messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]], template: str,
                    parser: Optional[str]) -> tuple[list[dict[str, Any]], Optional[list[dict[str, Any]]]]:
    """(messages, tools) to render ``messages`` and ``tools`` (OpenAI's shapes, arguments as JSON
    text) with ``template``, for a server whose tool-call parser is ``parser`` (None: hermes)."""
    call_format = CALL_FORMATS[parser or "hermes"]
    reads_tools, reads_calls = template_reads(template)
    out: list[dict[str, Any]] = []
    merging_results = False
    """The last message out is a user message of tool results (a following result joins it)."""
    for message in messages:
        calls = [{"id": call.get("id"), "name": call["function"]["name"],
                  "arguments": arguments_object(call["function"]["arguments"])}
                 for call in message.get("tool_calls") or []]
        message = {key: value for key, value in message.items() if key != "tool_calls"}
        if not reads_calls and message["role"] == "tool":
            result = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if merging_results:
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result})
                merging_results = True
            continue
        if reads_calls:
            if calls:
                message["tool_calls"] = [{"id": call_format.template_call_id(c["id"] or ""), "type": "function",
                                          "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
            if message.get("tool_call_id"):
                message["tool_call_id"] = call_format.template_call_id(message["tool_call_id"])
        elif calls:
            written = call_format.write_calls(calls)
            message["content"] = f"{message['content']}\n{written}" if message.get("content") else written
        out.append(message)
        merging_results = False
    if tools and not reads_tools:
        text = tools_system_text(tools, call_format)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": text})
        tools = None
    return out, tools
