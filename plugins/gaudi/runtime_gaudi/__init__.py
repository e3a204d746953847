"""runtime-gaudi: the Gaudi platform plugin for runtime (Intel Gaudi HPUs through habana_frameworks.torch)."""

__version__ = "0.2.0"
