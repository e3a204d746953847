"""The LoRA adapters an API process serves, by the name clients put in ``model``."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Optional, Sequence

from runtime.lora import LoRARequest
from runtime.lora.adapter import load_adapter

from .errors import APIError


def parse_lora_modules(values: list[str]) -> list[LoRARequest]:
    """``--lora-modules`` entries, ``name=path`` or ``{"name": ..., "path": ...}``, as adapters
    numbered from 1; ValueError with the entry for anything else."""
    adapters: list[LoRARequest] = []
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                entry = json.loads(value)
                name, path = entry["name"], entry["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--lora-modules {value!r}: the JSON form needs \"name\" and \"path\"") from None
        else:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {value!r}: give name=path or a JSON object with name and path")
        if any(a.lora_name == name for a in adapters):
            raise ValueError(f"--lora-modules names {name!r} twice")
        adapters.append(LoRARequest(name, len(adapters) + 1, str(path)))
    return adapters


class LoRAModules:
    """The adapters this API process serves, by the name clients use."""

    def __init__(self, adapters: list[LoRARequest], base_names: list[str], max_rank: int,
                 allowed_dirs: Sequence[str] = ()):
        self.by_name = {a.lora_name: a for a in adapters}
        self._names = {a.lora_int_id: a.lora_name for a in adapters}
        """Every adapter's name by id, unloaded ones included (their requests may still run)."""
        self.base_names, self.max_rank = base_names, max_rank
        self._ids = itertools.count(max((a.lora_int_id for a in adapters), default=0) + 1)
        self.allowed_dirs = [Path(d).resolve() for d in allowed_dirs]
        """--lora-allowed-dirs, symbolic links resolved; empty: any directory."""

    def get(self, name: Optional[str]) -> Optional[LoRARequest]:
        return self.by_name.get(name) if name is not None else None

    def load(self, name: str, path: str, settings) -> None:
        """Check the adapter at ``path`` against the model and serve it as ``name``; APIError if not."""
        if not name or not path:
            raise APIError(400, "give lora_name and lora_path", param="lora_name")
        if name in self.by_name or name in self.base_names:
            raise APIError(400, f"The name `{name}` is already in use; unload it first or choose another.",
                           param="lora_name")
        self._check_allowed(path)
        if not Path(path).is_dir():
            raise APIError(400, f"lora_path {path} is not a directory on the server", param="lora_path")
        lora_id = next(self._ids)
        try:
            load_adapter(name, lora_id, path, settings, self.max_rank)
        except ValueError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        self.by_name[name] = LoRARequest(name, lora_id, path)
        self._names[lora_id] = name

    def _check_allowed(self, path: str) -> None:
        # Resolved before comparing, so neither ".." nor a symbolic link leads out of an allowed directory.
        if self.allowed_dirs and not any(Path(path).resolve().is_relative_to(d) for d in self.allowed_dirs):
            allowed = " ".join(str(d) for d in self.allowed_dirs)
            raise APIError(403, f"lora_path {path} is outside the directories adapters may be loaded from "
                                f"(--lora-allowed-dirs {allowed}); put the adapter under one of them",
                           param="lora_path", code="path_not_allowed", type="permission_error")

    def name_of(self, lora_id: int) -> str:
        return self._names.get(lora_id, str(lora_id))

    def unload(self, name: str) -> None:
        """Stop serving ``name``; requests already running with it finish with it."""
        if self.by_name.pop(name, None) is None:
            raise APIError(404, f"The LoRA adapter `{name}` is not loaded.", param="lora_name", code="model_not_found")
