"""The plugin contract: hook specifications, interfaces, discovery and reference kernels."""

from .hookspecs import hookimpl
from .interface import (
    KV_CACHE_DTYPES,
    AttentionBackend,
    AttentionMetadata,
    AttentionSpec,
    Communicator,
    Kernel,
    Platform,
    PlatformConfig,
    QuantizationMethod,
    RawQuantizedTensor,
)
from .registry import KernelSet, PluginStatus, Registry, get_registry
from .version import CONTRACT_VERSION

__all__ = [
    "CONTRACT_VERSION", "KV_CACHE_DTYPES", "AttentionBackend", "AttentionMetadata", "AttentionSpec", "Communicator", "Kernel",
    "KernelSet", "Platform", "PlatformConfig", "PluginStatus", "QuantizationMethod", "RawQuantizedTensor",
    "Registry", "get_registry", "hookimpl",
]
