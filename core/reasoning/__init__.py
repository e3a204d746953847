"""Reasoning parsers: which span of a model's output is its thinking (``--reasoning-parser``)."""

from .markers import REASONING_PARSERS, ReasoningMarkers, reasoning_markers

__all__ = ["REASONING_PARSERS", "ReasoningMarkers", "reasoning_markers"]
