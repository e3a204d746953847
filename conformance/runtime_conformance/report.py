"""The machine-readable report (JSON) and the summary table a vendor can paste into a README."""

from __future__ import annotations

import json
import platform as host
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

import runtime
from runtime.platform import CONTRACT_VERSION

from . import __version__

if TYPE_CHECKING:
    from .target import Target

FAMILIES = ("registration", "attention", "kernels", "quantization", "batch_invariance", "communicator", "memory",
            "end_to_end")
_OUTCOMES = {"passed": "pass", "failed": "fail", "skipped": "skip"}


@dataclass
class Check:
    id: str
    """``family/check[parameters]``, e.g. ``attention/scenario[cpu_sdpa-bfloat16-decode]``."""
    family: str
    outcome: str
    """pass, fail or skip."""
    reason: str
    """Why it failed or was skipped (a skip that starts with "unsupported:" is a feature the plugin does not declare)."""
    duration_s: float
    margin: dict | None = None
    """The statistics of the check's comparison closest to failing (:class:`runtime_conformance.compare.Margin`,
    plus how many comparisons it made), or None for a check that compares no numbers. A ``used``
    creeping towards 1 over releases is a margin shrinking before it fails."""


CHECK_PROPERTY = "runtime_conformance_check"
"""The user property carrying (family, check id) from each collected check to its reports."""
MARGIN_PROPERTY = "runtime_conformance_margin"
"""The user property carrying a check's closest comparison (a dict) to its call report."""


def check_identity(module_name: str, item_name: str) -> tuple[str, str]:
    """(family, id) of a check: ``checks.test_attention`` / ``test_scenario[x]`` -> attention, attention/scenario[x]."""
    family = module_name.rsplit(".", 1)[-1].removeprefix("test_")
    return family, f"{family}/{item_name.removeprefix('test_')}"


def _reason(report: pytest.TestReport) -> str:
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return report.longrepr[2].removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    return crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]


class Report:
    def __init__(self, platform_name: str, path: Path):
        self.platform_name, self.path = platform_name, path
        self.checks: dict[str, Check] = {}

    def record(self, report: pytest.TestReport) -> None:
        """Keep each check's call outcome, or its setup/teardown outcome where that failed or skipped."""
        properties = dict(report.user_properties)
        ids = properties.get(CHECK_PROPERTY)
        if ids is None or (report.when != "call" and report.passed):
            return
        family, check_id = ids
        previous = self.checks.get(check_id)
        if previous is not None and previous.outcome == "fail":
            return  # a teardown error must not hide the call's failure
        self.checks[check_id] = Check(check_id, family, _OUTCOMES[report.outcome], _reason(report),
                                      round(report.duration, 3), properties.get(MARGIN_PROPERTY))

    def header(self, target: Target | None) -> dict:
        status = target.status if target else None
        plugin = target.plugin if target else None
        platform = target.platform if target else None
        return {
            "suite": {"name": "runtime-conformance", "version": __version__},
            "platform": self.platform_name,
            "plugin": {"entry_point": status.name if status else None,
                       "distribution": status.distribution if status else None,
                       "version": status.version if status else None,
                       "contract": getattr(plugin, "RUNTIME_CONTRACT", None)},
            "contract_version": CONTRACT_VERSION,
            "runtime_version": runtime.__version__,
            "torch_version": torch.__version__,
            "host": f"{host.system()} {host.machine()}",
            "device": {"type": platform.device_type, "name": platform.device_name(0), "count": platform.device_count()}
            if platform else None,
            "problem": target.problem if target else "not collected",
        }

    def counts(self) -> Counter:
        return Counter(check.outcome for check in self.checks.values())

    def passed(self) -> bool:
        """Nothing failed and something passed: a run that checked nothing proves nothing."""
        counts = self.counts()
        return not counts["fail"] and counts["pass"] > 0

    def write(self, target: Target | None) -> None:
        counts = self.counts()
        data = {**self.header(target),
                "result": "pass" if self.passed() else "fail",
                "summary": {"pass": counts["pass"], "fail": counts["fail"], "skip": counts["skip"]},
                "checks": [asdict(c) for c in self.checks.values()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=2) + "\n")

    def markdown(self, target: Target | None) -> str:
        """A Markdown table per check family, then every failure and every distinct skip reason."""
        head = self.header(target)
        plugin, device = head["plugin"], head["device"]
        counts = self.counts()
        verdict = "PASSED" if self.passed() else "FAILED"
        about = (f"{plugin['distribution']} {plugin['version']}, contract {head['contract_version']} "
                 f"[plugin supports {plugin['contract']}], device: {device['name']}" if device
                 else f"contract {head['contract_version']}; platform not loaded: {head['problem']}")
        lines = [f"**runtime-conformance {__version__}: platform `{self.platform_name}` {verdict}** ({about})", "",
                 "| area | pass | fail | skip |", "| --- | ---: | ---: | ---: |"]
        families = sorted({c.family for c in self.checks.values()},
                          key=lambda f: FAMILIES.index(f) if f in FAMILIES else len(FAMILIES))
        for family in families:
            per = Counter(c.outcome for c in self.checks.values() if c.family == family)
            mark = " ❌" if per["fail"] else ""
            lines.append(f"| {family.replace('_', ' ')}{mark} | {per['pass']} | {per['fail']} | {per['skip']} |")
        lines.append(f"| **total** | {counts['pass']} | {counts['fail']} | {counts['skip']} |")
        failures = [c for c in self.checks.values() if c.outcome == "fail"]
        if failures:
            lines += ["", "Failed:"] + [f"- `{c.id}`: {c.reason[:300]}" for c in failures]
        skips = Counter((c.family, c.reason) for c in self.checks.values() if c.outcome == "skip")
        if skips:
            lines += ["", "Skipped:"] + [f"- {family}: {reason} ({n}x)" for (family, reason), n in skips.items()]
        return "\n".join(lines)
