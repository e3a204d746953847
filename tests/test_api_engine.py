"""AsyncEngine in-process: its streamed deltas add up to what the offline LLM returns, aborts free
the cache before the next step, the waiting queue is bounded, and shutdown fails what is pending."""

from __future__ import annotations

import asyncio

import pytest

from runtime import LLM, SamplingParams
from runtime.engine.args import EngineArgs
from runtime.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError

from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("api")

OPTIONS = dict(kv_cache_memory="16MiB", max_model_len=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = AsyncEngine(EngineArgs(model=checkpoint, **OPTIONS)).start()
    engine.wait_ready(120)
    yield engine
    engine.shutdown()


async def collect(stream):
    """Per sample: (text from the deltas, token ids from the deltas, the final cumulative output)."""
    texts, tokens, final = {}, {}, {}
    async for out in stream:
        for c in out.outputs:
            texts[c.index] = texts.get(c.index, "") + c.delta_text
            tokens[c.index] = tokens.get(c.index, []) + c.delta_token_ids
            if c.finish_reason is not None:
                final[c.index] = c
    return texts, tokens, final


def test_deltas_add_up_to_the_offline_result(engine, checkpoint):
    params = [SamplingParams(temperature=0, max_tokens=12, stop=["e"]),
              SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=10, logprobs=1)]
    prompt = "Once upon a time"
    offline = LLM(checkpoint, **OPTIONS).generate([prompt] * 2, params, use_tqdm=False)

    async def run():
        ids = engine.tokenizer.encode(prompt)
        streams = [engine.add_request(f"r{i}", prompt, ids, p) for i, p in enumerate(params)]
        return await asyncio.gather(*(collect(s) for s in streams))

    for (texts, tokens, final), expected in zip(asyncio.run(run()), offline):
        for c in expected.outputs:
            assert texts[c.index] == final[c.index].text == c.text
            assert tokens[c.index] == final[c.index].token_ids == c.token_ids
            assert final[c.index].finish_reason == c.finish_reason
            got = final[c.index].logprobs
            if c.logprobs is not None:  # batch composition may move the last float bits
                assert [list(e) for e in got] == [list(e) for e in c.logprobs]
                assert [lp.logprob for e in got for lp in e.values()] == pytest.approx(
                    [lp.logprob for e in c.logprobs for lp in e.values()], abs=1e-4)


def test_abort_frees_the_cache_and_ends_the_stream(engine):
    async def run():
        stream = engine.add_request("long", None, [5, 6, 7, 8] * 8, SamplingParams(max_tokens=200, ignore_eos=True))
        async with stream:
            await stream.__anext__()
            assert engine.stats()["kv_cache_usage"] > 0
        # Left the block: aborted. The engine applies it before its next step.
        for _ in range(200):
            if engine.stats()["num_running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats()["num_running"] == 0 and engine.stats()["kv_cache_usage"] == 0
        assert engine.num_waiting == 0

    asyncio.run(run())


def test_waiting_queue_is_bounded(checkpoint):
    engine = AsyncEngine(EngineArgs(model=checkpoint, max_num_seqs=1, **OPTIONS), max_queue_len=2).start()
    engine.wait_ready(120)

    async def run():
        params = SamplingParams(max_tokens=5)
        streams = [engine.add_request(f"q{i}", None, [5, 6, 7], params) for i in range(2)]
        with pytest.raises(QueueFullError):
            engine.add_request("q2", None, [5, 6, 7], params)
        for stream in streams:
            await collect(stream)
        await collect(engine.add_request("q3", None, [5, 6, 7], params))  # room again

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def test_shutdown_fails_pending_requests(checkpoint):
    engine = AsyncEngine(EngineArgs(model=checkpoint, **OPTIONS)).start()
    engine.wait_ready(120)

    async def run():
        stream = engine.add_request("x", None, [5, 6, 7], SamplingParams(max_tokens=250, ignore_eos=True))
        await stream.__anext__()
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            engine.add_request("y", None, [5, 6, 7], SamplingParams())

    asyncio.run(run())
    assert engine.state == "dead"


def test_load_failure_is_reported(tmp_path):
    engine = AsyncEngine(EngineArgs(model=str(tmp_path / "missing"))).start()
    with pytest.raises(EngineDeadError, match="not found"):
        engine.wait_ready(60)
    assert engine.state == "dead"
