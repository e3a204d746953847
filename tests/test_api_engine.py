"""AsyncEngine with its own engine core process: its streamed deltas add up to what the offline LLM
returns, aborts free the cache before the next step, the waiting queue is bounded, shutdown fails
what is pending, and a core killed mid-stream fails every stream at once."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from runtime import LLM, SamplingParams
from runtime.engine.args import EngineArgs
from runtime.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError

from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("engine-processes")

OPTIONS = dict(kv_cache_memory="16MiB", max_model_len=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama"))


def with_engine(checkpoint, body, max_queue_len=None, **options):
    """Run ``body(engine)`` on a fresh event loop against a started, loaded engine; shut it down after."""
    async def run():
        engine = await AsyncEngine(EngineArgs(model=checkpoint, **{**OPTIONS, **options}),
                                   max_queue_len=max_queue_len).start()
        try:
            await engine.wait_ready(120)
            return await body(engine)
        finally:
            await engine.shutdown()

    return asyncio.run(run())


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


async def until(predicate, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def test_deltas_add_up_to_the_offline_result(checkpoint):
    params = [SamplingParams(temperature=0, max_tokens=12, stop=["e"]),
              SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=10, logprobs=1)]
    prompt = "Once upon a time"
    offline = LLM(checkpoint, **OPTIONS).generate([prompt] * 2, params, use_tqdm=False)

    async def run(engine):
        ids = engine.tokenizer.encode(prompt)
        streams = [engine.add_request(f"r{i}", prompt, ids, p) for i, p in enumerate(params)]
        return await asyncio.gather(*(collect(s) for s in streams))

    for (texts, tokens, final), expected in zip(with_engine(checkpoint, run), offline):
        for c in expected.outputs:
            assert texts[c.index] == final[c.index].text == c.text
            assert tokens[c.index] == final[c.index].token_ids == c.token_ids
            assert final[c.index].finish_reason == c.finish_reason
            got = final[c.index].logprobs
            if c.logprobs is not None:  # batch composition may move the last float bits
                assert [list(e) for e in got] == [list(e) for e in c.logprobs]
                assert [lp.logprob for e in got for lp in e.values()] == pytest.approx(
                    [lp.logprob for e in c.logprobs for lp in e.values()], abs=1e-4)


def test_abort_frees_the_cache_and_ends_the_stream(checkpoint):
    async def run(engine):
        stream = engine.add_request("long", None, [5, 6, 7, 8] * 8, SamplingParams(max_tokens=200, ignore_eos=True))
        async with stream:
            await stream.__anext__()
            assert await until(lambda: engine.stats().kv_cache_usage > 0)
        # Left the block: aborted. The core applies it before its next step.
        assert await until(lambda: engine.stats().num_running == 0)
        assert engine.stats().kv_cache_usage == 0
        assert engine.num_waiting == 0

    with_engine(checkpoint, run)


def test_a_request_the_core_refuses_fails_its_stream_only(checkpoint):
    async def run(engine):
        good = engine.add_request("good", None, [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
        # The API checks lengths first; the core refuses what slips through, with the reason.
        bad = engine.add_request("bad", None, [5, 6, 7] * 100, SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="prompt has 300 tokens"):
            await collect(bad)
        _, tokens, _ = await collect(good)
        assert len(tokens[0]) == 4
        assert engine.num_waiting == 0

    with_engine(checkpoint, run)


def test_waiting_queue_is_bounded(checkpoint):
    async def run(engine):
        params = SamplingParams(max_tokens=5)
        streams = [engine.add_request(f"q{i}", None, [5, 6, 7], params) for i in range(2)]
        with pytest.raises(QueueFullError):
            engine.add_request("q2", None, [5, 6, 7], params)
        for stream in streams:
            await collect(stream)
        await collect(engine.add_request("q3", None, [5, 6, 7], params))  # room again

    with_engine(checkpoint, run, max_queue_len=2, max_num_seqs=1)


def test_shutdown_fails_pending_requests(checkpoint):
    async def run():
        engine = await AsyncEngine(EngineArgs(model=checkpoint, **OPTIONS)).start()
        await engine.wait_ready(120)
        stream = engine.add_request("x", None, [5, 6, 7], SamplingParams(max_tokens=250, ignore_eos=True))
        await stream.__anext__()
        core = engine._own_core.process
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            engine.add_request("y", None, [5, 6, 7], SamplingParams())
        assert engine.state == "dead" and not core.is_alive()

    asyncio.run(run())


def test_killed_core_fails_every_stream(checkpoint):
    async def run(engine):
        died = []
        engine.on_death(lambda: died.append(engine.error))
        streams = [engine.add_request(f"k{i}", None, [5, 6, 7 + i], SamplingParams(max_tokens=250, ignore_eos=True))
                   for i in range(3)]
        for stream in streams:
            await stream.__anext__()
        os.kill(engine._own_core.process.pid, signal.SIGKILL)
        for stream in streams:
            with pytest.raises(EngineDeadError, match="exited unexpectedly"):
                await asyncio.wait_for(collect(stream), 5)
        assert engine.state == "dead" and len(died) == 1
        with pytest.raises(EngineDeadError):
            engine.add_request("after", None, [5, 6, 7], SamplingParams())

    with_engine(checkpoint, run)


def test_load_failure_is_reported(tmp_path):
    async def run():
        engine = await AsyncEngine(EngineArgs(model=str(tmp_path / "missing"))).start()
        try:
            with pytest.raises(EngineDeadError, match="not found"):
                await engine.wait_ready(60)
            assert engine.state == "dead"
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_prompts_are_tokenized_off_the_event_loop_one_at_a_time():
    """A prompt of megabytes takes seconds to tokenize: on the event loop it stalled every stream."""
    import threading
    import time

    class RecordingTokenizer:
        def __init__(self):
            self.threads, self.inside, self.most_inside = [], 0, 0

        def encode(self, text, add_special_tokens):
            self.threads.append(threading.current_thread())
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            time.sleep(0.05)
            self.inside -= 1
            return [len(text), int(add_special_tokens)]

    async def run():
        engine = AsyncEngine(EngineArgs())
        engine.tokenizer = tokenizer = RecordingTokenizer()
        loop_thread = threading.current_thread()
        ids = await asyncio.gather(*(engine.encode("x" * n, n % 2 == 0) for n in range(1, 7)))
        await engine.shutdown()
        return ids, tokenizer, loop_thread

    ids, tokenizer, loop_thread = asyncio.run(run())
    assert ids == [[n, int(n % 2 == 0)] for n in range(1, 7)]
    assert loop_thread not in tokenizer.threads and tokenizer.most_inside == 1
