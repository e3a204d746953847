"""Bad input gets the right status and OpenAI's error shape; fuzzing the OpenAPI schema finds no 5xx."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from runtime.api.limits import (MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, MAX_STOP_CHARS,
                                MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS)

from api_server import TINY_ARGS, ServerProcess, assert_error
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("api")

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")
    with ServerProcess(str(path), *TINY_ARGS, "--max-request-body-bytes", str(BODY_LIMIT)) as srv:
        yield srv


# (path, JSON body, status, param the error must name)
BAD_REQUESTS = {
    "prompt of the wrong type": (COMPLETIONS, {"prompt": 3}, 400, "prompt"),
    "max_tokens a string": (COMPLETIONS, {"prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    "negative max_tokens": (COMPLETIONS, {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    "zero max_tokens": (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    "temperature above 2": (COMPLETIONS, {"prompt": "a", "temperature": 3}, 400, "temperature"),
    "negative temperature": (CHAT, {"messages": USER, "temperature": -0.5}, 400, "temperature"),
    "top_p zero": (CHAT, {"messages": USER, "top_p": 0}, 400, "top_p"),
    "empty messages": (CHAT, {"messages": []}, 400, "messages"),
    "messages not a list": (CHAT, {"messages": "hi"}, 400, "messages"),
    "unknown role": (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    "message without role": (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    "image content": (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                      400, None),
    "huge n": (COMPLETIONS, {"prompt": "a", "n": 100000}, 400, "n"),
    "zero n": (CHAT, {"messages": USER, "n": 0}, 400, "n"),
    "unknown field": (COMPLETIONS, {"prompt": "a", "max_tokenz": 3}, 400, "max_tokenz"),
    "tool without a function": (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    "json_schema output": (CHAT, {"messages": USER, "response_format": {"type": "json_schema"}}, 400,
                           "response_format"),
    "suffix": (COMPLETIONS, {"prompt": "a", "suffix": "b"}, 400, "suffix"),
    "best_of above n": (COMPLETIONS, {"prompt": "a", "best_of": 3}, 400, "best_of"),
    "top_logprobs without logprobs": (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    "too many logprobs": (COMPLETIONS, {"prompt": "a", "logprobs": 50}, 400, "logprobs"),
    "stream_options without stream": (COMPLETIONS, {"prompt": "a", "stream_options": {"include_usage": True}}, 400,
                                      "stream_options"),
    "empty stop string": (COMPLETIONS, {"prompt": "a", "stop": [""]}, 400, "stop"),
    "empty stop string, not in a list": (CHAT, {"messages": USER, "stop": ""}, 400, "stop"),
    "priority under first come, first served": (CHAT, {"messages": USER, "priority": 3}, 400, "priority"),
    "logit_bias key of 5000 digits": (COMPLETIONS, {"prompt": "a", "logit_bias": {"1" * 5000: 1}}, 400, "logit_bias"),
    "stop token id outside the vocabulary": (CHAT, {"messages": USER, "stop_token_ids": [10 ** 6]}, 400,
                                             "stop_token_ids"),
    "min_tokens above max_tokens": (COMPLETIONS, {"prompt": "a", "max_tokens": 2, "min_tokens": 5}, 400,
                                    "min_tokens"),
    "logit_bias key not a token": (COMPLETIONS, {"prompt": "a", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    "token id outside the vocabulary": (COMPLETIONS, {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    "empty prompt list": (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    "seed too large": (COMPLETIONS, {"prompt": "a", "seed": 2**70}, 400, "seed"),
    "continue and add_generation_prompt": (CHAT, {"messages": USER, "continue_final_message": True}, 400,
                                           "continue_final_message"),
    "body not an object": (COMPLETIONS, [1, 2], 400, None),
    "unknown model": (COMPLETIONS, {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    "tokenize with neither prompt nor messages": ("/tokenize", {}, 400, None),
    "detokenize a bad id": ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
}

# (path, JSON body, param the error must name, the limit its message must give)
OVER_LIMITS = {
    "too many stop strings": (COMPLETIONS, {"prompt": "a", "stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]},
                              "stop", MAX_STOP_STRINGS),
    "a stop string too long": (CHAT, {"messages": USER, "stop": ["x", "y" * (MAX_STOP_CHARS + 1)]}, "stop.1",
                               MAX_STOP_CHARS),
    "one stop string too long": (COMPLETIONS, {"prompt": "a", "stop": "y" * (MAX_STOP_CHARS + 1)}, "stop",
                                 MAX_STOP_CHARS),
    "logit_bias too large": (CHAT, {"messages": USER, "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}},
                             "logit_bias", MAX_LOGIT_BIAS),
    "too many stop token ids": (COMPLETIONS, {"prompt": "a", "stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)},
                                "stop_token_ids", MAX_STOP_TOKEN_IDS),
    "n above the limit": (CHAT, {"messages": USER, "n": MAX_N + 1}, "n", MAX_N),
    "logprobs above the limit": (COMPLETIONS, {"prompt": "a", "logprobs": MAX_LOGPROBS + 1}, "logprobs",
                                 MAX_LOGPROBS),
    "top_logprobs above the limit": (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1},
                                     "top_logprobs", MAX_LOGPROBS),
    "max_tokens beyond the context": (COMPLETIONS, {"prompt": "a", "max_tokens": 10**12}, "max_tokens", 256),
    "max_completion_tokens beyond the context": (CHAT, {"messages": USER, "max_completion_tokens": 10**6},
                                                 "max_tokens", 256),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request(server, case):
    path, body, status, param = BAD_REQUESTS[case]
    assert_error(httpx.post(server.url + path, json=body, timeout=30), status, param)


@pytest.mark.parametrize("case", OVER_LIMITS)
def test_limits_are_400s_naming_the_field_and_the_limit(server, case):
    path, body, param, limit = OVER_LIMITS[case]
    error = assert_error(httpx.post(server.url + path, json=body, timeout=30), 400, param)
    assert str(limit) in error["message"], error
    at_limit = _at_limit(body)
    response = httpx.post(server.url + path, json={**at_limit, "max_tokens": 2}, timeout=60)
    assert response.status_code == 200, (case, response.text)


def _at_limit(body):
    """``body`` with the field over its limit brought back to the limit (it must then be served)."""
    fixed = dict(body)
    for key, value in body.items():
        if key == "stop":
            fixed[key] = [s[:MAX_STOP_CHARS] for s in value][:MAX_STOP_STRINGS] if isinstance(value, list) \
                else value[:MAX_STOP_CHARS]
        elif key == "logit_bias":
            fixed[key] = dict(list(value.items())[:300])  # token ids of the tiny model's 320
        elif key == "stop_token_ids":
            fixed[key] = value[:MAX_STOP_TOKEN_IDS]
        elif key in ("n", "logprobs", "top_logprobs") and not isinstance(value, bool):
            fixed[key] = value - 1
        elif key in ("max_tokens", "max_completion_tokens"):
            del fixed[key]
    return fixed


def test_a_body_over_the_server_limit_is_413_naming_the_flag(server):
    big = {"prompt": "a", "user": "x" * BODY_LIMIT}
    error = assert_error(httpx.post(server.url + COMPLETIONS, json=big, timeout=60), 413)
    assert str(BODY_LIMIT) in error["message"] and "--max-request-body-bytes" in error["message"]
    # Without a Content-Length the server counts what arrives.
    chunked = (b'{"prompt": "a", "user": "' + b"x" * BODY_LIMIT + b'"}' for _ in range(2))
    response = httpx.post(server.url + COMPLETIONS, content=chunked, headers={"content-type": "application/json"},
                          timeout=60)
    assert_error(response, 413)
    assert httpx.post(server.url + COMPLETIONS, json={"prompt": "a", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_invalid_json(server, path):
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past msgspec's nesting limit
    for raw in (b"{not json", b"", b'{"prompt": "a",}', deep):
        response = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"})
        assert_error(response, 400)


def test_prompt_longer_than_the_context(server):
    error = assert_error(httpx.post(server.url + COMPLETIONS, json={"prompt": list(range(6, 306))}), 400, "prompt")
    assert "256" in error["message"] and "300" in error["message"]
    error = assert_error(httpx.post(server.url + COMPLETIONS, json={"prompt": [6] * 200, "max_tokens": 100}), 400,
                         "max_tokens")
    for number in ("256", "300", "200", "100"):
        assert number in error["message"]
    long_chat = [{"role": "user", "content": "fox " * 400}]
    assert_error(httpx.post(server.url + CHAT, json={"messages": long_chat}), 400, "messages")


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + COMPLETIONS), 405)


def test_openapi_schema_describes_the_models(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    post = schema["paths"][CHAT]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    ok = post["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    assert ok["text/event-stream"]["schema"]["$ref"].endswith("/ChatCompletionChunk")
    fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name in ("messages", "temperature", "top_k", "min_p", "repetition_penalty", "stream_options", "logprobs"):
        assert name in fields
    assert {"/v1/models", COMPLETIONS, "/tokenize", "/detokenize", "/health", "/metrics"} <= set(schema["paths"])


# Keep each fuzzed generation short: larger values test nothing the validation tests do not.
_CAPS = {"n": 2, "best_of": 2, "max_tokens": 4, "max_completion_tokens": 4, "min_tokens": 2}


def _cap(body):
    if isinstance(body, dict):
        if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = _CAPS["max_tokens"]  # chat's default is the rest of the context
        for key, cap in _CAPS.items():
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > cap:
                body[key] = cap


FUZZED = [(method, path, mode) for method, path in (("POST", COMPLETIONS), ("POST", CHAT), ("POST", "/tokenize"),
                                                     ("POST", "/detokenize"))
          for mode in ("positive", "negative")] + [("GET", "/v1/models", "positive")]  # nothing to negate there


@pytest.mark.parametrize("method,path,mode", FUZZED)
def test_fuzzing_finds_no_server_error(server, method, path, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operation = schema[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case):
        _cap(case.body)
        response = case.call(base_url=server.url, timeout=60)
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 400:
            body = response.json()
            assert set(body["error"]) == {"message", "type", "param", "code"}, body

    check()


def test_a_client_gone_before_its_answer_is_not_logged_as_a_server_error(caplog):
    from runtime.api.disconnect import ClientDisconnected
    from runtime.api.errors import as_api_error

    with caplog.at_level("INFO", logger="runtime.api"):
        error = as_api_error(ClientDisconnected("the client disconnected"))
    assert error.status == 499 and error.code == "client_disconnected"
    assert [r.levelname for r in caplog.records] == ["INFO"]
