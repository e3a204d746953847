"""The wire format of POST /v1/embeddings: OpenAI's request and response, with vLLM's extras."""

from __future__ import annotations

import time
from typing import Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator

from .protocol import TokenIds, UsageInfo, _Model

MAX_EMBEDDING_INPUTS = 2048
"""Inputs in one request: OpenAI's limit."""


class EmbeddingRequest(_Model):
    """POST /v1/embeddings."""

    model: Optional[str] = None
    input: Union[str, list[str], TokenIds, list[TokenIds]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists; each is "
                    "embedded whole (none may be empty or longer than the model's context).")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: a list of numbers; base64: the float32 little-endian bytes, base64-encoded.")
    dimensions: Optional[int] = Field(
        None, ge=1, description="Keep the first this many components (models trained for it; then normalized).")
    user: Optional[str] = Field(None, description="Accepted and ignored.")
    add_special_tokens: bool = Field(True, description="vLLM extra: add BOS/EOS etc. when tokenizing the input.")
    use_activation: Optional[bool] = Field(None, description="vLLM extra: normalize to unit length (default: the "
                                                             "model's setting).")
    priority: int = Field(0, description="vLLM extra: lower runs first under --scheduling-policy priority.")

    @field_validator("input")
    @classmethod
    def _not_too_many(cls, value: Union[str, list]) -> Union[str, list]:
        if isinstance(value, list) and value and not isinstance(value[0], int) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(value)}; split them")
        return value


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: Union[list[float], str]
    """Numbers, or with ``encoding_format`` base64 their float32 bytes in base64."""


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo
