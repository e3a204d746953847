"""Noticing that a client hung up on a non-streaming request, so its generation can be aborted.

Once the request body has been read, the ASGI receive channel yields nothing until the client
disconnects, when it yields ``http.disconnect``. (Streaming responses need no help: Litestar
cancels the stream when that message arrives, and the generator's cleanup aborts.)
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from litestar.types import Receive

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def _disconnected(receive: Receive) -> None:
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001  (a broken channel means nobody is there to answer)
        return


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Await ``work``; if the client hangs up first, cancel it and raise ClientDisconnected.

    ``work`` is cancelled too when the caller is (server shutdown), and awaited either way, so
    its cleanup (aborting engine requests) has run when this returns or raises.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected("the client disconnected")
    return task.result()
