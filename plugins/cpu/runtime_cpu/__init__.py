"""runtime-cpu: the CPU platform plugin for runtime."""

__version__ = "0.2.0"
