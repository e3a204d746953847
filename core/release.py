"""This release: its version, the distributions released with it, and whether the installed ones belong to it.

PyPI's ``runtime`` is an unrelated package (docs/install.md), so the distribution name alone proves
nothing: this project's distributions name ``PROJECT_URL`` in their metadata (``[project.urls]``), and
:func:`identity_problem` checks it at import. The core and the distributions this repository builds
(``FIRST_PARTY``) share one version; a first-party plugin of another version is skipped, never used,
because core and plugin change together (internal helpers, not only the contract). Third-party
plugins answer to the contract version alone (:mod:`runtime.platform.version`).

Imports nothing of the runtime's own, so ``runtime/__init__`` can run the check before anything heavy.
"""

from __future__ import annotations

import re

import importlib_metadata
from packaging.version import InvalidVersion, Version

# Every pyproject.toml of this repository states this version; tests/test_release.py fails if one does not.
__version__ = "0.2.0"
DISTRIBUTION = "runtime"
# A placeholder until the project has a public home; it only has to be this project's own.
PROJECT_URL = "https://github.com/runtime-project/runtime"
# The distributions this repository builds or reserves (one per platform of the design, the shared
# Triton kernels, the conformance suite): all released with the core, at its version.
PLATFORM_EXTRAS = ("cpu", "cuda", "rocm", "gaudi", "tpu", "metal")
FIRST_PARTY = (*(f"runtime-{name}" for name in PLATFORM_EXTRAS), "runtime-triton", "runtime-conformance")
# Named in messages: an installed runtime has no docs/ folder beside it.
INSTALL_DOC = f"{PROJECT_URL}/blob/main/docs/install.md"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def identity_problem() -> str | None:
    """Why the installed ``runtime`` distribution is not this project, or None when it is.

    None also when no ``runtime`` distribution is installed: a source tree on ``sys.path`` has no
    metadata to check. Editable installs (``pip install -e .``) carry the same metadata as wheels.
    """
    try:
        meta = importlib_metadata.metadata(DISTRIBUTION)
    except importlib_metadata.PackageNotFoundError:
        return None
    urls = [*(meta.get_all("Project-URL") or []), meta.get("Home-page") or ""]
    if any(PROJECT_URL in url for url in urls):
        return None
    about = meta.get("Summary") or "no summary"
    return (f"the installed distribution '{DISTRIBUTION}' {meta.get('Version')} ({about!r}) is not this project "
            f"({PROJECT_URL}): PyPI's 'runtime' is an unrelated package. Fix: pip uninstall {DISTRIBUTION}, then "
            f"install this project from its wheels, its index or its repository ({INSTALL_DOC})")


def first_party_mismatch(distribution: str, version: str) -> str | None:
    """Why a distribution cannot be used with this core, or None.

    Only this repository's distributions (``FIRST_PARTY``) are held to the core's exact version.
    """
    if _canonical(distribution) not in FIRST_PARTY or _same_version(version, __version__):
        return None
    return (f"{distribution} {version} does not match runtime {__version__} (this repository's distributions are "
            f"released together). Fix: pip install '{distribution}=={__version__}' from where runtime came "
            f"({INSTALL_DOC})")


def _installed() -> dict[str, str]:
    """Name -> version of the installed first-party distributions and of every platform plugin's."""
    found: dict[str, str] = {}
    for name in FIRST_PARTY:
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    for ep in importlib_metadata.entry_points(group="runtime.platforms"):
        if ep.dist is not None:
            found.setdefault(_canonical(ep.dist.name), ep.dist.version)
    return found


def version_report() -> list[str]:
    """One line per installed distribution: the core, then every plugin, mismatches flagged.

    ``runtime plugins`` prints these, and ``runtime serve`` at start-up. Reads metadata only
    (no plugin is imported), so it is cheap in any process.
    """
    problem = identity_problem()
    lines = [f"runtime {__version__} ({'WARNING: ' + problem if problem else PROJECT_URL})"]
    for name, version in sorted(_installed().items()):
        if name not in FIRST_PARTY:
            lines.append(f"  {name} {version} (third-party: loaded if it supports the contract version)")
        elif (mismatch := first_party_mismatch(name, version)) is not None:
            lines.append(f"  {name} {version} MISMATCH: {mismatch}")
        else:
            lines.append(f"  {name} {version}")
    return lines
