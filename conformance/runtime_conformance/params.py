"""Parametrizing checks by what the platform declares.

Every check takes one ``case`` argument. What a plugin does not declare becomes a skipped case
whose reason starts with "unsupported:", so the report lists it instead of passing it silently;
a platform that did not load gives one skipped case per check (its registration check fails).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import pytest

from .plugin import target_for
from .target import Target


def case(value: Any, id: str) -> Any:
    return pytest.param(value, id=id)


def unsupported(id: str, reason: str) -> Any:
    return pytest.param(None, id=id, marks=pytest.mark.skip(reason=f"unsupported: {reason}"))


def parametrize(metafunc: pytest.Metafunc, make: Callable[[Target], Iterable[Any]]) -> None:
    """Parametrize ``case`` with ``make(target)``. Without --runtime-platform there is no target:
    one placeholder case, which the plugin refuses to run (a usage error, not a skip)."""
    target = target_for(metafunc.config)
    if target is None:
        cases = [pytest.param(None, id="no-platform")]
    elif target.platform is None:
        cases = [pytest.param(None, id="not-loaded", marks=pytest.mark.skip(reason=f"platform not loaded: {target.problem}"))]
    else:
        cases = list(make(target))
    metafunc.parametrize("case", cases)
