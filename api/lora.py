"""vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (only with
``--allow-runtime-lora-updating``: loading a server-side path is a privilege)."""

from __future__ import annotations

from litestar import Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from pydantic import BaseModel

from .context import ServerContext
from .openapi import ERROR_RESPONSES


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str


@post("/v1/load_lora_adapter", status_code=200, responses=ERROR_RESPONSES,
      summary="Serve the PEFT adapter at a server-side path under a name (--allow-runtime-lora-updating)")
async def load_lora_adapter(data: JSONBody[LoadLoRAAdapterRequest], ctx: NamedDependency[ServerContext]) -> Response:
    ctx.engine.check_ready()
    ctx.lora.load(data.lora_name, data.lora_path, ctx.engine.model_settings)
    return Response(f"Success: LoRA adapter '{data.lora_name}' added successfully.", media_type="text/plain")


@post("/v1/unload_lora_adapter", status_code=200, responses=ERROR_RESPONSES,
      summary="Stop serving an adapter; requests running with it finish (--allow-runtime-lora-updating)")
async def unload_lora_adapter(data: JSONBody[UnloadLoRAAdapterRequest], ctx: NamedDependency[ServerContext]) -> Response:
    ctx.lora.unload(data.lora_name)
    return Response(f"Success: LoRA adapter '{data.lora_name}' removed successfully.", media_type="text/plain")


UPDATE_ROUTES = [load_lora_adapter, unload_lora_adapter]
