"""The platform end-to-end checks compare with: the core's reference attention and kernels,
plain torch on the CPU in float32.

It is a plugin like any other, registered in-process into a Registry of its own, so it never
shows among installed plugins and the engine code that runs it is the code that runs the
platform under test. Only the attention backend and the kernels differ between the two runs.
"""

from __future__ import annotations

import os
import sys

import torch

from runtime.platform import CONTRACT_VERSION, Platform, Registry, hookimpl
from runtime.platform.reference import ReferenceAttentionBackend

from . import __version__

NAME = "conformance-reference"
RUNTIME_CONTRACT = f"=={CONTRACT_VERSION}"


class ReferencePlatform(Platform):
    name = NAME
    device_type = "cpu"
    supported_dtypes = (torch.float32,)

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return "reference kernels (plain torch on the CPU)"

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


class ReferenceBackend(ReferenceAttentionBackend):
    platform = NAME


@hookimpl
def runtime_platforms():
    return [ReferencePlatform]


@hookimpl
def runtime_attention_backends():
    return [ReferenceBackend]


def reference_registry() -> Registry:
    registry = Registry(entry_points=[])
    registry.register(sys.modules[__name__], NAME, "runtime-conformance", __version__)
    return registry
