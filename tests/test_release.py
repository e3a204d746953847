"""One release: every distribution of this repository states the core's version and pins its siblings
to it; PyPI's unrelated ``runtime`` is recognised at import; a first-party plugin of another version
is reported and skipped, a third-party one is judged by the contract alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import importlib_metadata
import pytest
from packaging.requirements import Requirement

from runtime import release
from runtime.platform import Registry

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
# examples/ is a third-party plugin's template: its version is its own.
PROJECTS = [REPO, *sorted(p.parent for p in REPO.glob("plugins/*/pyproject.toml")), REPO / "conformance"]
OURS = {release.DISTRIBUTION, *release.FIRST_PARTY}


def project(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("path", PROJECTS, ids=lambda p: str(p.relative_to(REPO)) or "core")
def test_every_distribution_is_the_release(path):
    meta = project(path)
    where = path / "pyproject.toml"
    assert meta["name"] in OURS, f"{where}: add {meta['name']!r} to runtime.release.FIRST_PARTY"
    assert meta["version"] == release.__version__, f"{where}: version {meta['version']}, the release is {release.__version__}"
    assert release.PROJECT_URL in meta.get("urls", {}).values(), f"{where}: [project.urls] must name {release.PROJECT_URL}"
    requirements = [*meta["dependencies"], *(r for extra in meta.get("optional-dependencies", {}).values() for r in extra)]
    for req in map(Requirement, requirements):
        if req.name in OURS:
            assert str(req.specifier) == f"=={release.__version__}", f"{where}: {req} must pin =={release.__version__}"


def test_packages_state_the_release_version():
    sources = {"runtime": REPO / "core" / "release.py", **{
        f"runtime_{p.name}": p / f"runtime_{p.name}" / "__init__.py" for p in PROJECTS[1:]}}
    for package, source in sources.items():
        found = re.search(r'^__version__ = "(.+)"$', source.read_text(), re.M)
        assert found and found.group(1) == release.__version__, f"{source}: __version__ is not {release.__version__}"


def test_every_platform_extra_pins_its_plugin():
    extras = project(REPO)["optional-dependencies"]
    for name in release.PLATFORM_EXTRAS:
        assert extras[name] == [f"runtime-{name}=={release.__version__}"], extras.get(name)


def test_install_docs_name_the_release():
    """The install commands quote versions (a wheel's file name, a pin); a release must update them."""
    readme = (REPO / "README.md").read_text()
    install_section = readme[readme.index("## Install"):readme.index("\n## ", readme.index("## Install") + 1)]
    for where, text in {"README.md": install_section, "docs/install.md": (REPO / "docs" / "install.md").read_text()}.items():
        # 0.1.4 is the unrelated package's.
        versions = set(re.findall(r"\b\d+\.\d+\.\d+\b", text)) - {"0.1.4"}
        assert versions == {release.__version__}, f"{where} quotes {sorted(versions)}, the release is {release.__version__}"


def fake_distribution(directory: Path, name: str, version: str, extra: str = "", entry_points: str = "") -> None:
    info = directory / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{extra}")
    if entry_points:
        (info / "entry_points.txt").write_text(entry_points)


def python(code: str, cwd: Path, path: Path | None = None) -> subprocess.CompletedProcess:
    # Not from the repository: its runtime.egg-info (left by the editable install) would be found first.
    env = dict(os.environ, PYTHONPATH=str(path) if path else "")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_import_recognises_this_project_and_warns_on_the_unrelated_one(tmp_path):
    assert release.identity_problem() is None  # the editable install names PROJECT_URL
    clean = python("import runtime", tmp_path)
    assert clean.returncode == 0 and "not this project" not in clean.stderr, clean.stderr

    # What pip leaves when it picks PyPI's 'runtime 0.1.4': its metadata, found first on the path.
    site = tmp_path / "site"
    fake_distribution(site, "runtime", "0.1.4", "Summary: app runtime management\nHome-page: http://example.org\n")
    foreign = python("import runtime", tmp_path, site)
    assert foreign.returncode == 0, foreign.stderr  # a warning, never a failed import
    assert "'runtime' 0.1.4 ('app runtime management') is not this project" in foreign.stderr
    assert "pip uninstall runtime" in foreign.stderr and "docs/install.md" in foreign.stderr


def test_source_tree_without_metadata_passes(monkeypatch):
    def missing(name):
        raise importlib_metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib_metadata, "metadata", missing)
    assert release.identity_problem() is None


def test_first_party_mismatch_only_for_our_distributions():
    other = "0.1.0" if release.__version__ != "0.1.0" else "9.9.9"
    assert release.first_party_mismatch("runtime-cuda", release.__version__) is None
    assert release.first_party_mismatch("runtime_rocm", other).startswith(f"runtime_rocm {other} does not match")
    assert release.first_party_mismatch("runtime-example-plugin", other) is None


@pytest.fixture
def old_cuda(tmp_path, monkeypatch):
    """runtime-cuda of an older release (its module would fail to import) and a third-party plugin at 0.1.0."""
    (tmp_path / "old_cuda.py").write_text("raise ImportError('imported a plugin of another release')\n")
    (tmp_path / "third_party.py").write_text("RUNTIME_CONTRACT = '>=1.0,<2'\n")
    fake_distribution(tmp_path, "runtime-cuda", "0.1.0", entry_points="[runtime.platforms]\ncuda = old_cuda\n")
    fake_distribution(tmp_path, "acme-runtime-npu", "0.1.0", entry_points="[runtime.platforms]\nnpu = third_party\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_first_party_plugin_of_another_release_is_skipped_unimported(old_cuda):
    with pytest.warns(RuntimeWarning, match="runtime-cuda 0.1.0 does not match runtime"):
        registry = Registry()
    status = {s.name: s for s in registry.statuses}
    assert not status["cuda"].loaded and "pip install 'runtime-cuda==" in status["cuda"].reason
    assert status["npu"].loaded and status["npu"].version == "0.1.0"
    assert status["cpu"].loaded and "cuda" not in registry.platforms


def test_versions_are_reported(old_cuda):
    report = release.version_report()
    assert report[0] == f"runtime {release.__version__} ({release.PROJECT_URL})"
    assert f"  runtime-cpu {release.__version__}" in report
    assert any(line.startswith("  runtime-cuda 0.1.0 MISMATCH: ") for line in report), report
    assert "  acme-runtime-npu 0.1.0 (third-party: loaded if it supports the contract version)" in report

    env = dict(os.environ, PYTHONPATH=str(old_cuda), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "plugins"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "runtime-cuda 0.1.0 MISMATCH" in out.stdout
    assert re.search(r"^cuda +runtime-cuda 0\.1\.0 +skipped .*does not match", out.stdout, re.M), out.stdout
