"""Server-sent events as OpenAI sends them: ``data: {json}\\n\\n`` per chunk, then ``data: [DONE]``."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Union

import msgspec
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream
from pydantic import BaseModel

from .errors import as_api_error, error_body

DONE = b"data: [DONE]\n\n"


# JSON may carry these raw, but many clients split lines as str.splitlines() does (httpx's
# aiter_lines among them), which breaks an event in two at each: send them escaped.
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def _builtins(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    raise NotImplementedError(f"cannot encode {type(obj).__name__} as JSON")


_json = msgspec.json.Encoder(enc_hook=_builtins)


def sse(payload: Union[BaseModel, dict[str, Any]]) -> bytes:
    """One event. Chunks are built as dicts shaped like protocol.py's models and encoded by msgspec:
    pydantic's validation and dump cost several times more, once per streamed token."""
    body = payload.model_dump_json().encode() if isinstance(payload, BaseModel) else _json.encode(payload)
    for raw, escaped in _LINE_BREAKS:
        if raw in body:
            body = body.replace(raw, escaped)
    return b"data: " + body + b"\n\n"


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
