"""Programmatic dependent launches (NVIDIA sm_90 and later): a launch made a dependent of the one
before it may start while that one still runs, once each of that one's programs has called
``gdc_launch_dependents`` (or exited), and waits for its results with ``gdc_wait``.

At batch 1 a decode step is a chain of short launches, each waiting for the one before. The
kernels of that chain (the RMS norms, rotary embedding, ``store_kv``, attention, the gated
activation, the W4A16 one-row kernel, the few-row matmul) are launched as dependents, so their launch
overlaps the launch before, and so does what some of them read that it cannot have written (the
one-row kernel's first weight tile; attention's sequence layout and queries, when ``store_kv``
wrote only the cache just before); the others wait before reading anything. Each releases its own
dependents only after its wait: so at most two launches wait on each other, and when a dependent
starts, the launch two before it has finished. It may read before its wait what that one or any
earlier one wrote, never what the launch just before wrote.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc

_DEPENDENT_LAUNCHES: dict[torch.device, bool] = {}


def dependent_launches(device: torch.device) -> bool:
    """Whether a launch may start while the one before it still runs (NVIDIA sm_90 and later,
    compiled kernels; not Triton's interpreter, not ROCm)."""
    known = _DEPENDENT_LAUNCHES.get(device)
    if known is None:
        known = _DEPENDENT_LAUNCHES[device] = (
            device.type == "cuda" and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)
    return known


def launch_options(dependent: bool) -> dict:
    """Triton launch options for a kernel launched as a dependent or not."""
    return {"launch_pdl": True} if dependent else {}


def as_dependent(device: torch.device) -> dict:
    """A chain kernel's launch arguments: its ``DEPENDENT`` flag and the launch options, a
    dependent wherever launches may be (``dependent_launches``)."""
    dependent = dependent_launches(device)
    return {"DEPENDENT": dependent, **launch_options(dependent)}


@triton.jit
def wait_for_the_launch_before(DEPENDENT: tl.constexpr):
    """In a kernel launched as a dependent: wait for the launch before it to finish (its writes
    visible), then let the next launch start."""
    if DEPENDENT:
        gdc.gdc_wait()
        gdc.gdc_launch_dependents()
