"""runtime-example-plugin: a minimal platform plugin for runtime (see docs/plugins.md)."""

__version__ = "0.1.0"
