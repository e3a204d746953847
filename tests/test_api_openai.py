"""The official openai client, sync and async, against a real ``runtime serve`` over a socket."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from api_server import TINY_ARGS, ServerProcess
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("api")

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to five."}]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")
    with ServerProcess(str(path), *TINY_ARGS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture
async def aclient(server):
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        yield client


def greedy_completion(client, prompt, **kw):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, **kw)


def test_models_version_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].max_model_len == 256
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completion_text_usage_and_length(client, server):
    out = greedy_completion(client, "The capital of France is")
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == "tiny"
    assert choice.finish_reason == "length"
    count = httpx.post(f"{server.url}/tokenize", json={"prompt": "The capital of France is"}).json()["count"]
    assert out.usage.prompt_tokens == count
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == count + 12
    assert greedy_completion(client, "The capital of France is").choices[0].text == choice.text


def test_prompt_forms_agree(client, server):
    """A string, its token ids, and a list holding both give the same greedy text."""
    text = "Hello! How are you"
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["tokens"]
    by_text = greedy_completion(client, text).choices[0].text
    assert greedy_completion(client, ids).choices[0].text == by_text
    for batch in ([text, "Hello"], [ids, ids[:-1]]):
        both = greedy_completion(client, batch)
        assert [c.index for c in both.choices] == [0, 1]
        assert both.choices[0].text == by_text
        assert both.choices[1].text == greedy_completion(client, batch[1]).choices[0].text
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"].endswith(text)


def test_echo_and_logprobs(client):
    plain = greedy_completion(client, "Once upon a time", logprobs=2)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        # The chosen token and the top 2; fewer keys where tokens decode alike (pieces of a character).
        assert value <= 0 and 1 <= len(top) <= 3
        assert value == pytest.approx(max(top.values()))  # greedy: the chosen token is the likeliest
    echoed = greedy_completion(client, "Once upon a time", logprobs=2, echo=True)
    choice = echoed.choices[0]
    assert choice.text == "Once upon a time" + plain.choices[0].text
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[-12:] == pytest.approx(lp.token_logprobs)
    assert "".join(choice.logprobs.tokens).endswith(plain.choices[0].text)


def test_stop_string_ends_the_text(client):
    full = greedy_completion(client, "A quick brown fox").choices[0].text
    stop = full[4:6]
    out = greedy_completion(client, "A quick brown fox", stop=[stop]).choices[0]
    assert out.text == full[:full.index(stop)]
    assert out.finish_reason == "stop"


def test_chat_with_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                                         top_logprobs=3)
    choice = out.choices[0]
    assert out.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    content = choice.logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == choice.message.content


def test_continue_final_message(client):
    messages = CHAT + [{"role": "assistant", "content": "One, two"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                         extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert out.usage.completion_tokens == 5


def test_chat_streaming_matches_non_streaming(client):
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completion_streaming_n2(client):
    kw = dict(model="tiny", prompt="Large language models", max_tokens=8, temperature=1.0, seed=7, n=2)
    whole = client.completions.create(**kw)
    texts = {0: "", 1: ""}
    finish = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert finish == {0: "length", 1: "length"}
    assert usage.completion_tokens == 16


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.95)
    first = client.completions.create(seed=1234, n=2, **kw)
    second = client.completions.create(seed=1234, n=2, **kw)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text  # the samples of one request differ
    other = client.completions.create(seed=99, **kw)
    assert other.choices[0].text != first.choices[0].text


def test_vllm_extra_sampling_fields(client):
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0.8, seed=3, extra_body={
        "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True, "min_tokens": 6,
        "stop_token_ids": [2], "skip_special_tokens": False})
    assert out.usage.completion_tokens == 6
    assert out.choices[0].finish_reason == "length"


@pytest.mark.anyio
async def test_async_client_chat_and_completion(aclient):
    chat = await aclient.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0)
    assert chat.usage.completion_tokens <= 6
    stream = await aclient.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, stream=True)
    text = "".join([c.choices[0].text async for c in stream])
    whole = await aclient.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    assert text == whole.choices[0].text


PROMPTS = [f"Request {i}: the quick brown fox number {i * 7} jumps" for i in range(32)]


@pytest.mark.anyio
async def test_32_concurrent_streams_match_greedy_alone(aclient, client):
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0).choices[0].text
             for p in PROMPTS]

    async def stream(prompt):
        chunks = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                  stream=True)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    together = await asyncio.gather(*(stream(p) for p in PROMPTS))
    assert together == alone


def sse_payloads(server, path, body):
    with httpx.stream("POST", f"{server.base_url}{path}", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [line.removeprefix("data: ") for line in lines[:-1]]


def test_streamed_chunks_have_the_documented_shape(server):
    """Every chunk, with every optional part present, validates against the schema's chunk models."""
    from runtime.api.protocol import ChatCompletionChunk, CompletionChunk

    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = sse_payloads(server, "/completions", {"prompt": "Hello", "max_tokens": 5, "logprobs": 2, "echo": True,
                                                   "n": 2, "stream": True, "stream_options": options})
    parsed = [CompletionChunk.model_validate_json(c) for c in chunks]
    assert parsed[0].choices[0].logprobs.tokens and parsed[-1].usage.completion_tokens == 10
    assert all(p.usage is not None for p in parsed)
    chunks = sse_payloads(server, "/chat/completions", {"messages": CHAT, "max_tokens": 5, "logprobs": True,
                                                        "top_logprobs": 2, "stream": True, "stream_options": options})
    parsed = [ChatCompletionChunk.model_validate_json(c) for c in chunks]
    assert parsed[1].choices[0].logprobs.content[0].top_logprobs
    assert parsed[-1].usage.completion_tokens == 5
