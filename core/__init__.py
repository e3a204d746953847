"""runtime: a pluggable, multi-backend LLM inference and serving engine."""

from .engine.llm import LLM
from .engine.outputs import CompletionOutput, RequestOutput
from .sample.params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]
