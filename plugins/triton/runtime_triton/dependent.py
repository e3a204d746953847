"""Programmatic dependent launches (NVIDIA sm_90 and later): a launch made a dependent of the one
before it may start while that one still runs, once each of its programs has called
``gdc_launch_dependents`` (or exited), and waits for its results with ``gdc_wait``.

At batch 1 a decode step is a chain of short launches, each waiting for the one before; a
dependent's work that does not need the earlier results (the W4A16 vector kernel's first weight
tile, attention's search for its sequence and its queries behind ``store_kv``, the LoRA
projection's product) then runs beside the earlier launch instead of after it. Kernels that often
precede such a dependent (``store_kv``, the norms, the gated activation, attention and its merge)
release their dependents as they start: that is only a permission, harmless when the next launch
is an ordinary one. A kernel that is itself a dependent releases its own only after its wait, so
at most two launches wait on each other at a time.
"""

from __future__ import annotations

import os

import torch

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
