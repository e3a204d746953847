"""Reasoning parsers: which span of a model's output is its thinking (``--reasoning-parser``)."""

from .markers import REASONING_PARSERS, ReasoningMarkers, reasoning_markers
from .parser import ReasoningDelta, ReasoningParser, ReasoningStream

__all__ = ["REASONING_PARSERS", "ReasoningDelta", "ReasoningMarkers", "ReasoningParser", "ReasoningStream",
           "reasoning_markers"]
