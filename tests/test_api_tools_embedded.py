"""Tool calling end to end: ``runtime serve`` with the embedded SmolLM2 and the official openai client.

SmolLM2's chat template has no tool support, so this also covers the tools-as-system-message
rendering. ``required`` and named choices rely on the structured-output backend to enforce the
calls' JSON schema (docs/api.md#tool-calling): their arguments must validate against the declared
parameters, as checked here with ``jsonschema``.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from api_server import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("api")]

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ROUTE = {"type": "function", "function": {
    "name": "plan_route", "description": "Plan a trip between two cities.",
    "parameters": {"type": "object", "properties": {"origin": {"type": "string"}, "destination": {"type": "string"},
                                                    "stops": {"type": "integer"}},
                   "required": ["origin", "destination"], "additionalProperties": False}}}
TOOLS = [WEATHER, ROUTE]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server():
    # float32, as tests/test_api_embedded.py explains.
    with ServerProcess("--kv-cache-memory", "256MiB", "--max-model-len", "2048", "--dtype", "float32",
                       "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def assert_valid_calls(message):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.function.name in SCHEMAS
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_follow_the_declared_schemas(client):
    """Needs the structured-output backend (merge of issue 15's items 1-2)."""
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                         temperature=0, max_tokens=64).choices[0]
    assert_valid_calls(out.message)


def test_named_call_follows_its_schema_streamed_and_not(client):
    """Valid arguments need the structured-output backend; the stream matching the whole
    response does not."""
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, temperature=0, max_tokens=48)
    whole = client.chat.completions.create(**kwargs).choices[0]
    call = whole.message.tool_calls[0]
    name, arguments, ids = None, "", []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        pieces = chunk.choices[0].delta.tool_calls if chunk.choices else None
        for piece in pieces or []:
            assert piece.index == 0
            ids += [piece.id] if piece.id else []
            name = name or piece.function.name
            arguments += piece.function.arguments or ""
    assert len(ids) == 1 and name == call.function.name == "get_weather"
    assert arguments == call.function.arguments
    assert_valid_calls(whole.message)
    assert whole.finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_text(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                         temperature=0, max_tokens=16).choices[0]
    assert out.message.content and not out.message.tool_calls and out.finish_reason in ("stop", "length")


def test_tool_loop_call_result_answer(client):
    """An agent's loop through the openai client: a call, its result sent back as a tool message,
    then the answer. The call's validity needs the structured-output backend."""
    messages = [{"role": "system", "content": "You are a weather assistant."}, *ASK]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=NAMED,
                                           temperature=0, max_tokens=48).choices[0]
    assert_valid_calls(first.message)
    messages.append(first.message)
    messages.append({"role": "tool", "tool_call_id": first.message.tool_calls[0].id,
                     "content": json.dumps({"temperature": 18, "unit": "celsius", "sky": "sunny"})})
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=32).choices[0]
    assert answer.message.content and not answer.message.tool_calls
