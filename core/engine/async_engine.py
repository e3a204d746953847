"""AsyncEngine: the engine behind the HTTP server.

One background thread owns the EngineCore and the OutputProcessor: it builds them (so the server
can answer ``/health`` while the model loads), then steps while there is work and sleeps on a
condition otherwise. Request handlers on the asyncio event loop never touch either object: they
hand new requests and aborts to the thread through a locked inbox, and the thread hands each
step's outputs back with one ``loop.call_soon_threadsafe`` into per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..sample.params import SamplingParams
from .args import EngineArgs
from .chat import load_chat_template
from .core import EngineCore
from .output_processor import OutputProcessor, child_id
from .outputs import CompletionOutput, RequestOutput
from .submit import submit

logger = logging.getLogger("runtime")


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class EngineDeadError(RuntimeError):
    """The engine failed (or was shut down); it serves no more requests."""


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_queue_len`` requests already."""


@dataclass
class _NewRequest:
    stream: "RequestStream"
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int


class RequestStream:
    """One request's outputs as they are produced: ``async for output in stream``.

    Each RequestOutput holds the samples that changed in one engine step. Their ``delta_*``
    fields hold what is new; a sample's cumulative ``text``, ``token_ids`` and ``logprobs`` are
    filled in the output where it finishes (``finish_reason`` set). ``prompt_logprobs``, when
    asked for, is set from the output with the request's first token on. Iteration raises the request's error, if
    any (ValueError: the core refused it; EngineDeadError: the engine died or stopped).

    ``async with stream:`` aborts the request on exit unless it finished.
    """

    def __init__(self, engine: "AsyncEngine", request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self._done = False
        self.waiting = True
        """No output yet: the request counts against the waiting queue."""

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def abort(self) -> None:
        """Stop generating (the client went away); a no-op once finished. Call on the event loop."""
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.abort()


class AsyncEngine:
    """Serves requests from asyncio code while the engine steps in a background thread.

    ``start()`` launches the thread, which builds the engine; until it is built ``state`` is
    ``"loading"``, then ``"ready"``; after a failure or ``shutdown()`` it is ``"dead"`` and
    ``error`` says why. ``max_queue_len`` bounds the requests that have produced no output yet;
    beyond it ``add_request`` raises QueueFullError instead of letting memory grow.
    """

    def __init__(self, args: EngineArgs, max_queue_len: Optional[int] = None,
                 build: Callable[[EngineArgs], EngineCore] = EngineCore):
        if max_queue_len is not None and max_queue_len < 1:
            raise ValueError(f"max_queue_len must be >= 1, got {max_queue_len}")
        self.args = args
        self.max_queue_len = max_queue_len
        self._build = build
        self.state = "loading"
        self.error: Optional[BaseException] = None
        self.core: Optional[EngineCore] = None
        self.tokenizer: Any = None
        self.chat_template: Optional[str] = None
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self._inbox: list[_NewRequest] = []
        self._aborts: set[str] = set()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        # Engine thread only: the loop of every request it holds, to route outputs.
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}
        # Event loop only: the stream of every request not yet finished.
        self._streams: dict[str, RequestStream] = {}
        self.num_waiting = 0
        """Requests with no output yet (event-loop side count, checked against max_queue_len)."""
        self._stats: dict[str, float] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "AsyncEngine":
        """Build the engine and start stepping, in the background; returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="runtime-engine", daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Block until the engine is built (or failed to build: raises EngineDeadError)."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the engine did not load within {timeout} s")
        if self.state != "ready":
            raise EngineDeadError(f"the engine failed to start: {self.error}")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still held fail with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- what the server reads --------------------------------------------------------------

    def check_ready(self) -> None:
        """Raise EngineNotReadyError while loading, EngineDeadError once failed or stopped."""
        self._require_core()

    @property
    def max_model_len(self) -> int:
        return self._require_core().max_model_len

    @property
    def vocab_size(self) -> int:
        return self._require_core().runner.settings.vocab_size

    def stats(self) -> dict[str, float]:
        """The core's counters as of its last step (running, waiting, KV usage, prefix cache, preemptions)."""
        return self._stats

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, priority: int = 0) -> RequestStream:
        """Queue a request; returns its stream. Call on the event loop that will consume it.

        Raises EngineNotReadyError while loading, EngineDeadError after a failure, and
        QueueFullError when ``max_queue_len`` requests are waiting already.
        """
        self._require_core()
        if self.max_queue_len is not None and self.num_waiting >= self.max_queue_len:
            raise QueueFullError(f"{self.num_waiting} requests are waiting already "
                                 f"(--max-queue-len {self.max_queue_len})")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        with self._cond:
            if self.state != "ready":
                raise EngineDeadError(f"the engine is not running: {self.error}")
            self._inbox.append(_NewRequest(stream, prompt, list(prompt_token_ids), params, priority))
            self._cond.notify()
        self._streams[request_id] = stream
        self.num_waiting += 1
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request; it takes effect before the next step, which frees its KV blocks."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and stream.waiting:
            stream.waiting = False
            self.num_waiting -= 1
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def _require_core(self) -> EngineCore:
        if self.state == "loading":
            raise EngineNotReadyError("the model is still loading; retry shortly")
        if self.state != "ready" or self.core is None:
            raise EngineDeadError(f"the engine is not running: {self.error}")
        return self.core

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            core = self._build(self.args)
            self.tokenizer = core.source.tokenizer
            self.chat_template = load_chat_template(self.args.chat_template) or core.source.chat_template
            processor = OutputProcessor(self.tokenizer)
            self._stats = core.stats()
            self.core = core
        except BaseException as exc:  # noqa: BLE001  (reported through wait_ready and state, not raised in a thread)
            self._die(exc)
            self._ready.set()
            return
        with self._cond:
            if not self._stopping:
                self.state = "ready"
        self._ready.set()
        try:
            self._loop(core, processor)
        except BaseException as exc:  # noqa: BLE001
            logger.exception("the engine died")
            self._die(exc)
            return
        self._die(EngineDeadError("the engine was shut down"))

    def _loop(self, core: EngineCore, processor: OutputProcessor) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._stopping or core.has_unfinished_requests()):
                    self._cond.wait()
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, set()
            failed = []
            for new in inbox:
                rid = new.stream.request_id
                if rid in aborts:
                    continue
                try:
                    submit(core, processor, rid, new.prompt, new.prompt_token_ids, new.params, new.priority)
                except ValueError as exc:
                    failed.append((new.stream.loop, rid, exc))
                    continue
                self._loops[rid] = new.stream.loop
            for rid in aborts:
                core.abort_requests(processor.abort(rid))
                self._loops.pop(rid, None)
            outputs = []
            if core.has_unfinished_requests():
                core_outputs = core.step()
                results, stopped = processor.process(core_outputs)
                if stopped:
                    core.finish_requests(stopped)
                changed = {out.request_id for out in core_outputs}
                outputs = [_step_delta(result, changed) for result in results]
            self._stats = core.stats()
            self._dispatch([(self._loops[o.request_id], o.request_id, o) for o in outputs
                            if o.request_id in self._loops] + failed)
            for out in outputs:
                if out.finished:
                    self._loops.pop(out.request_id, None)

    def _dispatch(self, items: list[tuple[asyncio.AbstractEventLoop, str, Any]]) -> None:
        """Hand (request id, output or error) pairs to their event loops: one callback per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, Any]]] = {}
        for loop, rid, item in items:
            by_loop.setdefault(loop, []).append((rid, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:
                pass  # the loop is closed: nobody is listening any more

    def _deliver(self, batch: list[tuple[str, Any]]) -> None:
        """On the event loop: put each output in its stream's queue."""
        for rid, item in batch:
            stream = self._streams.get(rid)
            if stream is None:
                continue  # aborted meanwhile
            if stream.waiting:
                stream.waiting = False
                self.num_waiting -= 1
            if isinstance(item, BaseException) or item.finished:
                del self._streams[rid]
            stream._queue.put_nowait(item)

    def _die(self, exc: BaseException) -> None:
        """Mark the engine dead and fail every request it holds or has queued."""
        with self._cond:
            self.state = "dead"
            if self.error is None:
                self.error = exc
            inbox, self._inbox = self._inbox, []
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"the engine died: {exc}")
        items = [(new.stream.loop, new.stream.request_id, error) for new in inbox]
        items += [(loop, rid, error) for rid, loop in self._loops.items()]
        self._loops.clear()
        self._dispatch(items)


def _step_delta(result: RequestOutput, changed: set[str]) -> RequestOutput:
    """What one step changed in ``result``, safe to hand to another thread.

    The processor keeps mutating an unfinished sample's CompletionOutput, so those are copied
    with only their per-step (freshly allocated) delta fields; finished samples are never
    touched again and go as they are.
    """
    n = len(result.outputs)
    samples = []
    for completion in result.outputs:
        if child_id(result.request_id, completion.index, n) not in changed:
            continue
        if completion.finish_reason is None:
            completion = CompletionOutput(completion.index, cumulative_logprob=completion.cumulative_logprob,
                                          delta_text=completion.delta_text, delta_token_ids=completion.delta_token_ids,
                                          delta_logprobs=completion.delta_logprobs)
        samples.append(completion)
    # Prompt logprobs are complete, and no longer extended, once sample 0 has a token: it was
    # admitted first, so no sample of the request streams a token before they are available.
    prompt_logprobs = result.prompt_logprobs if result.outputs[0].token_ids else None
    return RequestOutput(result.request_id, result.prompt, result.prompt_token_ids, samples, finished=result.finished,
                         prompt_logprobs=prompt_logprobs)
