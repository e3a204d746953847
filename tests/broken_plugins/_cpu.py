"""The CPU plugin's parts under another platform name, with one part (or kernel) swapped for a faulty one."""

from __future__ import annotations

from typing import Any, Callable

import runtime_cpu.plugin as cpu
from runtime.platform import Kernel, hookimpl
from runtime_cpu.attention import CpuAttentionBackend
from runtime_cpu.platform import CpuPlatform
from runtime_cpu.quant import CpuGgufMethod as GgufDequantizeMethod


def _serving(cls: type, platform: str) -> type:
    """A subclass of ``cls`` serving ``platform``: the registry matches parts to platforms by name."""
    return type(cls.__name__, (cls,), {"platform": platform})


class _Plugin:
    """A pluggy plugin object: its methods are the hooks."""

    RUNTIME_CONTRACT = cpu.RUNTIME_CONTRACT

    def __init__(self, name: str, attention: type, communicator: type, quantization: type,
                 kernels: dict[str, Callable[..., Any]]):
        self.platform = type("BrokenPlatform", (CpuPlatform,), {"name": name})
        self.attention = _serving(attention, name)
        self.communicator = _serving(communicator, name)
        self.quantization = _serving(quantization, name)
        ops = {**{k.op: k.fn for k in cpu.runtime_kernels()}, **kernels}
        self.kernels = [Kernel(name, op, fn) for op, fn in ops.items()]

    @hookimpl
    def runtime_platforms(self):
        return [self.platform]

    @hookimpl
    def runtime_attention_backends(self):
        return [self.attention]

    @hookimpl
    def runtime_communicators(self):
        return [self.communicator]

    @hookimpl
    def runtime_quantization_methods(self):
        return [self.quantization]

    @hookimpl
    def runtime_kernels(self):
        return self.kernels


def cpu_plugin(name: str, *, attention: type = CpuAttentionBackend, communicator: type = cpu.GlooCommunicator,
               quantization: type = GgufDequantizeMethod, kernels: dict[str, Callable[..., Any]] | None = None) -> _Plugin:
    """The CPU plugin as platform ``name``; pass the one faulty part, or ``kernels={op: faulty_fn}``."""
    return _Plugin(name, attention, communicator, quantization, kernels or {})
