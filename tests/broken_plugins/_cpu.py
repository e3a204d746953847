"""The CPU plugin's parts under another platform name, with one part swapped for a faulty one."""

from __future__ import annotations

from typing import Any, Callable

import runtime_cpu.plugin as cpu
from runtime.platform import Kernel, hookimpl
from runtime_cpu.attention import CpuAttentionBackend
from runtime_cpu.platform import CpuPlatform
from runtime_cpu.quant import GgufDequantizeMethod


def _for(cls: type, platform: str) -> type:
    """A subclass of ``cls`` serving ``platform``: the registry matches parts to platforms by name."""
    return type(cls.__name__, (cls,), {"platform": platform})


class _Plugin:
    RUNTIME_CONTRACT = cpu.RUNTIME_CONTRACT

    def __init__(self, name: str, attention: type, communicator: type, quantization: type,
                 kernels: dict[str, Callable[..., Any]]):
        self.platform = type("BrokenPlatform", (CpuPlatform,), {"name": name})
        self.parts = [_for(attention, name), _for(communicator, name), _for(quantization, name)]
        self.kernel_list = [Kernel(name, op, fn) for op, fn in kernels.items()]

    @hookimpl
    def runtime_platforms(self):
        return [self.platform]

    @hookimpl
    def runtime_attention_backends(self):
        return [self.parts[0]]

    @hookimpl
    def runtime_communicators(self):
        return [self.parts[1]]

    @hookimpl
    def runtime_quantization_methods(self):
        return [self.parts[2]]

    @hookimpl
    def runtime_kernels(self):
        return self.kernel_list


def cpu_plugin(name: str, *, attention: type = CpuAttentionBackend, communicator: type = cpu.GlooCommunicator,
               quantization: type = GgufDequantizeMethod, kernels: dict[str, Callable[..., Any]] | None = None) -> _Plugin:
    return _Plugin(name, attention, communicator, quantization, kernels or {})
