"""POST /v1/embeddings (servers started with --task embed)."""

from __future__ import annotations

import asyncio
import base64
import uuid

import numpy as np
from litestar import Request, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from runtime.pooling import PoolingParams

from .context import ServerContext
from .disconnect import unless_disconnected
from .embedding_protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse
from .errors import bad_request, from_value_error
from .generation import check_priority, check_token_ids
from .openapi import ERROR_RESPONSES
from .protocol import UsageInfo


async def _inputs(data: EmbeddingRequest, ctx: ServerContext) -> list[list[int]]:
    """Each input's token ids; a 400 for an empty input or one longer than the context."""
    items = data.input
    if isinstance(items, str) or (items and isinstance(items[0], int)):
        items = [items]
    if not items:
        raise bad_request("input must not be empty", "input")
    engine = ctx.engine
    token_ids = []
    for item in items:
        if isinstance(item, str) and not item:
            raise bad_request("input holds an empty string: give at least one character each", "input")
        ids = await engine.encode(item, data.add_special_tokens) if isinstance(item, str) else list(item)
        check_token_ids(ids, engine.vocab_size, "input")
        if not ids:
            raise bad_request("input holds an empty token list: give at least one token each", "input")
        if len(ids) > engine.max_model_len:
            raise bad_request(f"This model's maximum context length is {engine.max_model_len} tokens, but an input "
                              f"has {len(ids)} tokens; shorten it.", "input")
        token_ids.append(ids)
    return token_ids


async def _embed_all(ctx: ServerContext, request_id: str, token_ids: list[list[int]], pooling: PoolingParams,
                     priority: int) -> list[bytes]:
    """Every input's vector; queued all or none, and aborted together if one fails or the caller goes away."""
    engine = ctx.engine
    ids = [request_id if len(token_ids) == 1 else f"{request_id}-{i}" for i in range(len(token_ids))]
    futures = []
    try:
        for rid, ids_of in zip(ids, token_ids):
            futures.append(engine.add_embedding_request(rid, ids_of, pooling, priority))
        return list(await asyncio.gather(*futures))
    finally:
        for rid, future in zip(ids, futures):
            if not future.done():
                engine.abort(rid)


@post("/v1/embeddings", status_code=200, responses=ERROR_RESPONSES, summary="Create embeddings")
async def create_embeddings(data: JSONBody[EmbeddingRequest], request: Request,
                            ctx: NamedDependency[ServerContext]) -> EmbeddingResponse:
    model = ctx.resolve_model(data.model)
    engine = ctx.engine
    engine.check_ready()
    if engine.pooler_config is None:
        raise bad_request("this server generates text: /v1/embeddings needs a server started with --task embed "
                          "(or --runner pooling)")
    pooling = PoolingParams(dimensions=data.dimensions, use_activation=data.use_activation)
    try:
        engine.pooler_config.spec(pooling)
    except ValueError as exc:
        raise from_value_error(exc, {"dimensions"}) from None
    check_priority(ctx, data.priority)
    token_ids = await _inputs(data, ctx)
    request_id = f"embd-{uuid.uuid4().hex}"
    timer = ctx.metrics.request()
    vectors = await unless_disconnected(_embed_all(ctx, request_id, token_ids, pooling, data.priority),
                                        request.receive)
    timer.embedded(sum(len(ids) for ids in token_ids), len(token_ids))
    if data.encoding_format == "base64":
        encoded = [base64.b64encode(vector).decode("ascii") for vector in vectors]
    else:
        encoded = [np.frombuffer(vector, "<f4").tolist() for vector in vectors]
    prompt_tokens = sum(len(ids) for ids in token_ids)
    return EmbeddingResponse(id=request_id, model=model,
                             data=[EmbeddingData(index=i, embedding=e) for i, e in enumerate(encoded)],
                             usage=UsageInfo(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))
