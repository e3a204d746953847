"""GET /v1/models, /health, /version and /metrics."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency

from runtime import __version__

from .context import ServerContext
from .errors import as_api_error, error_response
from .metrics import CONTENT_TYPE
from .openapi import ERROR_RESPONSES
from .protocol import ModelCard, ModelList, VersionResponse


@get("/v1/models", responses=ERROR_RESPONSES,
     summary="List the served model (under each of its names) and its LoRA adapters (with their parent)")
async def list_models(ctx: NamedDependency[ServerContext]) -> ModelList:
    # 503 until a request can be served: clients written for vLLM poll this route for readiness.
    engine = ctx.engine
    max_model_len = engine.max_model_len
    root = str(engine.args.model) if engine.args.model else ctx.model_names[0]
    deterministic = engine.args.deterministic
    cards = [ModelCard(id=name, created=ctx.created, root=root, max_model_len=max_model_len, deterministic=deterministic)
             for name in ctx.model_names]
    cards += [ModelCard(id=name, created=ctx.created, root=adapter.lora_path, parent=ctx.model_names[0],
                        max_model_len=max_model_len, deterministic=deterministic)
              for name, adapter in ctx.lora.by_name.items()]
    return ModelList(data=cards)


@get("/health", responses=ERROR_RESPONSES, summary="200 once the model is loaded and the engine runs; 503 otherwise")
async def health(ctx: NamedDependency[ServerContext]) -> Response:
    try:
        ctx.engine.check_ready()
    except Exception as exc:  # noqa: BLE001  (every reason not to be healthy is a 503)
        return error_response(as_api_error(exc))
    return Response(b"", status_code=200)


@get("/version", summary="The server's version, and whether it runs in deterministic (batch-invariant) mode")
async def version(ctx: NamedDependency[ServerContext]) -> VersionResponse:
    return VersionResponse(version=__version__, deterministic=ctx.engine.args.deterministic)


@get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE)
async def metrics(ctx: NamedDependency[ServerContext]) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
