"""Tool calling and reasoning output through the real app and the official openai client, with a
scripted model (tests/scripted_engine.py): the test decides what the model writes and checks what
the server answers, streamed and not, and what it asked of the engine."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from litestar.testing import TestClient

from api_server import assert_error
from runtime.api.app import create_app
from runtime.api.protocol import ChatCompletionChunk
from runtime.tools import required_calls_schema
from scripted_engine import ScriptedEngine
from tiny_models import make_tiny_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "local_time", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time there?"}]
TWO_CALLS = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
             '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "local_time", "arguments": {"city": "Paris"}}'
             '\n</tool_call>')


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def serve(tokenizer):
    """serve(reasoning_parser=..., tool_call_parser=..., enable_auto_tool_choice=...) -> (engine, client, http)."""
    opened = []

    def start(reasoning_parser=None, **flags):
        engine = ScriptedEngine(tokenizer, reasoning_parser)
        http = TestClient(create_app(engine, ["scripted"], **flags)).__enter__()
        opened.append(http)
        client = openai.OpenAI(base_url="http://testserver.local/v1", api_key="unused", http_client=http,
                               max_retries=0)
        return engine, client, http

    yield start
    for http in opened:
        http.__exit__(None, None, None)


@pytest.fixture(scope="module")
def hermes(serve):
    return serve(tool_call_parser="hermes", enable_auto_tool_choice=True)


def calls_of(message):
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def reassemble(chunks):
    """(reasoning, content, [(name, arguments)], finish_reason) from streamed chunks; checks each
    call opens with its id, type and name before any argument piece."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                if piece.index not in calls:
                    assert piece.id.startswith("call_") and piece.type == "function" and piece.function.name
                    assert piece.function.arguments == "", "the name comes first, the arguments after"
                    calls[piece.index] = [piece.function.name, ""]
                else:
                    assert piece.id is None and piece.function.name is None
                    calls[piece.index][1] += piece.function.arguments
            finish = choice.finish_reason or finish
    return reasoning or None, content or None, [(n, json.loads(a)) for n, a in calls.values()], finish


def test_auto_calls_streamed_and_not(hermes):
    engine, client, _ = hermes
    engine.reply = TWO_CALLS
    out = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, n=2)
    expected = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("local_time", {"city": "Paris"})]
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "I will look both up."
        assert calls_of(choice.message) == expected
        assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    # The tools reached the prompt (this template has no tool support: as a system message).
    prompt = engine.received[-1].prompt
    assert json.dumps(WEATHER) in prompt and "<tool_call>" in prompt
    assert engine.received[-1].params.structured_outputs is None  # auto is never constrained
    stream = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, stream=True)
    assert reassemble(stream) == (None, "I will look both up.", expected, "tool_calls")
    # The openai client's own accumulator agrees.
    with client.chat.completions.stream(model="scripted", messages=ASK, tools=TOOLS) as events:
        final = events.get_final_completion().choices[0]
    assert calls_of(final.message) == expected and final.message.content == "I will look both up."


def test_parallel_tool_calls_false_returns_one_call(hermes):
    engine, client, _ = hermes
    engine.reply = TWO_CALLS
    out = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, parallel_tool_calls=False)
    assert [name for name, _ in calls_of(out.choices[0].message)] == ["get_weather"]


def test_malformed_call_stays_content(hermes):
    engine, client, _ = hermes
    engine.reply = 'Calling.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'
    out = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS).choices[0]
    assert out.message.content == engine.reply and not out.message.tool_calls and out.finish_reason == "stop"
    stream = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, stream=True)
    assert reassemble(stream) == (None, engine.reply, [], "stop")


def test_tool_choice_none_never_returns_calls(hermes):
    engine, client, _ = hermes
    engine.reply = TWO_CALLS
    out = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, tool_choice="none").choices[0]
    assert out.message.content == TWO_CALLS and not out.message.tool_calls and out.finish_reason == "stop"
    assert "get_weather" not in engine.received[-1].prompt  # the model is not offered tools it may not call
    stream = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, tool_choice="none",
                                            stream=True)
    assert reassemble(stream) == (None, TWO_CALLS, [], "stop")


def test_required_is_constrained_to_the_calls_schema(hermes):
    engine, client, _ = hermes
    engine.reply = '[{"name": "local_time", "arguments": {"city": "Paris"}}]'
    for parallel in (None, False):
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        out = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, tool_choice="required",
                                             **extra).choices[0]
        constraint = engine.received[-1].params.structured_outputs
        functions = [tool["function"] for tool in TOOLS]
        assert constraint.json == required_calls_schema(functions, parallel is None)
        assert calls_of(out.message) == [("local_time", {"city": "Paris"})] and out.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(engine.reply), constraint.json)


def test_named_function_streams_its_arguments(hermes):
    engine, client, _ = hermes
    engine.reply = '{"city": "Paris", "unit": "fahrenheit"}'
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, tool_choice=named).choices[0]
    assert engine.received[-1].params.structured_outputs.json == WEATHER["function"]["parameters"]
    assert calls_of(out.message) == [("get_weather", {"city": "Paris", "unit": "fahrenheit"})]
    assert out.message.content is None and out.finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, tool_choice=named,
                                                 stream=True))
    assert reassemble(chunks) == (None, None, calls_of(out.message), "tool_calls")
    pieces = [p for c in chunks for ch in c.choices for p in ch.delta.tool_calls or []]
    assert len(pieces) > 3, "the arguments stream as the model writes them"


def test_reasoning_with_tool_calls(serve):
    engine, client, _ = serve(reasoning_parser="qwen3", tool_call_parser="hermes", enable_auto_tool_choice=True)
    engine.reply = "<think>\nTwo lookups: weather and time.\n</think>\n\n" + TWO_CALLS
    out = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS).choices[0]
    message = out.message
    assert message.reasoning_content == "Two lookups: weather and time."
    assert message.content == "I will look both up." and len(message.tool_calls) == 2
    stream = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, stream=True)
    assert reassemble(stream) == (message.reasoning_content, message.content, calls_of(message), "tool_calls")
    # A named call's arguments are what follows the thinking (where the constraint applies).
    engine.reply = '<think>\nParis, in celsius.\n</think>\n\n{"city": "Paris", "unit": "celsius"}'
    named = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, tool_choice=NAMED).choices[0]
    assert named.message.reasoning_content == "Paris, in celsius." and named.message.content is None
    assert calls_of(named.message) == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    engine.reply = "<think>\nJust greet.\n</think>\n\nHello!"
    plain = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}])
    assert (plain.choices[0].message.reasoning_content, plain.choices[0].message.content) == ("Just greet.", "Hello!")
    stream = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}], stream=True)
    assert reassemble(stream) == ("Just greet.", "Hello!", [], "stop")


def test_deepseek_r1_thinking_without_start_marker(serve):
    engine, client, _ = serve(reasoning_parser="deepseek_r1")
    engine.reply = "The capital is Paris.\n</think>\n\nParis."
    message = client.chat.completions.create(model="scripted", messages=ASK).choices[0].message
    assert (message.reasoning_content, message.content, message.tool_calls) == ("The capital is Paris.", "Paris.", [])


def test_mistral_keeps_its_call_tag(serve):
    engine, client, _ = serve(tool_call_parser="mistral", enable_auto_tool_choice=True)
    engine.reply = '[TOOL_CALLS][{"name": "local_time", "arguments": {"city": "Paris"}}]'
    out = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS).choices[0]
    assert engine.received[-1].params.skip_special_tokens is False  # [TOOL_CALLS] is a special token
    assert calls_of(out.message) == [("local_time", {"city": "Paris"})]


def test_multi_turn_tool_loop(hermes):
    """What an agent (LangChain's tool loop) does: call, run the tool, send its result, get the answer."""
    engine, client, _ = hermes

    def model(prompt):
        if "<tool_response>" in prompt:
            return "It is 18 degrees and sunny in Paris."
        return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

    engine.reply = model
    messages = [{"role": "system", "content": "You answer with tools."}, *ASK]
    for _ in range(3):
        reply = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS).choices[0]
        if not reply.message.tool_calls:
            break
        messages.append(reply.message)  # the message object as returned, as OpenAI's guide does
        for call in reply.message.tool_calls:
            assert json.loads(call.function.arguments) == {"city": "Paris"}
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"})
    assert reply.finish_reason == "stop" and reply.message.content == "It is 18 degrees and sunny in Paris."
    prompt = engine.received[-1].prompt
    # The second turn's prompt holds the call (in the parser's format) and the result.
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt


def test_tokenize_renders_the_tools(hermes):
    _, _, http = hermes
    bare = http.post("/tokenize", json={"messages": ASK}).json()["count"]
    with_tools = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS}).json()["count"]
    assert with_tools > bare + 50


NAMED = {"type": "function", "function": {"name": "get_weather"}}
BAD = {
    "tools not a list": ({"tools": WEATHER}, "tools"),
    "tool without function": ({"tools": [{"type": "function"}]}, "tools.0.function"),
    "tool of another type": ({"tools": [{"type": "retrieval", "function": WEATHER["function"]}]}, "tools.0.type"),
    "function name with a space": ({"tools": [{"type": "function", "function": {"name": "get weather"}}]},
                                   "tools.0.function.name"),
    "parameters not an object": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
                                 "tools.0.function.parameters"),
    "the same name twice": ({"tools": [WEATHER, WEATHER]}, "tools"),
    "unknown tool_choice": ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    "named function not among the tools": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {
        "name": "get_news"}}}, "tool_choice"),
    "required without tools": ({"tool_choice": "required"}, "tool_choice"),
    "named without tools": ({"tool_choice": NAMED}, "tool_choice"),
    "tool_calls on a user message": ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
    "legacy functions": ({"functions": [WEATHER["function"]]}, "functions"),
    # Refused before a stream starts, not as an error event after its first chunk.
    "invalid parameters schema, required, streamed": ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": 5}}}], "tool_choice": "required", "stream": True}, "tools"),
    "invalid parameters schema, named": ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": 5}}}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
        "tools"),
}


@pytest.mark.parametrize("body, param", BAD.values(), ids=BAD.keys())
def test_bad_tool_requests_are_400(hermes, body, param):
    _, _, http = hermes
    assert_error(http.post("/v1/chat/completions", json={"messages": ASK, **body}), 400, param)


def test_auto_needs_the_server_flags(serve):
    engine, client, http = serve(tool_call_parser="hermes")
    for body in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}):
        error = assert_error(http.post("/v1/chat/completions", json={"messages": ASK, **body}), 400, "tool_choice")
        assert "--enable-auto-tool-choice" in error["message"]
    engine.reply = '{"city": "Paris"}'
    out = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, tool_choice=NAMED)
    assert calls_of(out.choices[0].message) == [("get_weather", {"city": "Paris"})]
