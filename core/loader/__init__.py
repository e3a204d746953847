"""Checkpoint loading: HF-layout safetensors directories and GGUF files, under HF weight names."""

from .source import ModelSource, embedded_model_path, open_model

__all__ = ["ModelSource", "embedded_model_path", "open_model"]
