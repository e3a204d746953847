"""The Litestar app: routes, error handlers, auth, metrics and the engine's lifespan."""

from __future__ import annotations

from typing import Optional, Sequence

from litestar import Litestar
from litestar.di import Provide

from runtime.engine.async_engine import AsyncEngine
from runtime.lora import LoRARequest

from .auth import api_key_middleware
from .chat import create_chat_completion
from .chat_tools import ChatParsing
from .completions import create_completion
from .embeddings import create_embeddings
from .context import ServerContext
from .errors import EXCEPTION_HANDLERS
from .limits import MAX_BODY_BYTES
from .lora import UPDATE_ROUTES
from .lora_modules import LoRAModules
from .metrics import Metrics
from .openapi import openapi_config
from .system import health, list_models, metrics, version
from .tokenization import detokenize, tokenize

ROUTES = [create_completion, create_chat_completion, create_embeddings, tokenize, detokenize, list_models, health, version, metrics]



def create_app(engine: AsyncEngine, model_names: list[str], api_key: Optional[str] = None,
               lora_modules: Sequence[LoRARequest] = (), allow_runtime_lora_updating: bool = False,
               tool_call_parser: Optional[str] = None, enable_auto_tool_choice: bool = False,
               max_request_body_bytes: int = MAX_BODY_BYTES, lora_allowed_dirs: Sequence[str] = ()) -> Litestar:
    """The OpenAI-compatible app serving ``engine`` under ``model_names`` (the first is the default),
    and the LoRA adapters ``lora_modules`` under their names; ``allow_runtime_lora_updating``
    adds the routes that load and unload adapters. Chat outputs are split by the engine's
    ``reasoning_parser`` and, for ``tool_choice`` auto (with ``enable_auto_tool_choice``), by
    ``tool_call_parser``. A body over ``max_request_body_bytes`` is a 413; with
    ``lora_allowed_dirs``, adapters load at runtime only from under those directories.

    The app starts the engine (connecting to the engine core, which loads in the background) at
    startup and shuts it down at shutdown. With ``api_key``, every route but /health, /version, /metrics and the schema
    requires ``Authorization: Bearer <api_key>``.
    """
    if not model_names:
        raise ValueError("give at least one served model name")
    lora = LoRAModules(list(lora_modules), list(model_names), engine.args.max_lora_rank, lora_allowed_dirs)
    metrics = Metrics(engine, model_names[0], lora.name_of if engine.args.enable_lora else None)
    parsing = ChatParsing(engine.args.reasoning_parser, tool_call_parser, enable_auto_tool_choice)
    ctx = ServerContext(engine, list(model_names), metrics, lora, parsing)

    async def start() -> None:
        await engine.start()

    async def stop() -> None:
        await engine.shutdown()

    return Litestar(
        route_handlers=ROUTES + (UPDATE_ROUTES if allow_runtime_lora_updating else []),
        dependencies={"ctx": Provide(lambda: ctx, use_cache=True, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[api_key_middleware(api_key)] if api_key else [],
        openapi_config=openapi_config(),
        on_startup=[start],
        on_shutdown=[stop],
        request_max_body_size=max_request_body_bytes,
        logging_config=None,  # the CLI configures logging; Litestar's default would override it
        debug=False,
    )
