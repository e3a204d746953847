"""What an embedding request asks for, and what the runner computes for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PoolingParams:
    """vLLM's ``PoolingParams`` for embeddings (0.22's fields).

    ``dimensions``: keep the first this many components (models trained for it, Matryoshka
    style; the vector is normalized after the cut). ``use_activation``: an embedding's
    activation is the normalization to unit length; None takes the model's setting
    (``PoolerConfig.normalize``).
    """

    dimensions: Optional[int] = None
    use_activation: Optional[bool] = None


@dataclass(frozen=True)
class PoolingSpec:
    """One request's pooling, resolved against the model's ``PoolerConfig``."""

    pooling_type: str
    """LAST (the last token's hidden state), MEAN (the mean over every token) or CLS (the first token's)."""
    normalize: bool
    dimensions: int
    """Components kept (the hidden size when not truncated)."""

    @property
    def reads_every_position(self) -> bool:
        """Whether the vector needs the hidden state of every prompt token (so prefix-cache hits,
        which skip computing some, cannot serve it)."""
        return self.pooling_type != "LAST"
