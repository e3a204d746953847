"""The one place that imports Intel's HPU library (``habana_frameworks.torch``), so tests can fake it.

Every lookup goes through :func:`module`, which returns None where the library (or the part of
it asked for) is missing: detection, fused-op selection and graphs then degrade instead of failing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

LIBRARY = "habana_frameworks.torch"
INSTALL = ("habana_frameworks.torch is not installed: it ships with Intel Gaudi's software stack "
           "(https://docs.habana.ai/en/latest/Installation_Guide/), not on PyPI")


def module(name: str = LIBRARY) -> ModuleType | None:
    """``importlib.import_module(name)``, or None when it (or its native library) is missing."""
    try:
        return importlib.import_module(name)
    except Exception:  # an ImportError, or a native library that fails to load: both mean "absent"
        return None


def fused(module_name: str, attribute: str):
    """A fused op class of the HPU library (e.g. ``FusedRMSNorm``), or None where it lacks it."""
    found = module(f"{LIBRARY}.{module_name}")
    return getattr(found, attribute, None) if found is not None else None
