"""Speculative decoding: proposers, verification by rejection sampling, acceptance counters."""

from .config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
