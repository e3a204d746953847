"""Server-sent events as OpenAI sends them: ``data: {json}\\n\\n`` per chunk, then ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable, Union

from litestar.background_tasks import BackgroundTask
from litestar.response import Stream
from pydantic import BaseModel

from .errors import as_api_error, error_body

DONE = b"data: [DONE]\n\n"


def sse(payload: Union[BaseModel, dict[str, Any]]) -> bytes:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + body.encode() + b"\n\n"


async def with_done(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` then ``[DONE]``; an error after the stream started becomes an error event first."""
    try:
        async for chunk in chunks:
            yield chunk
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001  (the status line is sent: report it in the stream)
        yield sse(error_body(as_api_error(exc)))
    yield DONE


def event_stream(chunks: AsyncIterator[bytes], on_close: Callable[[], None]) -> Stream:
    """The streaming response. ``on_close`` runs once the response ends, however it ends (a
    disconnect cancels the stream while it may be parked outside the generator)."""
    return Stream(with_done(chunks), status_code=200, media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                  background=BackgroundTask(on_close))
