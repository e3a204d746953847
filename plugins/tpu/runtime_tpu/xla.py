"""The one place that imports torch-xla, so detection can be tested with it faked.

``module(name)`` returns None where torch-xla (or the part asked for) is missing or fails to
load (its native library is tied to one torch version).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

INSTALL = ("torch_xla is not installed: pip install torch-xla[tpu] with the torch version it pins, "
           "in its own environment (docs/platforms.md)")


def module(name: str = "torch_xla") -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a native library built for another torch: both mean "absent"
        return None


def pjrt_device() -> str:
    """``PJRT_DEVICE`` as set (``TPU``, ``CPU``, ...), upper-case; empty when unset."""
    return os.environ.get("PJRT_DEVICE", "").upper()
