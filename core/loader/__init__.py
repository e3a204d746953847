"""Checkpoint loading: HF-layout safetensors directories and GGUF files, under HF weight names."""

from .source import ModelSource, embedded_model_path, open_model
from .stored import StoredTensor, materialize

__all__ = ["ModelSource", "StoredTensor", "embedded_model_path", "materialize", "open_model"]
