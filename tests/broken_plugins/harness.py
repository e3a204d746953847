"""Running runtime-conformance the way a vendor's CI does: pytest in a subprocess.

Not a plugin: the harness tests/test_conformance*.py run the broken plugins (and the good
ones) with. Several runs start at once and are waited for together:
each is mostly interpreter start-up and single-threaded checks, so two cores overlap them well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SUITE = [sys.executable, "-m", "pytest", "-p", "runtime_conformance", "--pyargs", "runtime_conformance",
         "-q", "-p", "no:cacheprovider"]


@dataclass
class SuiteRun:
    returncode: int
    output: str
    report: dict

    def checks(self, outcome: str) -> dict[str, str]:
        """Check id -> reason, for the checks with ``outcome`` (pass, fail or skip)."""
        return {c["id"]: c["reason"] for c in self.report["checks"] if c["outcome"] == outcome}

    @property
    def failed_families(self) -> set[str]:
        return {c["family"] for c in self.report["checks"] if c["outcome"] == "fail"}


def write_entry_points(directory: Path, distribution: str, entry_points: dict[str, str]) -> Path:
    """A dist-info declaring ``runtime.platforms`` entry points, so discovery finds modules on the path."""
    info = directory / f"{distribution.replace('-', '_')}-0.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.0.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[runtime.platforms]\n{lines}")
    return directory


def run_suites(work: Path, runs: dict[str, tuple[str, list[str], list[Path]]]) -> dict[str, SuiteRun]:
    """Start every run at once; ``runs`` maps a label to (platform, extra pytest args, extra sys.path entries)."""
    started = {}
    for label, (platform, extra, paths) in runs.items():
        # Other pytest plugins in this environment only slow each start; ours is loaded by -p.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        report = work / f"{label}.json"
        command = [*SUITE, "--runtime-platform", platform, "--runtime-report", str(report), *extra]
        process = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started[label] = (process, report)
    results = {}
    for label, (process, report) in started.items():
        output, _ = process.communicate(timeout=600)
        assert report.exists(), f"{label}: the suite wrote no report:\n{output[-3000:]}"
        results[label] = SuiteRun(process.returncode, output, json.loads(report.read_text()))
    return results
