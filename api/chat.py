"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Optional

from litestar import Request, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from runtime.engine.chat import render_chat
from runtime.engine.outputs import CompletionOutput
from runtime.multimodal.chat import render_with_images
from runtime.multimodal.inputs import ImageInput
from runtime.multimodal.media import MediaError, load_image
from runtime.tools import MessageStream

from .chat_tools import ChatPlan, delta_rounds, finish_reason, response_calls
from .context import ServerContext
from .disconnect import unless_disconnected
from .errors import bad_request
from .generation import EnginePrompt, Generation, fit_context, sampling_params
from .logprobs import chat_logprobs
from .openapi import streaming_responses
from .protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                       ChatLogprobs, ChatMessage, UsageInfo)
from .streaming import event_stream, sse
from .structured import structured_outputs

_RESPONSES, _Operation = streaming_responses(ChatCompletionResponse, ChatCompletionChunk)


def render(ctx: ServerContext, messages: list[ChatMessage], add_generation_prompt: bool,
           continue_final_message: bool, tools: Optional[list[dict[str, Any]]] = None, num_images: int = 0) -> str:
    """The prompt text: the messages (and tools) through the model's chat template (or --chat-template),
    with one image placeholder per image part (runtime.multimodal.chat).

    Any failure of the template on these messages (roles out of order, a template's own
    ``raise_exception``) is the request's fault: a 400.
    """
    plain = [m.template_fields() for m in messages]

    def through_template(msgs: list[dict[str, Any]]) -> str:
        return render_chat(ctx.engine.tokenizer, msgs, ctx.engine.chat_template, add_generation_prompt,
                           continue_final_message, tools, ctx.parsing.tool_call_parser)

    try:
        if num_images:
            return render_with_images(through_template, plain, num_images, ctx.engine.image_processor.placeholder)
        return through_template(plain)
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
    plan = ctx.parsing.plan(data)
    urls = [url for message in data.messages for url in message.image_urls()]
    if urls and engine.image_processor is None:
        raise bad_request(f"the model `{model}` takes no images: send text content only", "messages")
    text = render(ctx, data.messages, data.add_generation_prompt, data.continue_final_message, plan.prompt_tools(),
                  len(urls))
    token_ids = await engine.encode(text, False)
    images = await _images(ctx, token_ids, urls) if engine.image_processor is not None else None
    prompt = EnginePrompt(text, images[0] if images else token_ids, (images[1] or None) if images else None)
    if not prompt.token_ids:
        raise bad_request("the rendered messages are empty", "messages")
    max_tokens = fit_context(engine.max_model_len, len(prompt.token_ids),
                             data.max_completion_tokens or data.max_tokens, "messages")
    top_logprobs = (data.top_logprobs or 0) if data.logprobs else None
    params = sampling_params(data, engine.vocab_size, max_tokens, logprobs=top_logprobs,
                             structured=structured_outputs(data))
    plan.constrain(params)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    gen = Generation(ctx, request_id, [prompt], [params], data.priority, ctx.lora.get(model))
    if data.stream:
        return event_stream(_chunks(gen, data, plan, request_id, model), gen.abort)
    (out,) = await unless_disconnected(gen.collect(), request.receive)
    choices = [_choice(plan, c, chat_logprobs(c.token_ids, c.logprobs, top_logprobs) if data.logprobs else None)
               for c in out.outputs]
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=UsageInfo(
        prompt_tokens=len(prompt.token_ids), completion_tokens=completion_tokens,
        total_tokens=len(prompt.token_ids) + completion_tokens))


async def _images(ctx: ServerContext, token_ids: list[int], urls: list[str]) -> tuple[list[int], list[ImageInput]]:
    """The prompt's images loaded and preprocessed (off the event loop): the token ids with
    their placeholders expanded, and the images; any bad image is a 400 saying why."""
    engine = ctx.engine
    processor = engine.image_processor
    if len(urls) > processor.limit:
        raise bad_request(f"{len(urls)} images in one request, at most {processor.limit} are accepted "
                          f"(--limit-mm-per-prompt)", "messages")

    def prepare() -> tuple[list[int], list[ImageInput]]:
        return processor.process(token_ids, [load_image(url, engine.media_policy) for url in urls])

    try:
        # Without images only the placeholders are checked (a stray one is an error): no thread needed.
        return await asyncio.to_thread(prepare) if urls else prepare()
    except MediaError as exc:
        raise bad_request(str(exc), "messages") from None


def _choice(plan: ChatPlan, output: CompletionOutput, logprobs: Optional[ChatLogprobs]) -> ChatChoice:
    """A finished sample as a choice, its text split by the request's parsers."""
    message = AssistantMessage(content=output.text)
    calls = []
    if plan.parses:
        parts = plan.stream().message(output.text)
        calls = parts.tool_calls
        message = AssistantMessage(content=parts.content, reasoning_content=parts.reasoning,
                                   tool_calls=response_calls(calls))
    return ChatChoice(index=output.index, message=message, logprobs=logprobs,
                      finish_reason=finish_reason(output.finish_reason, calls), stop_reason=output.stop_reason)


async def _chunks(gen: Generation, data: ChatCompletionRequest, plan: ChatPlan, request_id: str,
                  model: str) -> AsyncIterator[bytes]:
    created = int(time.time())
    options = data.stream_options
    prompt_tokens = len(gen.prompts[0].token_ids)
    completion_tokens = 0
    streams = {index: plan.stream() for index in range(data.n)} if plan.parses else {}
    reasoning = plan.parsing.reasoning_parser is not None

    def chunk(choices: list[dict], usage: Optional[dict] = None) -> bytes:  # a ChatCompletionChunk
        return sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, "usage": usage})

    def usage() -> dict:  # a UsageInfo
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def choice(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs,  # a ChatStreamChoice
                "finish_reason": finish_reason, "stop_reason": stop_reason}

    # OpenAI opens each choice with the role and empty content.
    for index in range(data.n):
        yield chunk([choice(index, {"role": "assistant", "content": ""})])
    async for _, out in gen.deltas():
        for c in out.outputs:
            completion_tokens += len(c.delta_token_ids)
            lp = None
            if data.logprobs:
                lp = chat_logprobs(c.delta_token_ids, c.delta_logprobs or [], data.top_logprobs or 0)
            reason = c.finish_reason
            deltas = [{"role": None, "content": c.delta_text}] if c.delta_text else []
            stream = streams.get(c.index)
            if stream is not None:
                deltas = _parsed_deltas(stream, c.delta_text, reason is not None, reasoning)
                reason = finish_reason(reason, stream.tool_calls)
            if not deltas and reason is None and not (lp and lp.content):
                continue
            deltas = deltas or [{"role": None, "content": ""}]
            step_usage = usage() if options and options.continuous_usage_stats else None
            for number, delta in enumerate(deltas):
                last = number == len(deltas) - 1
                yield chunk([choice(c.index, delta, lp if number == 0 else None, reason if last else None,
                                    c.stop_reason if last else None)], step_usage)
    if options and options.include_usage:
        yield chunk([], usage())


def _parsed_deltas(stream: MessageStream, text: str, finished: bool, reasoning: bool) -> list[dict]:
    """One step's new text, split: the DeltaMessage dicts to send, in order (none if nothing is
    ready). A call's pieces go in consecutive deltas (delta_rounds)."""
    parts = stream.feed(text)
    if finished:
        parts.add(stream.finish())
    rounds = delta_rounds(parts.tool_calls)
    if not (parts.content or parts.reasoning or rounds):
        return []
    first: dict = {"role": None, "content": parts.content or None}
    if reasoning:
        first["reasoning_content"] = parts.reasoning or None
    if rounds:
        first["tool_calls"] = rounds[0]
    return [first] + [{"role": None, "content": None, "tool_calls": more} for more in rounds[1:]]
