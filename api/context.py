"""What every handler needs, injected as the ``ctx`` dependency: the engine, the served model
names and the app's metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from runtime.engine.async_engine import AsyncEngine

from .chat_tools import ChatParsing
from .errors import APIError
from .lora_modules import LoRAModules
from .metrics import Metrics


@dataclass
class ServerContext:
    engine: AsyncEngine
    model_names: list[str]
    """The names clients may use for the model; the first is the one listed and reported."""
    metrics: Metrics
    lora: LoRAModules
    """The LoRA adapters served, by name (empty without --enable-lora)."""
    parsing: ChatParsing = field(default_factory=ChatParsing)
    """The reasoning and tool-call parsers chat outputs go through."""
    created: int = field(default_factory=lambda: int(time.time()))

    def resolve_model(self, requested: Optional[str]) -> str:
        """The name to report for a request naming ``requested`` (None: the default), the model
        or one of its adapters; 404 if not served."""
        if requested is None:
            return self.model_names[0]
        if requested not in self.model_names and self.lora.get(requested) is None:
            served = self.model_names + list(self.lora.by_name)
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                                f"{', '.join(f'`{name}`' for name in served)}.",
                           param="model", code="model_not_found")
        return requested
