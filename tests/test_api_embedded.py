"""``runtime serve`` with no MODEL serves the embedded SmolLM2, and it knows its capitals."""

from __future__ import annotations

import openai
import pytest

from api_server import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("api")]


def test_default_model_answers_paris():
    # float32: the platform's default (bfloat16 on CPUs that have it) currently answers off-topic
    # offline too (tests/test_embedded_model.py::test_chat_answer_is_coherent); this tests serving.
    with ServerProcess("--kv-cache-memory", "256MiB", "--max-model-len", "1024", "--dtype", "float32") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        out = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=32, temperature=0,
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop"
