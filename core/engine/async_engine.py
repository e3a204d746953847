"""AsyncEngine: the API process's side of the engine, on its asyncio event loop.

It owns text: the tokenizer and chat template (loaded here, beside the core's model load), the
OutputProcessor (incremental detokenizing, stop strings, logprob dicts, n samples folded into
one result) and one stream per request. The model and the scheduler live in the engine core
process (engine_process.py); requests and aborts go to it over a socket, and each step's
token ids come back in one message that one task on the event loop turns into stream outputs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import zip_longest
from typing import Any, Callable, Optional

import zmq
import zmq.asyncio

from ..loader.source import open_model
from ..lora import LoRARequest
from ..models import decoder_settings
from ..pooling import PoolerConfig, PoolingParams, resolve_pooler_config
from ..models.vision import vision_arch
from ..multimodal.inputs import ImageInput
from ..multimodal.media import MediaPolicy
from ..multimodal.processor import ImageProcessor
from ..sample.params import SamplingParams
from .args import EngineArgs
from .chat import load_chat_template
from .core import EngineCore
from .engine_process import CoreConnection, EngineCoreHandle, start_engine_core
from .messages import (AbortRequests, AddRequest, ClientReady, EngineStats, Failed, Ready, StepOutputs,
                       decode_from_core, encode)
from .output_processor import OutputProcessor, child_id
from .outputs import CompletionOutput, RequestOutput

logger = logging.getLogger("runtime")

_UNUSED_SAMPLING = SamplingParams(max_tokens=1)
"""What an embedding request's ``AddRequest.params`` holds: it samples nothing."""

_LAST_WORDS_S = 0.5
"""How long a dead core's last message (why it failed) may trail the end-of-file of its liveness pipe."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class EngineDeadError(RuntimeError):
    """The engine failed (or was shut down); it serves no more requests."""


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_queue_len`` requests already."""


class RequestStream:
    """One request's outputs as they are produced: ``async for output in stream``.

    Each RequestOutput holds the samples that changed in one engine step. Their ``delta_*``
    fields hold what is new; a sample's cumulative ``text``, ``token_ids`` and ``logprobs`` are
    filled in the output where it finishes (``finish_reason`` set). ``prompt_logprobs``, when
    asked for, is set from the output with the request's first token on. Iteration raises the
    request's error, if any (ValueError: the core refused it; EngineDeadError: the engine died or
    stopped).

    ``async with stream:`` aborts the request on exit unless it finished. ``observer``, if given,
    sees each output as it arrives, however late the consumer reads it (metrics).
    """

    def __init__(self, engine: "AsyncEngine", request_id: str,
                 observer: Optional[Callable[[RequestOutput], None]] = None):
        self.request_id = request_id
        self.observer = observer
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
        """Stop generating (the client went away); a no-op once finished."""
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.abort()


class _CoreLink:
    """One engine core as an API process sees it (several under data parallelism)."""

    def __init__(self, connection: CoreConnection, socket: Any):
        self.connection, self.socket = connection, socket
        self.stats = EngineStats()
        self.model_info: Optional[Ready] = None
        self.added_since_stats = 0
        """Requests sent since the core's last counters: load it has not reported yet."""

    @property
    def load(self) -> int:
        return self.stats.num_running + self.stats.num_waiting + self.added_since_stats

    def send(self, message: AddRequest | AbortRequests | ClientReady) -> None:
        # An unbounded queue never blocks, so the send completes now, off any await.
        self.socket.send(encode(message), copy=True)


class AsyncEngine:
    """Serves requests from asyncio code; the model runs in engine core processes.

    With ``connections`` it talks to cores that a supervisor started (``runtime serve``, where
    several API processes share them), one per data-parallel rank: each new request goes to the
    core with the least load (running + waiting, as last reported, + requests sent since).
    Without, ``start()`` spawns one core of its own with ``build`` (which must be picklable). Until the core reports its model loaded and every API
    process's tokenizer loaded, ``state`` is ``"loading"``, then ``"ready"``; after a failure, the
    core's death or ``shutdown()`` it is ``"dead"`` and ``error`` says why. ``max_queue_len``
    bounds the requests that have produced no output yet; beyond it ``add_request`` raises
    QueueFullError instead of letting memory grow. Every method runs on the event loop that
    called ``start()``.
    """

    def __init__(self, args: EngineArgs, max_queue_len: Optional[int] = None,
                 build: Callable[[EngineArgs], EngineCore] = EngineCore,
                 connections: Optional[list[CoreConnection]] = None):
        if max_queue_len is not None and max_queue_len < 1:
            raise ValueError(f"max_queue_len must be >= 1, got {max_queue_len}")
        self.args = args
        self.max_queue_len = max_queue_len
        self._build = build
        self._connections = list(connections or [])
        self._links: list[_CoreLink] = []
        self._core_of: dict[str, _CoreLink] = {}
        """Request id -> the core serving it."""
        self._own_core: Optional[EngineCoreHandle] = None
        self.state = "loading"
        self.error: Optional[BaseException] = None
        self.tokenizer: Any = None
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime-tokenize")
        """Where prompts are tokenized (``encode``): one thread, so the tokenizer is never entered twice at once."""
        self.chat_template: Optional[str] = None
        self.image_processor: Optional[ImageProcessor] = None
        """A vision-language model's preprocessing (None for text-only models)."""
        self.media_policy = MediaPolicy(args.allowed_local_media_path, args.allow_remote_media)
        self._processor: Optional[OutputProcessor] = None
        self._streams: dict[str, RequestStream] = {}
        self._embeddings: dict[str, asyncio.Future] = {}
        """Embedding requests by id -> their vector (float32 little-endian bytes), once computed."""
        self.pooler_config: Optional[PoolerConfig] = None
        """The model's pooling where the engine runs task embed (as the core resolves it)."""
        self.num_waiting = 0
        """Requests with no output yet (checked against max_queue_len)."""
        self._death_callbacks: list[Callable[[], None]] = []
        self._ready: Optional[asyncio.Event] = None
        self._tasks: list[asyncio.Task] = []
        self._zmq: Optional[zmq.asyncio.Context] = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> "AsyncEngine":
        """Connect to the core (spawning it if none was given) and load the tokenizer, in the
        background; returns at once."""
        if self._ready is not None:
            return self
        loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        if not self._connections:
            self._own_core = start_engine_core(self.args, 1, self._build)
            self._connections = self._own_core.connections[:1]
        self._zmq = zmq.asyncio.Context()
        sync = zmq.Context.shadow(self._zmq.underlying)
        self._tasks = [asyncio.ensure_future(self._load_tokenizer())]
        for connection in self._connections:
            # Sending never blocks (the queue is unbounded), so it needs no future: a plain socket.
            to_core = sync.socket(zmq.PUSH)
            to_core.setsockopt(zmq.SNDHWM, 0)
            to_core.setsockopt(zmq.LINGER, 0)
            to_core.connect(connection.input_address)
            from_core = self._zmq.socket(zmq.PULL)
            from_core.setsockopt(zmq.RCVHWM, 0)
            from_core.setsockopt(zmq.LINGER, 0)
            from_core.bind(connection.output_address)
            link = _CoreLink(connection, to_core)
            self._links.append(link)
            loop.add_reader(connection.alive.fileno(), self._core_exited, link)
            self._tasks.append(asyncio.ensure_future(self._receive(link, from_core)))
        return self

    async def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Wait until the engine can serve (raises EngineDeadError if it failed to start)."""
        if self._ready is None:
            raise RuntimeError("start() the engine first")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the engine did not load within {timeout} s") from None
        if self.state != "ready":
            raise EngineDeadError(f"the engine failed to start: {self.error}")

    def on_death(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) once the engine dies other than by ``shutdown()``."""
        self._death_callbacks.append(callback)

    async def shutdown(self) -> None:
        """Fail what is still held with EngineDeadError, disconnect, and stop the core if it is ours."""
        self._die(EngineDeadError("the engine was shut down"), expected=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self._links:
            try:
                asyncio.get_running_loop().remove_reader(link.connection.alive.fileno())
            except (ValueError, OSError):
                pass  # already closed
            link.socket.close(linger=0)
        if self._zmq is not None:
            self._zmq.destroy(linger=0)
            self._zmq = None
        if self._own_core is not None:
            await asyncio.to_thread(self._own_core.stop)
            self._connections[0].alive.close()
            self._own_core = None
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    # -- what the server reads --------------------------------------------------------------

    def check_ready(self) -> None:
        """Raise EngineNotReadyError while loading, EngineDeadError once failed or stopped."""
        self._require_info()

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """``text``'s token ids, computed off the event loop: a prompt of megabytes takes seconds
        to tokenize, which on the loop stalled every other stream (the tokenizer releases the GIL)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizing, lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    @property
    def max_model_len(self) -> int:
        return self._require_info().max_model_len

    @property
    def vocab_size(self) -> int:
        return self._require_info().vocab_size

    def stats(self) -> EngineStats:
        """The cores' counters as of their last steps (running, waiting, KV usage, prefix cache,
        preemptions, speculative decoding), summed over data-parallel cores (the accepted tokens
        per position elementwise); KV usage is their mean."""
        if len(self._links) == 1:
            return self._links[0].stats
        every = [link.stats for link in self._links]
        return EngineStats(num_running=sum(s.num_running for s in every), num_waiting=sum(s.num_waiting for s in every),
                           kv_cache_usage=sum(s.kv_cache_usage for s in every) / max(1, len(every)),
                           prefix_cache_queries=sum(s.prefix_cache_queries for s in every),
                           prefix_cache_hits=sum(s.prefix_cache_hits for s in every),
                           num_preemptions=sum(s.num_preemptions for s in every),
                           cpu_prefix_cache_queries=sum(s.cpu_prefix_cache_queries for s in every),
                           cpu_prefix_cache_hits=sum(s.cpu_prefix_cache_hits for s in every),
                           running_lora_ids=sorted({i for s in every for i in s.running_lora_ids}),
                           waiting_lora_ids=sorted({i for s in every for i in s.waiting_lora_ids}),
                           spec_num_drafts=sum(s.spec_num_drafts for s in every),
                           spec_num_draft_tokens=sum(s.spec_num_draft_tokens for s in every),
                           spec_num_accepted_tokens=sum(s.spec_num_accepted_tokens for s in every),
                           spec_accepted_per_position=[sum(counts) for counts in zip_longest(
                               *(s.spec_accepted_per_position for s in every), fillvalue=0)],
                           encoder_cache_queries=sum(s.encoder_cache_queries for s in every),
                           encoder_cache_hits=sum(s.encoder_cache_hits for s in every))

    def _require_info(self) -> Ready:
        if self.state == "loading":
            raise EngineNotReadyError("the model is still loading; retry shortly")
        if self.state != "ready":
            raise EngineDeadError(f"the engine is not running: {self.error}")
        return self._links[0].model_info

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, priority: int = 0,
                    observer: Optional[Callable[[RequestOutput], None]] = None,
                    lora_request: Optional[LoRARequest] = None,
                    mm_inputs: Optional[list[ImageInput]] = None) -> RequestStream:
        """Queue a request, with the LoRA adapter ``lora_request`` if given; returns its stream
        (see RequestStream for ``observer``).

        Raises EngineNotReadyError while loading, EngineDeadError after a failure, and
        QueueFullError when ``max_queue_len`` requests are waiting already.
        """
        self._require_info()
        if self.max_queue_len is not None and self.num_waiting >= self.max_queue_len:
            raise QueueFullError(f"{self.num_waiting} requests are waiting already "
                                 f"(--max-queue-len {self.max_queue_len})")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._processor.add_request(request_id, prompt, prompt_token_ids, params)
        link = min(self._links, key=lambda candidate: candidate.load)
        link.send(AddRequest(request_id, link.connection.client, list(prompt_token_ids), params, priority,
                             time.monotonic(), lora_request, mm_inputs=mm_inputs))
        link.added_since_stats += 1
        self._core_of[request_id] = link
        stream = RequestStream(self, request_id, observer)
        self._streams[request_id] = stream
        self.num_waiting += 1
        return stream

    def add_embedding_request(self, request_id: str, prompt_token_ids: list[int], pooling: PoolingParams,
                              priority: int = 0) -> asyncio.Future:
        """Queue an embedding request (the engine runs task embed); returns a future of its vector,
        float32 little-endian bytes. It raises ValueError when the core refuses the request
        (too long for one step, say) and EngineDeadError if the engine dies; cancel it with
        :meth:`abort`. Raises as :meth:`add_request` does."""
        self._require_info()
        if self.max_queue_len is not None and self.num_waiting >= self.max_queue_len:
            raise QueueFullError(f"{self.num_waiting} requests are waiting already "
                                 f"(--max-queue-len {self.max_queue_len})")
        if request_id in self._streams or request_id in self._embeddings:
            raise ValueError(f"request id {request_id!r} is already in use")
        link = min(self._links, key=lambda candidate: candidate.load)
        link.send(AddRequest(request_id, link.connection.client, list(prompt_token_ids), _UNUSED_SAMPLING, priority,
                             time.monotonic(), pooling=pooling))
        link.added_since_stats += 1
        self._core_of[request_id] = link
        future = asyncio.get_running_loop().create_future()
        self._embeddings[request_id] = future
        self.num_waiting += 1
        return future

    def _settle_embedding(self, request_id: str, result: bytes | BaseException | None) -> None:
        """Resolve an embedding request's future with its vector or error (None: cancel it)."""
        future = self._embeddings.pop(request_id)
        self._core_of.pop(request_id, None)
        self.num_waiting -= 1
        if not future.done():
            if result is None:
                future.cancel()
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def abort(self, request_id: str) -> None:
        """Abort a request; the core applies it before its next step, which frees its KV blocks."""
        if request_id in self._embeddings:
            link = self._core_of.get(request_id)
            self._settle_embedding(request_id, None)
            if link is not None and self.state == "ready":
                link.send(AbortRequests([request_id]))
            return
        stream = self._streams.pop(request_id, None)
        if stream is not None and stream.waiting:
            stream.waiting = False
            self.num_waiting -= 1
        link = self._core_of.pop(request_id, None)
        if self._processor is not None and self.state == "ready" and link is not None:
            ids = self._processor.abort(request_id)
            if ids:
                link.send(AbortRequests(ids))

    # -- what comes back ----------------------------------------------------------------------

    async def _load_tokenizer(self) -> None:
        try:
            source = await asyncio.to_thread(open_model, self.args.model, self.args.load_format)
        except Exception as exc:  # noqa: BLE001  (the core fails on the same model and says why; keep the first)
            self._die(EngineDeadError(f"the engine failed to start: {exc}"))
            return
        self.tokenizer = source.tokenizer
        self.model_settings = decoder_settings(source.hf_config)
        """The model's shape, to check LoRA adapters against before any request uses them."""
        self.chat_template = load_chat_template(self.args.chat_template) or source.chat_template
        if self.args.task == "embed":
            self.pooler_config = resolve_pooler_config(source.path, source.hf_config, self.args.pooler_config)
        if vision_arch(source.hf_config) is not None:
            try:
                self.image_processor = await asyncio.to_thread(ImageProcessor, source.hf_config, source.path,
                                                               self.tokenizer, self.args.image_limit)
            except ValueError as exc:
                self._die(EngineDeadError(f"the engine failed to start: {exc}"))
                return
        self._processor = OutputProcessor(self.tokenizer)
        for link in self._links:
            link.send(ClientReady(link.connection.client))

    async def _receive(self, link: _CoreLink, socket: Any) -> None:
        try:
            while True:
                message = decode_from_core(await socket.recv(copy=True))
                if isinstance(message, StepOutputs):
                    self._on_step(link, message)
                elif isinstance(message, Ready) and self.state == "loading":
                    link.model_info = message
                    if all(other.model_info is not None for other in self._links):
                        self.state = "ready"
                        self._ready.set()
                elif isinstance(message, Failed):
                    prefix = "the engine failed to start" if message.while_loading else "the engine died"
                    self._die(EngineDeadError(f"{prefix}: {message.message}"))
        finally:
            socket.close(linger=0)

    def _on_step(self, link: _CoreLink, message: StepOutputs) -> None:
        link.stats = message.stats
        link.added_since_stats = 0
        processor = self._processor
        if processor is None:
            return
        for request_id, why in message.refused:
            if request_id in self._embeddings:
                self._settle_embedding(request_id, ValueError(why))
                continue
            processor.abort(request_id)
            self._deliver(request_id, ValueError(why))
        if not message.outputs:
            return
        outputs = message.outputs
        embedded = {out.request_id for out in outputs if out.request_id in self._embeddings}
        if embedded:
            for out in outputs:
                if out.request_id in embedded:
                    self._settle_embedding(out.request_id, out.embedding if out.embedding is not None
                                           else ValueError(out.error or "the request was aborted"))
            outputs = [out for out in outputs if out.request_id not in embedded]
            if not outputs:
                return
        if any(out.error is not None for out in outputs):
            outputs = self._fail(link, outputs)
        results, stopped = processor.process(outputs)
        if stopped:
            link.send(AbortRequests(stopped))
        changed = {out.request_id for out in message.outputs}
        for result in results:
            self._deliver(result.request_id, _step_delta(result, changed))

    def _fail(self, link: _CoreLink, outputs: list) -> list:
        """Fail the requests of samples the core failed (with the sample's error), aborting
        their other samples; the outputs left to process."""
        failed: set[str] = set()
        for out in outputs:
            if out.error is None:
                continue
            parent = self._processor.parent_of(out.request_id)
            if parent is None or parent in failed:
                continue
            failed.add(parent)
            siblings = [cid for cid in self._processor.abort(parent) if cid != out.request_id]
            if siblings:
                link.send(AbortRequests(siblings))
            self._deliver(parent, ValueError(out.error))
        return [out for out in outputs if out.error is None]

    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return  # aborted meanwhile
        if stream.waiting:
            stream.waiting = False
            self.num_waiting -= 1
        if isinstance(item, BaseException):
            del self._streams[request_id]
            self._core_of.pop(request_id, None)
        else:
            if item.finished:
                del self._streams[request_id]
                self._core_of.pop(request_id, None)
            if stream.observer is not None:
                stream.observer(item)
        stream._queue.put_nowait(item)

    def _core_exited(self, link: _CoreLink) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(link.connection.alive.fileno())
        # The core's Failed message, if it sent one, says more than this; give it time to arrive.
        loop.call_later(_LAST_WORDS_S, self._die, EngineDeadError("the engine core process exited unexpectedly"))

    def _die(self, exc: EngineDeadError, expected: bool = False) -> None:
        """Mark the engine dead and fail every request it holds; the first cause is kept.
        Death callbacks run unless the death was ``expected`` (a shutdown)."""
        if self.state == "dead":
            return
        self.state = "dead"
        self.error = exc
        streams, self._streams = self._streams, {}
        embeddings, self._embeddings = self._embeddings, {}
        for future in embeddings.values():
            if not future.done():
                future.set_exception(exc)
        self._core_of.clear()
        self.num_waiting = 0
        for stream in streams.values():
            stream._queue.put_nowait(exc)
        self._processor = None
        if self._ready is not None:
            self._ready.set()
        if not expected:
            for callback in self._death_callbacks:
                callback()


def _step_delta(result: RequestOutput, changed: set[str]) -> RequestOutput:
    """What one step changed in ``result``, safe to hold while the next step is processed.

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
