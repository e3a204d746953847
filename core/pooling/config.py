"""The model's pooling: from ``--pooler-config``, else the checkpoint's sentence-transformers
files, else what decoder embedders use (gte-Qwen2, e5-mistral): the last token, normalized."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .params import PoolingParams, PoolingSpec

POOLING_TYPES = ("LAST", "MEAN", "CLS")

_ST_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS"}
"""sentence-transformers' Pooling module settings that this runtime computes, by the type they mean."""
_OVERRIDE_KEYS = {"pooling_type": "pooling_type", "seq_pooling_type": "pooling_type", "use_activation": "normalize",
                  "normalize": "normalize"}
"""``--pooler-config`` keys, vLLM 0.22's and their older names, by the setting each gives."""
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_ST_POOLING = "sentence_transformers.models.Pooling"


@dataclass(frozen=True)
class PoolerConfig:
    """How the model turns hidden states into a vector, and which vector sizes it was trained for."""

    pooling_type: str = "LAST"
    normalize: bool = True
    hidden_size: int = 0
    matryoshka_dimensions: Optional[tuple[int, ...]] = None
    """Sizes a ``dimensions`` request may ask for; None: any up to the hidden size."""
    supports_dimensions: bool = False
    """The model was trained so that a prefix of its vector is a vector (``is_matryoshka``)."""
    source: str = field(default="default", compare=False)
    """Where the settings came from, for the log line."""

    def spec(self, params: PoolingParams) -> PoolingSpec:
        """``params`` resolved for this model; ValueError naming ``dimensions`` when the model cannot give them."""
        dims = params.dimensions
        if dims is not None:
            if not self.supports_dimensions:
                raise ValueError("dimensions: this model does not support truncated embeddings (its config has no "
                                 "is_matryoshka or matryoshka_dimensions); leave dimensions out")
            if self.matryoshka_dimensions is not None and dims not in self.matryoshka_dimensions:
                raise ValueError(f"dimensions {dims} is not one this model was trained for: "
                                 f"{', '.join(map(str, self.matryoshka_dimensions))}")
            if not 1 <= dims <= self.hidden_size:
                raise ValueError(f"dimensions must be between 1 and the model's {self.hidden_size}, got {dims}")
        normalize = self.normalize if params.use_activation is None else params.use_activation
        return PoolingSpec(self.pooling_type, normalize, dims or self.hidden_size)


def resolve_pooler_config(model_path: Optional[Path], hf_config: Any,
                          override: Union[str, dict, None] = None) -> PoolerConfig:
    """The model's ``PoolerConfig``. ``override``: vLLM's ``--pooler-config``, JSON text or a
    dict with ``pooling_type`` (or ``seq_pooling_type``) and/or ``use_activation`` (or older
    vLLM's ``normalize``), over whatever the checkpoint says."""
    hidden_size = int(hf_config.hidden_size)
    dims = getattr(hf_config, "matryoshka_dimensions", None)
    matryoshka = tuple(int(d) for d in dims) if dims else None
    supports = bool(getattr(hf_config, "is_matryoshka", False) or matryoshka)
    found = _sentence_transformers(model_path) if model_path is not None and model_path.is_dir() else {}
    settings = {"pooling_type": "LAST", "normalize": True, **found}
    source = "sentence-transformers files" if found else "default for decoder embedders"
    if override:
        settings.update(parse_pooler_override(override))
        source = "--pooler-config"
    return PoolerConfig(settings["pooling_type"], settings["normalize"], hidden_size, matryoshka, supports, source)


def parse_pooler_override(override: Union[str, dict]) -> dict[str, Any]:
    """``--pooler-config`` (JSON text or a dict) as settings: ``pooling_type`` (one of
    POOLING_TYPES) and/or ``normalize``; ValueError naming what is wrong with it."""
    if isinstance(override, str):
        try:
            override = json.loads(override)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--pooler-config is not JSON ({exc}): give e.g. '{{\"pooling_type\": \"MEAN\"}}'") from None
    if not isinstance(override, dict):
        raise ValueError(f"--pooler-config must be a JSON object, got {override!r}")
    unknown = set(override) - set(_OVERRIDE_KEYS)
    if unknown:
        raise ValueError(f"--pooler-config has unknown key(s) {', '.join(sorted(unknown))}: give pooling_type "
                         f"and/or use_activation")
    settings = {_OVERRIDE_KEYS[key]: value for key, value in override.items()}
    if "pooling_type" in settings:
        if str(settings["pooling_type"]).upper() not in POOLING_TYPES:
            raise ValueError(f"pooling_type {settings['pooling_type']!r} is not one of {', '.join(POOLING_TYPES)}")
        settings["pooling_type"] = str(settings["pooling_type"]).upper()
    if not isinstance(settings.get("normalize", True), bool):
        raise ValueError(f"--pooler-config use_activation must be true or false, got {settings['normalize']!r}")
    return settings


def _sentence_transformers(directory: Path) -> dict[str, Any]:
    """Pooling type and normalization from a sentence-transformers checkpoint's ``modules.json``
    and its Pooling module's ``config.json``; {} when it has none."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = json.loads(modules_file.read_text())
    found: dict[str, Any] = {"normalize": any(m.get("type") == _ST_NORMALIZE for m in modules)}
    pooling = next((m for m in modules if m.get("type") == _ST_POOLING), None)
    if pooling is None:
        return found
    config_file = directory / pooling.get("path", "1_Pooling") / "config.json"
    if not config_file.is_file():
        return found
    config = json.loads(config_file.read_text())
    chosen = [kind for key, kind in _ST_MODES.items() if config.get(key)]
    others = [key for key, value in config.items() if key.startswith("pooling_mode_") and value and key not in _ST_MODES]
    if others or len(chosen) != 1:
        raise ValueError(f"{config_file} asks for pooling {', '.join(others) or 'modes ' + ', '.join(chosen)}; this "
                         f"runtime pools by one of lasttoken, mean_tokens, cls_token: override with --pooler-config")
    found["pooling_type"] = chosen[0]
    return found
