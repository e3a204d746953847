"""What the generated OpenAPI schema adds to the handlers' own types: the error responses and
the streaming variant."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import OpenAPIMediaType, Operation, Reference

from runtime import __version__

from .protocol import ErrorResponse

ERROR_RESPONSES = {
    status: ResponseSpec(data_container=ErrorResponse, description=description, generate_examples=False)
    for status, description in (
        (400, "Malformed JSON, a schema violation (``param`` names the field), an unsupported parameter, "
              "or a prompt that does not fit the context."),
        (401, "Missing or wrong API key (with --api-key)."),
        (404, "Unknown model."),
        (503, "Loading, overloaded (with Retry-After) or the engine died."),
    )
}

STREAM_DESCRIPTION = ("With `stream: true` the response is `text/event-stream`: `data: <chunk JSON>` events, "
                      "then `data: [DONE]`.")


def openapi_config() -> OpenAPIConfig:
    """The schema at /openapi.json, where vLLM serves it.

    Litestar answers unknown paths under its schema path with an HTML 404 page; rooting it at
    /openapi.json keeps every other path's 404 OpenAI-shaped. (No Swagger UI: it loads its
    scripts from a CDN, which servers here often cannot reach.)
    """
    return OpenAPIConfig(title="runtime", version=__version__, path="/openapi.json",
                         render_plugins=[JsonRenderPlugin(path="/")])


def streaming_responses(json_model: type, chunk_model: type) -> tuple[dict, type[Operation]]:
    """``responses`` and ``operation_class`` for a handler that answers ``json_model`` or, with
    ``stream: true``, server-sent ``chunk_model`` events: both appear under 200."""
    responses = {**ERROR_RESPONSES, 200: ResponseSpec(data_container=chunk_model, media_type="text/event-stream",
                                                      description=STREAM_DESCRIPTION, generate_examples=False)}

    @dataclass
    class StreamingOperation(Operation):
        def __post_init__(self) -> None:
            # The return annotation registered json_model's schema; the 200 spec above replaced its entry.
            self.responses["200"].content["application/json"] = OpenAPIMediaType(
                schema=Reference(ref=f"#/components/schemas/{json_model.__name__}"))

    return responses, StreamingOperation
