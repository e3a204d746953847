"""One streaming completion request against an OpenAI-compatible server, timed chunk by chunk.

The body is the OpenAI ``/v1/completions`` protocol plus the extras vLLM's benchmark sends:
``ignore_eos`` (vLLM, runtime) and ``min_tokens`` (also llama-cpp-python's server) so every
server generates the requested length, and ``stream_options`` with ``include_usage`` (the
final usage chunk) and ``continuous_usage_stats`` (a running usage in every chunk, which tells
how many tokens each chunk carries). Servers that do not know an extra ignore it; without
running usage each chunk counts as one token unless it only closes the stream (no text, a
finish reason), as llama-cpp-python streams one chunk per token (but one chunk for the tokens
of one multi-byte character), and a final usage, when one comes, corrects the total.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, AsyncIterator, Optional

import httpx

from .datasets import BenchRequest
from .metrics import RequestRecord

_SSE_BREAK = re.compile(r"\r\n|\r|\n")


def completion_body(model: str, request: BenchRequest, ignore_eos: bool, temperature: float = 0.0) -> dict[str, Any]:
    """The JSON body of a streaming completion for ``request``."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = request.output_len
    return body


def _chunk_tokens(chunk: dict[str, Any], seen: int) -> tuple[int, str, bool]:
    """(new tokens, new text, whether running usage counted them) in one SSE chunk, given
    ``seen`` tokens so far."""
    choices = chunk.get("choices") or []
    text = "".join(c.get("text") or "" for c in choices)
    usage = chunk.get("usage")
    if usage and choices:
        return usage["completion_tokens"] - seen, text, True
    # One token a chunk, except a chunk that only closes the stream. A server that holds back a
    # token whose character is incomplete and sends it with the next one is undercounted by one.
    closing = any(c.get("finish_reason") for c in choices)
    return (1 if choices and (text or not closing) else 0), text, False


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of a server-sent event stream, split where SSE splits them (CR, LF, CRLF) and
    nowhere else: httpx's ``aiter_lines`` also splits at U+2028 and the like, which JSON may
    carry raw inside a chunk."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        *lines, buffer = _SSE_BREAK.split(buffer)
        for line in lines:
            yield line
    if buffer:
        yield buffer


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                            prompt_len: int, headers: Optional[dict[str, str]] = None) -> RequestRecord:
    """Send ``body`` to ``url`` and time its stream; failures come back as a record, not an exception."""
    record = RequestRecord(prompt_len=prompt_len)
    start = last = time.perf_counter()
    texts: list[str] = []
    running_usage = False
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:500]
                record.error = f"HTTP {response.status_code}: {detail}"
                return record
            async for line in sse_lines(response):
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = f"error event: {chunk['error']}"
                    return record
                tokens, text, counted = _chunk_tokens(chunk, record.output_tokens)
                running_usage = running_usage or counted
                texts.append(text)
                if chunk.get("usage") and not chunk.get("choices"):
                    record.usage = chunk["usage"]
                if tokens <= 0:
                    continue
                if record.chunks == 0:
                    record.ttft = now - start
                else:
                    record.itl.append(now - last)
                last = now
                record.chunks += 1
                record.output_tokens += tokens
        record.latency = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    record.text = "".join(texts)
    if record.usage:
        record.prompt_len = record.usage.get("prompt_tokens") or record.prompt_len
        if not running_usage:
            record.output_tokens = record.usage.get("completion_tokens", record.output_tokens)
    record.success = record.chunks > 0
    if not record.success:
        record.error = "the stream carried no generated token"
    return record
