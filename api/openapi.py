"""What the generated OpenAPI schema adds to the handlers' own types: the error responses and
the streaming variant."""

from __future__ import annotations

from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin

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
    """The schema at /openapi.json (and Swagger UI at /docs), as vLLM serves them."""
    return OpenAPIConfig(title="runtime", version=__version__, path="/",
                         render_plugins=[JsonRenderPlugin(path="/openapi.json"), SwaggerRenderPlugin(path="/docs")])
