"""Every failure becomes OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``,
with the right status. Nothing reaches the client as a traceback or as the framework's own shape."""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Optional

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from runtime.engine.async_engine import EngineDeadError, EngineNotReadyError, QueueFullError

from .disconnect import ClientDisconnected
from .protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("runtime.api")

RETRY_AFTER_S = "1"
_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 503: "server_error"}
# Pydantic names the union branch an error came from ("prompt.list[int].0", "content.str"): not a field.
_BRANCH = re.compile(r"^(str|int|float|bool|constrained-\w+|list\[.*\]|dict\[.*\]|literal\[.*\]|[A-Z]\w*|function-\w+\[.*\])$")


class APIError(Exception):
    """An error with its OpenAI fields; raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _error_type(status)
        self.headers = headers or {}


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param)


def from_value_error(exc: ValueError, fields: Iterable[str] = ()) -> APIError:
    """A 400 for ``exc``; ``param`` is its first word when that is one of ``fields``
    (SamplingParams raises ValueError starting with the field it rejects)."""
    message = str(exc)
    first = message.split(" ", 1)[0]
    return bad_request(message, first if first in fields else None)


def _error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_response(error: APIError) -> Response:
    body = ErrorResponse(error=ErrorInfo(message=error.message, type=error.type, param=error.param, code=error.code))
    return Response(body, status_code=error.status, headers=error.headers)


def error_body(error: APIError) -> dict[str, Any]:
    """The error as a JSON-ready dict (for a server-sent event after a stream has started)."""
    return ErrorResponse(error=ErrorInfo(message=error.message, type=error.type, param=error.param,
                                         code=error.code)).model_dump()


def as_api_error(exc: BaseException) -> APIError:
    """Map an exception to the error the client sees; unknown ones are logged with their traceback."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(503, f"the server is overloaded: {exc}; retry later", code="overloaded",
                        headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, str(exc), code="model_loading", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    if isinstance(exc, ValueError):
        return from_value_error(exc)
    if isinstance(exc, ClientDisconnected):
        # Its generation is already aborted; nobody is there to read the answer.
        logger.info("%s before the response was ready; its generation was aborted", exc)
        return APIError(499, str(exc), code="client_disconnected")
    if isinstance(exc, RecursionError) and "deserializing" in str(exc):
        # msgspec's own limit, met while the body is parsed (JSON nested thousands of levels deep).
        return bad_request(f"the request body is not valid JSON: it is nested too deeply ({exc})")
    logger.error("unexpected error", exc_info=exc)
    return APIError(500, "internal server error; the server log has the details", code="internal_error")


def _validation_error(request: Request, exc: ValidationException) -> Response:
    problems = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        key = item.get("key") if isinstance(item, dict) else None
        message = str(item.get("message", "")) if isinstance(item, dict) else str(item)
        message = message.removeprefix("Value error, ")
        field = ".".join(part for part in str(key).split(".") if not _BRANCH.match(part)) if key else None
        field, message = _field_a_model_check_names(field, message)
        if field == "data" and item.get("source") == "body":
            return error_response(bad_request("the request body must be a JSON object"))
        problems.append((field or None, message))
    if not problems:
        return error_response(bad_request(exc.detail or "invalid request"))
    problems = _without_other_branches(problems)
    param = problems[0][0]
    # A union reports one error per branch for the same field; keep the first few distinct lines.
    lines = list(dict.fromkeys(f"{field}: {message}" if field else message for field, message in problems))
    return error_response(bad_request("; ".join(lines[:3]), param))


def _field_a_model_check_names(field: Optional[str], message: str) -> tuple[Optional[str], str]:
    """A check across a model's fields (``best_of`` against ``n``) is reported at the model, not a
    field; its message begins with the field it rejects and a colon, which become the ``param``."""
    first, _, rest = message.partition(": ")
    if not rest or not first.isidentifier():
        return field, message
    if field and field.rsplit(".", 1)[-1] == first:
        return field, rest
    return (f"{field}.{first}" if field else first), rest


def _without_other_branches(problems: list[tuple[Optional[str], str]]) -> list[tuple[Optional[str], str]]:
    """Drop "Input should be a valid ..." of a union's other branches where the value took one
    branch and broke a rule inside it (``stop``: a list with a string too long is not about strings)."""
    def within(field: Optional[str], other: Optional[str]) -> bool:
        return field is not None and other is not None and (other == field or other.startswith(field + "."))

    specific = [f for f, m in problems if not m.startswith("Input should be a valid")]
    return [(f, m) for f, m in problems
            if not (m.startswith("Input should be a valid") and any(within(f, s) for s in specific))] or problems


def _http_error(request: Request, exc: HTTPException) -> Response:
    detail = exc.detail
    if exc.status_code == 400 and "JSON" in detail:
        detail = f"the request body is not valid JSON: {detail}"
    if exc.status_code == 413:
        detail = (f"the request body is over this server's limit of {request.app.request_max_body_size} bytes; "
                  "send less, or start the server with a larger --max-request-body-bytes")
    headers = dict(exc.headers or {})
    return error_response(APIError(exc.status_code, detail, headers=headers))


def _other_error(request: Request, exc: Exception) -> Response:
    return error_response(as_api_error(exc))


def _api_error(request: Request, exc: APIError) -> Response:
    return error_response(exc)


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    APIError: _api_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    Exception: _other_error,
}
