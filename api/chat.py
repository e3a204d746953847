"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Optional

from litestar import Request, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from runtime.engine.chat import render_chat

from .context import ServerContext
from .disconnect import unless_disconnected
from .errors import bad_request
from .generation import EnginePrompt, Generation, fit_context, sampling_params
from .logprobs import chat_logprobs
from .openapi import streaming_responses
from .protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                       ChatMessage, UsageInfo)
from .streaming import event_stream, sse
from .structured import structured_outputs

_RESPONSES, _Operation = streaming_responses(ChatCompletionResponse, ChatCompletionChunk)


def render(ctx: ServerContext, messages: list[ChatMessage], add_generation_prompt: bool,
           continue_final_message: bool) -> str:
    """The prompt text: the messages through the model's chat template (or --chat-template).

    Any failure of the template on these messages (roles out of order, a template's own
    ``raise_exception``) is the request's fault: a 400.
    """
    plain = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
    try:
        return render_chat(ctx.engine.tokenizer, plain, ctx.engine.chat_template, add_generation_prompt,
                           continue_final_message)
    except Exception as exc:  # noqa: BLE001  (jinja2 raises many types; all mean these messages do not render)
        param = "continue_final_message" if "continue_final_message" in str(exc) else "messages"
        raise bad_request(f"the chat template cannot render these messages: {exc}", param) from None


@post("/v1/chat/completions", status_code=200, responses=_RESPONSES, operation_class=_Operation,
      summary="Create a chat completion")
async def create_chat_completion(data: JSONBody[ChatCompletionRequest], request: Request,
                                 ctx: NamedDependency[ServerContext]) -> ChatCompletionResponse:
    model = ctx.resolve_model(data.model)
    engine = ctx.engine
    engine.check_ready()
    text = render(ctx, data.messages, data.add_generation_prompt, data.continue_final_message)
    prompt = EnginePrompt(text, engine.tokenizer.encode(text, add_special_tokens=False))
    if not prompt.token_ids:
        raise bad_request("the rendered messages are empty", "messages")
    max_tokens = fit_context(engine.max_model_len, len(prompt.token_ids),
                             data.max_completion_tokens or data.max_tokens, "messages")
    top_logprobs = (data.top_logprobs or 0) if data.logprobs else None
    params = sampling_params(data, engine.vocab_size, max_tokens, logprobs=top_logprobs,
                             structured=structured_outputs(data))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    gen = Generation(ctx, request_id, [prompt], [params], data.priority, ctx.lora.get(model))
    if data.stream:
        return event_stream(_chunks(gen, data, request_id, model), gen.abort)
    (out,) = await unless_disconnected(gen.collect(), request.receive)
    choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                          logprobs=chat_logprobs(c.token_ids, c.logprobs, top_logprobs) if data.logprobs else None,
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
               for c in out.outputs]
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=UsageInfo(
        prompt_tokens=len(prompt.token_ids), completion_tokens=completion_tokens,
        total_tokens=len(prompt.token_ids) + completion_tokens))


async def _chunks(gen: Generation, data: ChatCompletionRequest, request_id: str, model: str) -> AsyncIterator[bytes]:
    created = int(time.time())
    options = data.stream_options
    prompt_tokens = len(gen.prompts[0].token_ids)
    completion_tokens = 0

    def chunk(choices: list[dict], usage: Optional[dict] = None) -> bytes:  # a ChatCompletionChunk
        return sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, "usage": usage})

    def usage() -> dict:  # a UsageInfo
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def choice(index: int, role: Optional[str], content: str, logprobs=None, finish_reason=None,
               stop_reason=None) -> dict:  # a ChatStreamChoice
        return {"index": index, "delta": {"role": role, "content": content}, "logprobs": logprobs,
                "finish_reason": finish_reason, "stop_reason": stop_reason}

    # OpenAI opens each choice with the role and empty content.
    for index in range(data.n):
        yield chunk([choice(index, "assistant", "")])
    async for _, out in gen.deltas():
        for c in out.outputs:
            completion_tokens += len(c.delta_token_ids)
            lp = None
            if data.logprobs:
                lp = chat_logprobs(c.delta_token_ids, c.delta_logprobs or [], data.top_logprobs or 0)
            if not c.delta_text and c.finish_reason is None and not (lp and lp.content):
                continue
            yield chunk([choice(c.index, None, c.delta_text, lp, c.finish_reason, c.stop_reason)],
                        usage() if options and options.continuous_usage_stats else None)
    if options and options.include_usage:
        yield chunk([], usage())
