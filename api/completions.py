"""POST /v1/completions."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Optional

from litestar import Request, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from .context import ServerContext
from .disconnect import unless_disconnected
from .errors import bad_request
from .generation import EnginePrompt, Generation, check_token_ids, fit_context, sampling_params
from .logprobs import completion_logprobs
from .openapi import streaming_responses
from .protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest, CompletionResponse,
                       UsageInfo)
from .streaming import event_stream, sse
from .structured import structured_outputs

_RESPONSES, _Operation = streaming_responses(CompletionResponse, CompletionChunk)


async def _prompts(data: CompletionRequest, ctx: ServerContext) -> list[EnginePrompt]:
    prompt = data.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    engine = ctx.engine
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            ids = await engine.encode(item, data.add_special_tokens)
            prompts.append(EnginePrompt(item, ids))
        else:
            check_token_ids(item, engine.vocab_size, "prompt")
            prompts.append(EnginePrompt(None, list(item)))
        if not prompts[-1].token_ids:
            raise bad_request("prompt is empty: give at least one token", "prompt")
    return prompts


class _Echo:
    """What ``echo`` prepends to a prompt's choices: its text and, with logprobs, its logprobs."""

    def __init__(self, data: CompletionRequest, ctx: ServerContext, prompts: list[EnginePrompt]):
        self.enabled = data.echo
        self.logprobs = data.logprobs is not None
        self.tokenizer = ctx.engine.tokenizer
        self.texts = [p.text if p.text is not None else self.tokenizer.decode(p.token_ids) for p in prompts] \
            if data.echo else ["" for _ in prompts]
        self.prompts = prompts

    def logprobs_of(self, index: int, prompt_logprobs) -> CompletionLogprobs:
        return completion_logprobs(self.tokenizer, self.prompts[index].token_ids, prompt_logprobs or [])


def _join(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)


@post("/v1/completions", status_code=200, responses=_RESPONSES, operation_class=_Operation,
      summary="Create a completion")
async def create_completion(data: JSONBody[CompletionRequest], request: Request,
                            ctx: NamedDependency[ServerContext]) -> CompletionResponse:
    model = ctx.resolve_model(data.model)
    engine = ctx.engine
    engine.check_ready()
    prompts = await _prompts(data, ctx)
    logprobs = data.logprobs
    structured = structured_outputs(data)
    params = [sampling_params(data, engine.vocab_size,
                              fit_context(engine.max_model_len, len(p.token_ids), data.max_tokens, "prompt"),
                              logprobs=logprobs, prompt_logprobs=logprobs if data.echo else None,
                              structured=structured)
              for p in prompts]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    gen = Generation(ctx, request_id, prompts, params, data.priority, ctx.lora.get(model))
    echo = _Echo(data, ctx, prompts)
    if data.stream:
        return event_stream(_chunks(gen, data, echo, request_id, model), gen.abort)
    outputs = await unless_disconnected(gen.collect(), request.receive)
    choices = []
    for i, out in enumerate(outputs):
        for c in out.outputs:
            text = echo.texts[i] + c.text
            lp = None
            if logprobs is not None:
                lp = completion_logprobs(echo.tokenizer, c.token_ids, c.logprobs, len(echo.texts[i]))
                if echo.enabled:
                    lp = _join(echo.logprobs_of(i, out.prompt_logprobs), lp)
            choices.append(CompletionChoice(index=i * data.n + c.index, text=text, logprobs=lp,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return CompletionResponse(id=request_id, model=model, choices=choices,
                              usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens))


async def _chunks(gen: Generation, data: CompletionRequest, echo: _Echo, request_id: str,
                  model: str) -> AsyncIterator[bytes]:
    created = int(time.time())
    options = data.stream_options
    prompt_tokens = sum(len(p.token_ids) for p in gen.prompts)
    completion_tokens = 0
    offsets: dict[int, int] = {}  # choice index -> characters sent so far

    def chunk(choices: list[dict], usage: Optional[dict] = None) -> bytes:  # a CompletionChunk
        return sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                    "choices": choices, "usage": usage})

    def usage() -> dict:  # a UsageInfo
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async for i, out in gen.deltas():
        for c in out.outputs:
            if not c.delta_token_ids and c.finish_reason is None:
                continue  # prefill progress: the prompt logprobs may not be complete yet
            completion_tokens += len(c.delta_token_ids)
            index = i * data.n + c.index
            text = c.delta_text
            lp = None
            first = index not in offsets
            if first:
                offsets[index] = 0
                text = echo.texts[i] + text
            if data.logprobs is not None:
                lp = completion_logprobs(echo.tokenizer, c.delta_token_ids, c.delta_logprobs or [],
                                         offsets[index] + (len(echo.texts[i]) if first else 0))
                if first and echo.enabled:
                    lp = _join(echo.logprobs_of(i, out.prompt_logprobs), lp)
            offsets[index] += len(text)
            if not text and c.finish_reason is None and not (lp and lp.tokens):
                continue
            yield chunk([{"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                          "stop_reason": c.stop_reason}],
                        usage() if options and options.continuous_usage_stats else None)
    if options and options.include_usage:
        yield chunk([], usage())
