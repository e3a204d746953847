"""Images in chat requests over HTTP: a tiny LLaVA served by ``runtime serve``, answers equal to
HF transformers' for the same rendered prompt, and every bad image refused with a 400 that says
why while the server keeps serving."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest

from api_server import TINY_ARGS, ServerProcess
from vision_models import hf_vision_greedy, make_tiny_llava, random_image

pytestmark = pytest.mark.xdist_group("vision")


def _data_uri(image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def _message(*urls: str, text: str = "What is this?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_vision")
    path = make_tiny_llava(root)
    media = root / "media"
    media.mkdir()
    random_image(5, 36, 36).save(media / "inside.png")
    random_image(6, 36, 36).save(root / "outside.png")
    proc = ServerProcess(str(path), *TINY_ARGS, "--allowed-local-media-path", str(media),
                         "--limit-mm-per-prompt", '{"image": 2}').start()
    yield proc, path, media, root
    proc.stop()


def test_chat_with_images_matches_hf(server):
    proc, path, media, _ = server
    client = openai.OpenAI(base_url=proc.base_url, api_key="none")
    first, second = random_image(21, 48, 40), random_image(22, 30, 30)
    reply = client.chat.completions.create(model="tiny", messages=_message(_data_uri(first), _data_uri(second, "JPEG")),
                                           max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    text = "<|im_start|>user\n<image>\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    # JPEG is lossy: the reference decodes the same bytes the server got.
    from PIL import Image
    decoded = Image.open(io.BytesIO(base64.b64decode(_data_uri(second, "JPEG").split(",", 1)[1]))).convert("RGB")
    expected = hf_vision_greedy(path, [(text, [first, decoded])], 8)[0]
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(path)
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False)) + 2 * 15
    # A local file, twice behind different text: encoded once, the second request hits the encoder cache.
    hits = _metric(proc, "runtime:encoder_cache_hits_total")
    for text in ("What is this?", "And this picture, what does it show?"):
        local = client.chat.completions.create(model="tiny", messages=_message(f"file://{media / 'inside.png'}", text=text),
                                               max_tokens=4, temperature=0)
        assert local.usage.completion_tokens == 4 or local.choices[0].finish_reason == "stop"
    assert _metric(proc, "runtime:encoder_cache_hits_total") == hits + 1


def _metric(proc: ServerProcess, name: str) -> float:
    for line in httpx.get(f"{proc.url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def test_bad_images_get_a_400_naming_the_cause_and_the_server_keeps_serving(server):
    proc, _, media, root = server
    good = _data_uri(random_image(30, 20, 20))
    cases = {
        "could not be decoded": _message("data:image/png;base64," + base64.b64encode(b"not a png at all").decode()),
        "not valid base64": _message("data:image/png;base64,@@@@"),
        "not supported": _message(_data_uri(random_image(31, 8, 8), "GIF")),
        "at most 2": _message(good, good, good),
        "--allow-remote-media": _message("https://example.com/cat.png"),
        "outside --allowed-local-media-path": _message(f"file://{root / 'outside.png'}"),
        "cannot be read": _message(f"file://{media / 'missing.png'}"),
        "image placeholders": [{"role": "user", "content": "<image> with no image part"}],
    }
    with httpx.Client(base_url=proc.base_url, timeout=60) as client:
        for cause, messages in cases.items():
            response = client.post("/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 2})
            assert response.status_code == 400, (cause, response.text)
            assert cause in response.json()["error"]["message"], (cause, response.text)
        part = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
        response = client.post("/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": [part]}]})
        assert response.status_code == 400
        ok = client.post("/chat/completions", json={"model": "tiny", "messages": _message(good), "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
