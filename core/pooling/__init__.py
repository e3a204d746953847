"""Embeddings from decoder models: which hidden states make a request's vector, and how.

``PoolingParams`` is what a request asks for (vLLM's name and fields), ``PoolerConfig`` what
the model's checkpoint says (or ``--pooler-config`` overrides), ``PoolingSpec`` the two
resolved for one request: what the model runner computes.
"""

from .config import POOLING_TYPES, PoolerConfig, resolve_pooler_config
from .params import PoolingParams, PoolingSpec

__all__ = ["POOLING_TYPES", "PoolerConfig", "PoolingParams", "PoolingSpec", "resolve_pooler_config"]
