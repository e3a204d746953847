"""runtime: a pluggable, multi-backend LLM inference and serving engine."""

import warnings

from .release import __version__, identity_problem

# If PyPI's unrelated 'runtime' is what pip installed, say so and how to fix it, before the imports
# below fail on whatever it left. A warning, not an error: this code is ours and may well work.
if (_problem := identity_problem()) is not None:
    warnings.warn(_problem, RuntimeWarning, stacklevel=2)
del _problem

from .engine.llm import LLM
from .engine.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from .lora import LoRARequest
from .pooling import PoolingParams
from .sample.params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "LoRARequest", "PoolingParams",
           "RequestOutput", "SamplingParams", "StructuredOutputsParams", "__version__"]
