"""What completions and chat share: sampling params from a request, the context-length check,
and the engine requests of one HTTP request, streamed or collected."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from runtime.engine.async_engine import RequestStream
from runtime.engine.outputs import CompletionOutput, RequestOutput
from runtime.lora import LoRARequest
from runtime.multimodal.inputs import ImageInput
from runtime.sample.params import SamplingParams, StructuredOutputsParams

from .context import ServerContext
from .errors import bad_request, from_value_error
from .metrics import RequestTimer
from .protocol import SamplingFields


_PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass
class EnginePrompt:
    text: Optional[str]
    """None when the client sent token ids."""
    token_ids: list[int]
    mm_inputs: Optional[list[ImageInput]] = None
    """The prompt's preprocessed images (a vision-language model)."""


def fit_context(max_model_len: int, prompt_len: int, max_tokens: Optional[int], what: str) -> int:
    """``max_tokens`` if the prompt and it fit the context (None: what is left of it); else a 400 with the numbers."""
    if prompt_len >= max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens, but the {what} has "
                          f"{prompt_len} tokens; shorten the {what} to fewer than {max_model_len} tokens.", what)
    if max_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                          f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                          f"completion). Please reduce the length of the {what} or completion.", "max_tokens")
    return max_tokens


def check_priority(ctx: ServerContext, priority: int) -> None:
    """A 400 for a priority the scheduler would ignore (as vLLM answers)."""
    if priority and ctx.engine.args.scheduling_policy != "priority":
        raise bad_request(f"priority {priority} needs the server started with --scheduling-policy priority; "
                          "this one schedules first come, first served", "priority")


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    if token_ids and max(token_ids) >= vocab_size:
        raise bad_request(f"{param} holds token id {max(token_ids)}, outside the vocabulary [0, {vocab_size})", param)


def sampling_params(req: SamplingFields, vocab_size: int, max_tokens: int, logprobs: Optional[int] = None,
                    prompt_logprobs: Optional[int] = None,
                    structured: Optional[StructuredOutputsParams] = None) -> SamplingParams:
    """The engine's SamplingParams for ``req``; invalid combinations are a 400 naming the field.
    ``structured``: the output's constraint (see api/structured.py), already checked."""
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        # Its length first: Python refuses to read an integer of over 4300 digits.
        if not (key.isascii() and key.isdigit()) or len(key) > len(str(vocab_size)) or int(key) >= vocab_size:
            shown = key if len(key) <= 24 else key[:24] + "..."
            raise bad_request(f"logit_bias key {shown!r} is not a token id in [0, {vocab_size})", "logit_bias")
        bias[int(key)] = value
    check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty, seed=req.seed,
            stop=[] if req.stop is None else req.stop, stop_token_ids=req.stop_token_ids or [],
            include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos,
            max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            logit_bias=bias, skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens, structured_outputs=structured)
    except ValueError as exc:
        raise from_value_error(exc, _PARAM_FIELDS) from None


class Generation:
    """The engine requests of one HTTP request: one per prompt, each with its n samples.

    Submitting is all or nothing: if the engine refuses one prompt (queue full, not ready) the
    ones already queued are aborted. ``abort()`` is idempotent and ends whatever is unfinished.
    """

    def __init__(self, ctx: ServerContext, request_id: str, prompts: list[EnginePrompt],
                 params: list[SamplingParams], priority: int, lora_request: Optional[LoRARequest] = None):
        if ctx.engine.pooler_config is not None:
            raise bad_request("this server runs --task embed: it serves /v1/embeddings, not completions; serve the "
                              "model without --task embed to generate")
        check_priority(ctx, priority)
        self.prompts = prompts
        self.streams: list[RequestStream] = []
        self.timers: list[RequestTimer] = []
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                timer = ctx.metrics.request()
                self.timers.append(timer)
                self.streams.append(ctx.engine.add_request(rid, prompt.text, prompt.token_ids, sp, priority,
                                                           observer=timer.observe, lora_request=lora_request,
                                                           mm_inputs=prompt.mm_inputs))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for stream in self.streams:
            stream.abort()

    async def deltas(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every prompt's outputs as they come, as (prompt index, output); aborts on early exit."""
        if len(self.streams) == 1:
            # One prompt (chat, most completions): read its stream directly, no pump in between.
            try:
                async for out in self.streams[0]:
                    yield 0, out
            finally:
                self.abort()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((index, out, None))
                queue.put_nowait((index, None, None))
            except Exception as exc:  # noqa: BLE001  (handed to the consumer, which raises it)
                queue.put_nowait((index, None, exc))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                index, out, exc = await queue.get()
                if exc is not None:
                    raise exc
                if out is None:
                    remaining -= 1
                    continue
                yield index, out
        finally:
            for task in tasks:
                task.cancel()
            self.abort()

    async def collect(self) -> list[RequestOutput]:
        """Each prompt's finished output: every sample's cumulative text, tokens and logprobs."""
        samples: list[dict[int, CompletionOutput]] = [{} for _ in self.prompts]
        results: list[Optional[RequestOutput]] = [None] * len(self.prompts)
        async for index, out in self.deltas():
            samples[index].update((c.index, c) for c in out.outputs if c.finish_reason is not None)
            if out.finished:
                results[index] = out
        return [RequestOutput(out.request_id, out.prompt, out.prompt_token_ids,
                              [done[i] for i in sorted(done)], finished=True, prompt_logprobs=out.prompt_logprobs)
                for out, done in zip(results, samples)]
