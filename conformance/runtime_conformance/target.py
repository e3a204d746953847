"""The platform under test and everything the installed plugins registered for it.

Discovery is the engine's own: ``Registry()`` reads the ``runtime.platforms`` entry points, so
the suite tests exactly what ``--device NAME`` would run, third-party additions included.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pytest
import torch

from runtime.platform import AttentionBackend, Communicator, Kernel, Platform, PluginStatus, QuantizationMethod, Registry


@dataclass
class Target:
    name: str
    registry: Registry
    platform: Platform | None = None
    problem: str | None = None
    """Why the platform cannot be tested (not installed, its plugin skipped, not available)."""

    @classmethod
    def discover(cls, name: str) -> "Target":
        registry = Registry()
        target = cls(name, registry)
        try:
            target.platform = registry.select_platform(name)
        except (ValueError, RuntimeError) as exc:
            skipped = [f"plugin {s.name!r} ({s.distribution} {s.version}) skipped: {s.reason}"
                       for s in registry.statuses if not s.loaded]
            target.problem = "; ".join([str(exc), *skipped])
        return target

    def require_platform(self) -> Platform:
        """The platform, or skip the calling check when it could not be loaded (a registration check fails instead)."""
        if self.platform is None:
            pytest.skip(f"platform not loaded: {self.problem}")
        return self.platform

    @property
    def device(self) -> torch.device:
        return self.require_platform().device(0)

    @property
    def status(self) -> PluginStatus | None:
        """Discovery's record of the plugin that provides the platform itself."""
        return next((s for s in self.registry.statuses if f"platform:{self.name}" in s.provides), None)

    @property
    def plugin(self) -> Any:
        status = self.status
        return self.registry.plugin_manager.get_plugin(status.name) if status else None

    def _registered(self, hook: str) -> list[Any]:
        results = getattr(self.registry.plugin_manager.hook, hook)()
        return [item for result in results if result for item in result if getattr(item, "platform", None) == self.name]

    @cached_property
    def backends(self) -> list[type[AttentionBackend]]:
        """Every attention backend registered for the platform, highest priority first."""
        return self.registry.attention_backends(self.name)

    @cached_property
    def kernels(self) -> list[Kernel]:
        return self._registered("runtime_kernels")

    @cached_property
    def quantization_methods(self) -> list[type[QuantizationMethod]]:
        return self._registered("runtime_quantization_methods")

    @cached_property
    def communicator(self) -> type[Communicator] | None:
        found = self._registered("runtime_communicators")
        return found[0] if found else None
