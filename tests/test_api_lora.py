"""LoRA over HTTP: adapters named in `model`, listed by /v1/models with their parent, 8 adapters
and the base model under 64 concurrent requests (each output equal to the request alone), and
adapters loaded and unloaded while requests run, bad ones refused with the server serving on."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from api_server import TINY_ARGS, ServerProcess
from lora_adapters import SEPARATE, make_adapter
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("engine-processes")

NUM_ADAPTERS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-api")
    base = make_tiny_checkpoint(root, "llama")
    for i in range(NUM_ADAPTERS + 2):
        make_adapter(base, root / f"a{i}", [8, 16][i % 2], SEPARATE, seed=100 + i)
    make_adapter(base, root / "rank32", 32, SEPARATE, seed=7)
    outside = tmp_path_factory.mktemp("elsewhere")
    make_adapter(base, outside / "outside", 8, SEPARATE, seed=9)
    (root / "link").symlink_to(outside / "outside")
    modules = [f"a{i}={root / f'a{i}'}" for i in range(NUM_ADAPTERS)]
    # 4 adapters a step for 9 models (adapters and base), a 32-token budget (prompts are chunked),
    # a small KV cache (requests are preempted), prefix caching on.
    server = ServerProcess(str(base), *TINY_ARGS[2:], "--kv-cache-memory", str(20 * 8192), "--enable-lora",
                           "--max-loras", "4", "--max-cpu-loras", "6", "--max-lora-rank", "16",
                           "--max-num-batched-tokens", "32", "--max-num-seqs", "16", "--allow-runtime-lora-updating",
                           "--lora-allowed-dirs", str(root),
                           "--lora-modules", *modules).start()
    yield server, root, outside
    assert server.stop() == 0


def complete(client: httpx.Client, model: str, prompt: list[int], max_tokens: int = 12) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = client.post("/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_models_lists_each_adapter_with_its_parent(setup):
    server, root, _ = setup
    cards = {c["id"]: c for c in httpx.get(f"{server.base_url}/models").json()["data"]}
    assert cards["tiny"]["parent"] is None
    for i in range(NUM_ADAPTERS):
        assert cards[f"a{i}"]["parent"] == "tiny" and cards[f"a{i}"]["root"] == str(root / f"a{i}")
    response = httpx.post(f"{server.base_url}/completions", json={"model": "nope", "prompt": "hi", "max_tokens": 1})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_64_concurrent_requests_over_8_adapters_each_get_what_they_get_alone(setup):
    server, _, _ = setup
    rng = random.Random(5)
    models = ["tiny"] + [f"a{i}" for i in range(NUM_ADAPTERS)]
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randrange(4, 40))] for _ in range(6)]
    jobs = [(rng.choice(models), rng.choice(prompts)) for _ in range(64)]

    async def run_all() -> list[str]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            async def one(model, prompt, delay):
                await asyncio.sleep(delay)
                body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
                response = await client.post("/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["text"]
            # Half at once, so the running batch outgrows the small cache however fast the machine
            # (preemption must happen), half at random times over the next second.
            delays = [0.0 if i % 2 else rng.random() for i in range(len(jobs))]
            return await asyncio.gather(*(one(m, p, d) for (m, p), d in zip(jobs, delays)))

    together = asyncio.run(run_all())
    with httpx.Client(base_url=server.base_url) as client:
        alone = {(m, tuple(p)): complete(client, m, p) for m, p in set((m, tuple(p)) for m, p in jobs)}
        wrong = [(m, text, alone[(m, tuple(p))]) for (m, p), text in zip(jobs, together) if text != alone[(m, tuple(p))]]
        assert not wrong, f"{len(wrong)} of 64 outputs differ from the request alone: {wrong[:3]}"
        texts = {complete(client, m, prompts[0]) for m in models}
    assert len(texts) == len(models)  # every adapter changes the output: a mix-up would show
    metrics = httpx.get(f"{server.url}/metrics").text
    preemptions = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("runtime:num_preemptions_total")]
    assert preemptions and preemptions[0] > 0  # the small cache forced some: resumption is covered
    info = [line for line in metrics.splitlines() if line.startswith("runtime:lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="4"' in info[0] and 'running_lora_adapters=""' in info[0]  # all done


def test_adapters_load_and_unload_while_requests_run_and_bad_ones_are_refused(setup):
    server, root, outside = setup
    prompt = [5, 9, 2, 7, 11, 3, 8]
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        before = complete(client, "a0", prompt)

        async def long_requests_on_a0():
            async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as aclient:
                body = {"model": "a0", "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
                return await asyncio.gather(*(aclient.post("/completions", json=body) for _ in range(4)))

        async def meanwhile():
            running = asyncio.ensure_future(long_requests_on_a0())
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as aclient:
                loaded = await aclient.post("/load_lora_adapter", json={"lora_name": "late",
                                                                        "lora_path": str(root / f"a{NUM_ADAPTERS}")})
                unloaded = await aclient.post("/unload_lora_adapter", json={"lora_name": "a0"})
            return loaded, unloaded, await running

        loaded, unloaded, running = asyncio.run(meanwhile())
        assert loaded.status_code == 200 and unloaded.status_code == 200, (loaded.text, unloaded.text)
        for response in running:  # requests already running with a0 finish with it
            assert response.status_code == 200 and response.json()["choices"][0]["text"].startswith(before)
        gone = client.post("/completions", json={"model": "a0", "prompt": prompt, "max_tokens": 2})
        assert gone.status_code == 404
        assert complete(client, "late", prompt) not in (before, complete(client, "tiny", prompt))
        bad = [({"lora_name": "big", "lora_path": str(root / "rank32")}, "above --max-lora-rank 16"),
               ({"lora_name": "missing", "lora_path": str(root / "nowhere")}, "is not a directory"),
               ({"lora_name": "a1", "lora_path": str(root / "a2")}, "already in use")]
        for body, message in bad:
            response = client.post("/load_lora_adapter", json=body)
            assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
        # Outside --lora-allowed-dirs, however the path gets there: a 403 naming the flag.
        for path in (outside / "outside", root / "link", root / ".." / outside.name / "outside"):
            response = client.post("/load_lora_adapter", json={"lora_name": "out", "lora_path": str(path)})
            error = response.json()["error"]
            assert response.status_code == 403 and error["param"] == "lora_path", response.text
            assert "--lora-allowed-dirs" in error["message"] and str(root) in error["message"]
        assert client.post("/unload_lora_adapter", json={"lora_name": "a0"}).status_code == 404
        assert complete(client, "a1", prompt)  # still serving
