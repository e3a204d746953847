"""What names an adapter, as vLLM's ``LoRARequest`` does."""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, frozen=True, array_like=True):
    """An adapter to generate with: ``LLM.generate(..., lora_request=LoRARequest("sql", 1, "/adapters/sql"))``.

    ``lora_int_id`` (>= 1) identifies the adapter: requests with the same id share its weights and
    prefix-cache entries, so an id must always name the same ``lora_path`` (a PEFT directory:
    ``adapter_config.json`` and ``adapter_model.safetensors``).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str
