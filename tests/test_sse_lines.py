"""Server-sent events survive text with Unicode line separators: the server escapes them (clients
that split lines like str.splitlines still see one event), and the benchmark client splits only
where the SSE format does (so a server that sends them raw is read right too)."""

from __future__ import annotations

import asyncio
import json

import httpx

from runtime.api.streaming import sse
from runtime.bench.client import sse_lines

AWKWARD = "a\u2028b\u2029c\x85d\ne\rf\u00e9\U0001F600"


def test_an_event_is_one_line_whatever_its_text():
    event = sse({"text": AWKWARD})
    lines = event.decode().splitlines()
    assert lines[1:] == [""] and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:]) == {"text": AWKWARD}


def test_the_benchmark_client_splits_only_at_sse_line_ends():
    raw = ('data: ' + json.dumps({"text": AWKWARD}, ensure_ascii=False) + '\r\n\r\ndata: [DONE]\n\n').encode()

    def handler(request):
        # One byte a chunk: every line end and character straddles chunk boundaries.
        return httpx.Response(200, stream=_Trickle(raw))

    async def read():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            async with client.stream("GET", "http://test/") as response:
                return [line async for line in sse_lines(response)]

    lines = [line for line in asyncio.run(read()) if line]
    assert len(lines) == 2 and lines[1] == "data: [DONE]"
    assert json.loads(lines[0][6:]) == {"text": AWKWARD}


class _Trickle(httpx.AsyncByteStream):
    def __init__(self, data: bytes):
        self.data = data

    async def __aiter__(self):
        for i in range(len(self.data)):
            yield self.data[i:i + 1]
