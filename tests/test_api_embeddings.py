"""POST /v1/embeddings on a real ``runtime serve --runner pooling``: the openai client's
``embeddings.create`` against HF transformers' pooled hidden states, token-id inputs, usage and
metrics, and bad inputs answered 400 (fuzzed from the OpenAPI schema too) while the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest
import schemathesis
import torch
import transformers
from hypothesis import HealthCheck, given, settings

from api_server import TINY_ARGS, ServerProcess
from hf_reference import hf_embeddings
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("api")
TEXTS = ["The capital of France is", "def add(a, b):", "x"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("embed"), "qwen2", is_matryoshka=True)


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(str(checkpoint), *TINY_ARGS, "--runner", "pooling") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def reference(checkpoint):
    """HF's last-token, normalized vectors of TEXTS, tokenized as the server does, and the token ids."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = [tokenizer.encode(text) for text in TEXTS]
    return ids, model


def assert_close(vector, ref):
    got = torch.tensor(vector, dtype=torch.float64)
    assert float(got @ ref / (got.norm() * ref.norm())) > 0.9999
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_openai_client_base64_and_float(client, reference):
    ids, model = reference
    expected = hf_embeddings(model, ids, "LAST", normalize=True)
    encoded = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    for out in (encoded, floats):
        assert [d.index for d in out.data] == [0, 1, 2] and out.model == "tiny"
        for data, ref in zip(out.data, expected):
            assert_close(data.embedding, ref)
        assert out.usage.prompt_tokens == out.usage.total_tokens == sum(len(i) for i in ids)


def test_token_ids_dimensions_and_metrics(client, server, reference):
    ids, model = reference
    before = _prompt_tokens(server)
    out = client.embeddings.create(model="tiny", input=ids, dimensions=8, encoding_format="float")
    for data, ref in zip(out.data, hf_embeddings(model, ids, "LAST", normalize=True, dimensions=8)):
        assert_close(data.embedding, ref)
    single = client.embeddings.create(model="tiny", input=ids[0], encoding_format="float").data
    assert len(single) == 1 and len(single[0].embedding) == 64
    assert _prompt_tokens(server) - before == sum(len(i) for i in ids) + len(ids[0])


def _prompt_tokens(server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("runtime:prompt_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("body, param, words", [
    ({"input": ""}, "input", "empty string"),
    ({"input": []}, "input", "must not be empty"),
    ({"input": [[5] * 257]}, "input", "maximum context length is 256"),
    ({"input": [[10**6]]}, "input", "outside the vocabulary"),
    ({"input": "x", "dimensions": 65}, "dimensions", "between 1 and the model's 64"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float"),
    ({"input": "x", "colour": 1}, "colour", "Extra inputs are not permitted"),
])
def test_bad_inputs_get_400(server, body, param, words):
    response = httpx.post(f"{server.base_url}/embeddings", json={"model": "tiny", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_generation_routes_refused_and_server_keeps_serving(client, server):
    for path, body in (("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
                       ("completions", {"prompt": "hi"})):
        response = httpx.post(f"{server.base_url}/{path}", json={"model": "tiny", **body})
        assert response.status_code == 400 and "--task embed" in response.json()["error"]["message"]
    assert len(client.embeddings.create(model="tiny", input="still here").data[0].embedding) == 64


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzing_finds_no_server_error(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    strategy = schema["/v1/embeddings"]["POST"].as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=20, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=server.url, timeout=60)
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

    check()
