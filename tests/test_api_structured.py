"""Structured output over HTTP: OpenAI's response_format (through the official client's
``parse``), vLLM's structured_outputs and guided_* fields, streaming, and 400s for bad input."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from api_server import assert_error
from test_api_openai import client, server  # noqa: F401  (module-scoped: a server of the tiny Llama, its client)

pytestmark = pytest.mark.xdist_group("api")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Give me the answer."}]
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "count"]}


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    sure: bool


_WHITESPACE_BIAS: dict[str, dict[str, int]] = {}


def whitespace_bias(server) -> dict[str, int]:
    """logit_bias that rules out the whitespace tokens: JSON allows whitespace between tokens,
    which a random-weight model picks again and again (the client may bias it away)."""
    if server.url not in _WHITESPACE_BIAS:
        ids = [httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
               for text in (" ", "\n", "\t", "\r", "  ")]
        _WHITESPACE_BIAS[server.url] = {str(token[0]): -100 for token in ids if len(token) == 1}
    return _WHITESPACE_BIAS[server.url]


def post(server, path: str, **body) -> dict:
    body = {"max_tokens": 48, "temperature": 0, "logit_bias": whitespace_bias(server), **body}
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def chat_text(server, **body) -> str:
    return post(server, CHAT, messages=USER, **body)["choices"][0]["message"]["content"]


def test_openai_client_parse_returns_the_pydantic_object(client, server):
    completion = client.chat.completions.parse(model="tiny", messages=USER, response_format=Verdict, max_tokens=48,
                                               temperature=0, logit_bias=whitespace_bias(server))
    message = completion.choices[0].message
    assert isinstance(message.parsed, Verdict)
    assert Verdict.model_validate_json(message.content) == message.parsed


def test_response_format_json_schema_and_json_object(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
    jsonschema.validate(json.loads(chat_text(server, response_format=fmt)), SCHEMA)
    assert isinstance(json.loads(chat_text(server, response_format={"type": "json_object"}, temperature=0.7, seed=3)),
                      dict)
    assert isinstance(chat_text(server, response_format={"type": "text"}), str)


def test_structured_outputs_and_guided_fields_on_both_endpoints(server):
    regex = r"[a-z]{3}@[0-9]{2}"
    choices = ["red", "green", "blue"]
    for field in ({"structured_outputs": {"regex": regex}}, {"guided_regex": regex}):
        assert re.fullmatch(regex, chat_text(server, **field))
        assert re.fullmatch(regex, post(server, COMPLETIONS, prompt="x", **field)["choices"][0]["text"])
    for field in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        assert post(server, COMPLETIONS, prompt="Pick:", **field)["choices"][0]["text"] in choices
    for field in ({"structured_outputs": {"json": SCHEMA}}, {"guided_json": SCHEMA},
                  {"structured_outputs": {"json": json.dumps(SCHEMA), "disable_any_whitespace": True}}):
        jsonschema.validate(json.loads(chat_text(server, **field)), SCHEMA)
    grammar = 'root ::= "(" [1-9] ("+" [1-9])* ")"'
    for field in ({"structured_outputs": {"grammar": grammar}}, {"guided_grammar": grammar}):
        text = chat_text(server, **field)
        assert re.fullmatch(r"\([1-9](\+[1-9])*\)", text) and eval(text) >= 1  # noqa: S307 (digits and + only)


def test_structural_tag_wraps_the_schema_in_its_tags(server):
    """What a required tool call sends: the whole output one tag around JSON for the schema."""
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<f>", "content": {
        "type": "json_schema", "json_schema": SCHEMA}, "end": "</f>"}}
    for field in ({"structured_outputs": {"structural_tag": tag}}, {"structured_outputs": {"structural_tag": json.dumps(tag)}},
                  {"response_format": {"type": "structural_tag", "format": tag["format"]}}):
        text = post(server, COMPLETIONS, prompt="call", max_tokens=60, temperature=1.0, seed=0, **field)["choices"][0]["text"]
        match = re.fullmatch(r"<f>(.*)</f>", text, flags=re.S)
        assert match, text
        jsonschema.validate(json.loads(match.group(1)), SCHEMA)


def test_streamed_constrained_output_reassembles_to_valid_json(client, server):
    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=48, temperature=0, stream=True,
                                            logit_bias=whitespace_bias(server),
                                            extra_body={"structured_outputs": {"json": SCHEMA}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


BAD = {
    "invalid regex": ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex"),
    "invalid guided regex": ({"guided_regex": "(ab"}, "guided_regex", "regex"),
    "invalid grammar": ({"guided_grammar": "root ::= missing"}, "guided_grammar", "missing"),
    "empty schema range": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}}}, "response_format", "minimum"),
    "unknown schema type": ({"guided_json": {"type": "objectx"}}, "guided_json", "objectx"),
    "schema not JSON": ({"structured_outputs": {"json": "{oops"}}, "structured_outputs", "JSON"),
    "two constraints": ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one structured output"),
    "two kinds at once": ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    "empty choice": ({"guided_choice": []}, "guided_choice", "non-empty"),
    "json_schema without schema": ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    "unknown format type": ({"response_format": {"type": "xml"}}, "response_format.type", None),
}


@pytest.mark.parametrize("case", BAD)
def test_invalid_constraints_are_400s_naming_the_problem(server, case):
    fields, param, words = BAD[case]
    for path, body in ((CHAT, {"messages": USER}), (COMPLETIONS, {"prompt": "a"})):
        response = httpx.post(server.url + path, json={**body, **fields}, timeout=30)
        assert_error(response, 400, param)
        if words:
            assert words in response.json()["error"]["message"]
    assert chat_text(server, guided_choice=["ok"]) == "ok"  # the engine lives on
