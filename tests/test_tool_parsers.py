"""Tool-call and reasoning parsers against hand-written model outputs, whole and streamed.

Every case is parsed whole, then fed token by token (the tiny byte-level tokenizer's pieces) and
in random cuts: the streamed parts must join to the whole parse. Calls are compared as parsed
JSON, the arguments against the values written in the case.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from runtime.reasoning import ReasoningParser
from runtime.tools import (TOOL_CALL_PARSERS, JsonArrayScanner, MessageDelta, MessageStream, NamedCallStream,
                           ParsedCallStream, prompt_messages, required_calls_schema, tool_choice_constraint)
from scripted_engine import token_pieces
from tiny_models import CHAT_TEMPLATE, make_tiny_tokenizer

WEATHER = {"city": "Paris", "unit": "celsius"}
NESTED = {"query": "a \"quoted\" } brace", "filters": {"tags": ["x", "y"], "limit": 3}, "exact": True}

# parser -> (id, model output, expected content, expected calls as (name, arguments object))
CASES = {
    "hermes": [
        ("single", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
         '\n</tool_call>', None, [("get_weather", WEATHER)]),
        ("parallel with text", 'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": '
         '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "search", "arguments": '
         + json.dumps(NESTED) + '}\n</tool_call>', "Let me check both.",
         [("get_weather", WEATHER), ("search", NESTED)]),
        ("arguments as JSON text", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None,
         [("f", {"a": 1})]),
        ("unclosed but complete at the end", '<tool_call>\n{"name": "f", "arguments": {}}', None, [("f", {})]),
        ("malformed JSON stays content", 'Sure. <tool_call>{"name": "f", "arguments": {"a": }</tool_call> Done.',
         'Sure. <tool_call>{"name": "f", "arguments": {"a": }</tool_call> Done.', []),
        ("object without a name stays content", '<tool_call>{"arguments": {}}</tool_call>',
         '<tool_call>{"arguments": {}}</tool_call>', []),
        ("cut off inside a call", 'Checking.\n<tool_call>\n{"name": "get_weather", "argu',
         'Checking.\n<tool_call>\n{"name": "get_weather", "argu', []),
        ("half a tag at the end", "The tag is <tool_ca", "The tag is <tool_ca", []),
        ("plain text", "  Paris is the capital of France.\n", "Paris is the capital of France.", []),
    ],
    "llama3_json": [
        ("single", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
         [("get_weather", WEATHER)]),
        ("parallel", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
         '{"name": "search", "parameters": ' + json.dumps(NESTED) + '}', None,
         [("get_weather", WEATHER), ("search", NESTED)]),
        ("plain text", "The weather is fine.", "The weather is fine.", []),
        ("a JSON object that is not a call", '{"city": "Paris"}', '{"city": "Paris"}', []),
        ("text after a call", '{"name": "f", "parameters": {}} then more', "then more", [("f", {})]),
        ("cut off", '{"name": "f", "parameters": {"a": ', '{"name": "f", "parameters": {"a":', []),
    ],
    "mistral": [
        ("list", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', None,
         [("get_weather", WEATHER)]),
        ("parallel list after text", 'On it. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", '
         '"unit": "celsius"}}, {"name": "search", "arguments": ' + json.dumps(NESTED) + '}]', "On it.",
         [("get_weather", WEATHER), ("search", NESTED)]),
        ("v11 form, parallel", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
         '[TOOL_CALLS]search[ARGS]' + json.dumps(NESTED), None, [("get_weather", WEATHER), ("search", NESTED)]),
        ("malformed after the tag", "[TOOL_CALLS] I cannot call that.", "[TOOL_CALLS] I cannot call that.", []),
        ("second call malformed", '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"nome": 1}]',
         '{"nome": 1}]', [("f", {})]),
        ("cut off", '[TOOL_CALLS][{"name": "f", "arguments": {"a"', '[TOOL_CALLS][{"name": "f", "arguments": {"a"', []),
        ("plain text", "No tools needed.", "No tools needed.", []),
    ],
    "required": [
        ("list", '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
         '{"name": "search", "arguments": ' + json.dumps(NESTED) + '}]', None,
         [("get_weather", WEATHER), ("search", NESTED)]),
        ("compact", '[{"name":"f","arguments":{}}]', None, [("f", {})]),
        ("not a list", "Paris", "Paris", []),
    ],
}
SCANNERS = {**TOOL_CALL_PARSERS, "required": JsonArrayScanner}
ALL = [pytest.param(parser, text, content, calls, id=f"{parser}-{name}")
       for parser, cases in CASES.items() for name, text, content, calls in cases]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def pieces(tokenizer, text):
    return [piece for _, piece in token_pieces(tokenizer, text)]


def random_cuts(text, seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def streamed(make_stream, chunks):
    """(reasoning, content, calls) from feeding ``chunks`` one by one; calls rebuilt from the deltas."""
    stream = make_stream()
    total = MessageDelta()
    for chunk in chunks:
        total.add(stream.feed(chunk))
    total.add(stream.finish())
    calls = {}
    for delta in total.tool_calls:
        if delta.id is not None:
            assert delta.index not in calls and delta.index == len(calls), "a call's first delta comes once, in order"
            calls[delta.index] = [delta.id, delta.name, delta.arguments]
        else:
            calls[delta.index][2] += delta.arguments
    return total.reasoning or None, total.content or None, [tuple(call) for call in calls.values()]


def whole(make_stream, text):
    parts = make_stream().message(text)
    return parts.reasoning, parts.content, [(c.id, c.name, c.arguments) for c in parts.tool_calls]


def without_ids(result):
    reasoning, content, calls = result
    return reasoning, content, [(name, arguments) for _, name, arguments in calls]


@pytest.mark.parametrize("parser, text, content, calls", ALL)
def test_parser_whole_and_streamed(tokenizer, parser, text, content, calls):
    def make():
        return MessageStream(tools=ParsedCallStream(SCANNERS[parser]()))

    reasoning, got_content, got_calls = whole(make, text)
    assert reasoning is None and got_content == content
    assert [(name, json.loads(arguments)) for _, name, arguments in got_calls] == calls
    assert all(call_id.startswith("call_") for call_id, _, _ in got_calls)
    assert len({call_id for call_id, _, _ in got_calls}) == len(got_calls)
    expected = without_ids((None, content, got_calls))
    assert without_ids(streamed(make, pieces(tokenizer, text))) == expected
    for seed in range(20):
        assert without_ids(streamed(make, random_cuts(text, seed))) == expected
    assert without_ids(streamed(make, list(text))) == expected


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = CASES["hermes"][1][1]
    parts = MessageStream(tools=ParsedCallStream(TOOL_CALL_PARSERS["hermes"](), parallel=False)).message(text)
    assert [c.name for c in parts.tool_calls] == ["get_weather"] and parts.content == "Let me check both."


def test_named_call_streams_its_arguments():
    text = ' {"city": "Paris", "unit": "celsius"}\n'
    stream = NamedCallStream("get_weather")
    deltas = [d for chunk in random_cuts(text, 3) for d in stream.feed(chunk).tool_calls] + stream.finish().tool_calls
    assert (deltas[0].id, deltas[0].name, deltas[0].arguments) == (stream.call.id, "get_weather", "")
    fragments = [d.arguments for d in deltas[1:]]
    assert len(fragments) > 1 and all(d.id is None for d in deltas[1:])
    assert json.loads("".join(fragments)) == WEATHER
    parts = MessageStream(tools=NamedCallStream("get_weather")).message(text)
    assert parts.content is None
    assert [(c.name, c.arguments) for c in parts.tool_calls] == [("get_weather", text.strip())]


REASONING = {
    "deepseek_r1": [
        ("closed", "Let me think.\nParis is in France.\n</think>\n\nParis.", "Let me think.\nParis is in France.",
         "Paris."),
        ("with the start marker", "<think>\nhmm\n</think>The answer.", "hmm", "The answer."),
        ("out of tokens while thinking", "Still thinking about it", "Still thinking about it", None),
        ("half an end marker", "thinking </thi", "thinking </thi", None),
    ],
    "qwen3": [
        ("closed", "<think>\nThe user greets me.\n</think>\n\nHello!", "The user greets me.", "Hello!"),
        ("thinking off", "Hello! How can I help?", None, "Hello! How can I help?"),
        ("empty thinking", "<think>\n\n</think>\n\nHi.", None, "Hi."),
        ("out of tokens while thinking", "<think>\nLong thought", "Long thought", None),
        ("a think tag later is content", "Use <think> tags.", None, "Use <think> tags."),
    ],
}


@pytest.mark.parametrize("name, text, reasoning, content",
                         [pytest.param(p, t, r, c, id=f"{p}-{i}") for p, cases in REASONING.items()
                          for i, t, r, c in cases])
def test_reasoning_parser_whole_and_streamed(tokenizer, name, text, reasoning, content):
    parser = ReasoningParser(name)
    assert parser.split(text) == (reasoning, content)

    def make():
        return MessageStream(reasoning=parser)

    assert streamed(make, pieces(tokenizer, text)) == (reasoning, content, [])
    for seed in range(20):
        assert streamed(make, random_cuts(text, seed)) == (reasoning, content, [])


def test_reasoning_then_tool_calls(tokenizer):
    """Calls are read from the answer only: a tag inside the thinking is thinking."""
    text = ('<think>\nI could write <tool_call> here, but I will call it properly.\n</think>\n\n'
            + CASES["hermes"][1][1])

    def make():
        return MessageStream(ReasoningParser("qwen3"), ParsedCallStream(TOOL_CALL_PARSERS["hermes"]()))

    reasoning, content, calls = without_ids(whole(make, text))
    assert reasoning == "I could write <tool_call> here, but I will call it properly."
    assert content == "Let me check both."
    assert [(name, json.loads(args)) for name, args in calls] == [("get_weather", WEATHER), ("search", NESTED)]
    assert without_ids(streamed(make, pieces(tokenizer, text))) == (reasoning, content, calls)


FUNCTIONS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}},
    {"name": "now"},
]


def test_required_schema_accepts_calls_and_only_calls():
    for parallel in (True, False):
        schema = required_calls_schema(FUNCTIONS, parallel)
        jsonschema.Draft202012Validator.check_schema(schema)
        valid = jsonschema.Draft202012Validator(schema)
        assert valid.is_valid([{"name": "get_weather", "arguments": {"city": "Paris"}}])
        assert valid.is_valid([{"name": "now", "arguments": {}}])
        assert valid.is_valid([{"name": "now", "arguments": {}}, {"name": "now", "arguments": {}}]) == parallel
        for wrong in ([], [{"name": "get_weather", "arguments": {"unit": "celsius"}}],
                      [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}],
                      [{"name": "other", "arguments": {}}], [{"name": "now"}], {"name": "now", "arguments": {}}):
            assert not valid.is_valid(wrong), wrong
    assert tool_choice_constraint(FUNCTIONS, "get_weather", True).json == FUNCTIONS[0]["parameters"]
    assert tool_choice_constraint(FUNCTIONS, "now", True).json == {"type": "object", "properties": {}}
    assert tool_choice_constraint(FUNCTIONS, None, False).json == required_calls_schema(FUNCTIONS, False)


TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]


@pytest.mark.parametrize("parser", sorted(TOOL_CALL_PARSERS))
def test_template_without_tools_gets_them_as_text_the_parser_reads(parser):
    messages, tools = prompt_messages(CONVERSATION, TOOLS, CHAT_TEMPLATE, parser)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n")
    assert all(json.dumps(tool) in messages[0]["content"] for tool in TOOLS)
    assert messages[3]["content"] == ("<tool_response>\n18 C, sunny\n</tool_response>\n"
                                      "<tool_response>\n12:00\n</tool_response>")
    # The assistant's calls are written so that the server's parser reads them back.
    parts = MessageStream(tools=ParsedCallStream(TOOL_CALL_PARSERS[parser]())).message(messages[2]["content"])
    assert parts.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parts.tool_calls] == [("get_weather", {"city": "Paris"}),
                                                                           ("now", {})]


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.id }}:{{ c.function.name }}:{{ c.function.arguments | tojson }}]"
    "{% endfor %}"
    "{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
)


def test_template_with_tools_gets_them_as_transformers_passes_them(tokenizer):
    messages, tools = prompt_messages(CONVERSATION, TOOLS, TOOL_TEMPLATE, "hermes")
    assert tools == TOOLS and [m["role"] for m in messages] == [m["role"] for m in CONVERSATION]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    text = tokenizer.apply_chat_template(messages, chat_template=TOOL_TEMPLATE, tools=tools, tokenize=False)
    assert "get_weather;now;" in text and '[call_1:get_weather:{"city": "Paris"}]' in text and "(call_2)" in text
    # Mistral's templates take only 9-character ids: each id maps to one such id, in calls and results alike.
    messages, _ = prompt_messages(CONVERSATION, TOOLS, TOOL_TEMPLATE, "mistral")
    ids = [c["id"] for c in messages[2]["tool_calls"]]
    assert all(len(i) == 9 and i.isalnum() for i in ids) and ids == [messages[3]["tool_call_id"],
                                                                     messages[4]["tool_call_id"]]
