"""Hook specifications of the plugin contract (pluggy project name ``runtime``).

A plugin is a module (or object) named by an entry point in the group ``runtime.platforms``.
It must define ``RUNTIME_CONTRACT``, a PEP 440 specifier of the contract versions it supports
(see :mod:`runtime.platform.version`), and implements any of the hooks below with
``@runtime.platform.hookimpl``. Every hook is collected from all plugins (not first-result):
each returns a list, possibly empty, and the core merges them into its registries.
"""

from __future__ import annotations

import pluggy

from .interface import AttentionBackend, Communicator, Kernel, Platform, QuantizationMethod

PROJECT = "runtime"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def runtime_platforms() -> list[type[Platform]]:
    """Platforms this plugin provides. Each is selectable by ``--device NAME`` and takes
    part in automatic selection when ``is_available()`` is true."""


@hookspec
def runtime_attention_backends() -> list[type[AttentionBackend]]:
    """Attention backends, each naming its ``platform``. The engine picks, per model, the
    highest-priority backend of the selected platform whose ``unsupported_reason`` is None."""


@hookspec
def runtime_kernels() -> list[Kernel]:
    """Kernel implementations (RMSNorm, rotary, activations, LoRA, block copy, sampling
    helpers) for a platform. Ops not provided fall back to the core's reference kernels."""


@hookspec
def runtime_communicators() -> list[type[Communicator]]:
    """Communicator classes, one per platform, used for tensor-parallel collectives."""


@hookspec
def runtime_quantization_methods() -> list[type[QuantizationMethod]]:
    """Quantization methods, each naming its checkpoint format (``name``) and ``platform``."""
