"""``--api-key``: every route except the open ones needs ``Authorization: Bearer <key>``.

Checked in an ASGI middleware, before routing and before the body is read or validated, so an
unauthenticated client learns nothing about the server or the request it sent. The comparison
is constant-time and the key is never logged.
"""

from __future__ import annotations

import hmac
import json

from litestar.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health", "/version", "/metrics", "/openapi.json"})
"""Probes, monitoring and the schema stay reachable without a key."""

_UNAUTHORIZED = json.dumps({"error": {
    "message": "missing or invalid API key: send the header `Authorization: Bearer <key>`",
    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()


def api_key_middleware(api_key: str):
    """An ASGI middleware factory (Litestar's ``middleware=[...]``) that requires ``api_key``."""
    expected = f"Bearer {api_key}".encode()

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
                await app(scope, receive, send)
                return
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if hmac.compare_digest(given, expected):
                await app(scope, receive, send)
                return
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                (b"content-length", str(len(_UNAUTHORIZED)).encode())]})
            await send({"type": "http.response.body", "body": _UNAUTHORIZED})

        return middleware

    return factory
