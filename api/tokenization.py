"""POST /tokenize and /detokenize (vLLM's extra endpoints)."""

from __future__ import annotations

from litestar import post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from .chat import render
from .context import ServerContext
from .generation import check_token_ids
from .openapi import ERROR_RESPONSES
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse


@post("/tokenize", status_code=200, responses=ERROR_RESPONSES, summary="Tokenize a prompt or chat messages")
async def tokenize(data: JSONBody[TokenizeRequest], ctx: NamedDependency[ServerContext]) -> TokenizeResponse:
    ctx.resolve_model(data.model)
    engine = ctx.engine
    engine.check_ready()
    if data.messages is not None:
        tools = [tool.model_dump(exclude_none=True) for tool in data.tools] if data.tools else None
        text = render(ctx, data.messages, data.add_generation_prompt, data.continue_final_message, tools)
        add_special = bool(data.add_special_tokens)
    else:
        text = data.prompt
        add_special = data.add_special_tokens is not False
    tokens = await engine.encode(text, add_special)
    strs = engine.tokenizer.convert_ids_to_tokens(tokens) if data.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens, token_strs=strs)


@post("/detokenize", status_code=200, responses=ERROR_RESPONSES, summary="Turn token ids back into text")
async def detokenize(data: JSONBody[DetokenizeRequest], ctx: NamedDependency[ServerContext]) -> DetokenizeResponse:
    ctx.resolve_model(data.model)
    engine = ctx.engine
    engine.check_ready()
    check_token_ids(data.tokens, engine.vocab_size, "tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(data.tokens))
