"""runtime-conformance catches real bugs: runtime-cpu passes all of it, and each deliberately
broken plugin in tests/broken_plugins fails it with a message that points at the fault.

Each broken plugin runs the checks of its fault's area (and registration, which must still
pass), so only the right area may fail. All runs start together (see broken_plugins/harness.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime import __version__
from runtime.platform import CONTRACT_VERSION

from broken_plugins.harness import run_suites, write_entry_points
from runtime_conformance.cli import add_parser, pytest_arguments

TESTS = Path(__file__).parent
# One worker runs the module: the suites behind ``runs`` take ~100 s, once.
pytestmark = pytest.mark.xdist_group("conformance")


@dataclass(frozen=True)
class Fault:
    area: str
    """The check family that must fail, and the only one."""
    check: str
    """A check that must be among the failures."""
    message: re.Pattern
    """What that check's message must say."""

    @property
    def selection(self) -> str:
        """The checks to run: registration (which must pass) and the fault's area, attention in float32 only
        (and without the batch-invariance family's attention check, which a broken kernel may fail too)."""
        if self.area == "attention":
            return "registration or (attention and float32 and not batch_invariant)"
        return f"registration or {self.area}"


FAULTS = {
    "attention_ignores_last_token": Fault(
        "attention", "attention/scenario[cpu_sdpa-float32-decode]",
        re.compile(r"attention output differs from the reference in step 2 .*sequence \d+ \(\d+ cached \+ 1 new tokens.*decode\)")),
    "attention_block_table_off_by_one": Fault(
        "attention", "attention/scenario[cpu_sdpa-float32-many_blocks]",
        re.compile(r"attention output differs from the reference in step 1 .* over 19 blocks")),
    "attention_writes_next_slot": Fault(
        "attention", "attention/kv_written_to_slots[cpu_sdpa-float32]",
        re.compile(r"K/V cache after step 1 .* slots differ .* must land exactly at slot_mapping")),
    "rms_norm_without_epsilon": Fault(
        "kernels", "kernels/kernel[rms_norm-float32]", re.compile(r"rms_norm \(input \[.*\], eps .*\): \d+ of \d+ values outside")),
    "all_reduce_averages": Fault(
        "communicator", "communicator/collective[world2-all_reduce-float32]",
        re.compile(r"all_reduce .* must return the sum over the 2 ranks: .* got 2\.5, expected 5")),
    "quant_wrong_scale": Fault(
        "quantization", "quantization/apply[gguf-Q8_0-float32]",
        re.compile(r"apply\(load\(gguf Q8_0 .* vs x @ dequantize\(w\)\.T \+ bias: \d+ of \d+ values outside")),
}


def _platform(module: str) -> str:
    return __import__(f"broken_plugins.{module}", fromlist=["PLATFORM"]).PLATFORM


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("conformance")
    plugins = write_entry_points(work / "site", "broken-plugins",
                                 {name: f"broken_plugins.{name}:plugin" for name in FAULTS})
    runs = {"cpu": ("cpu", [], [])}
    runs.update({name: (_platform(name), ["-k", fault.selection], [plugins, TESTS]) for name, fault in FAULTS.items()})
    return run_suites(work, runs)


def test_cpu_passes_everything(runs):
    run = runs["cpu"]
    assert run.returncode == 0, run.output[-5000:]
    assert run.report["result"] == "pass" and not run.checks("fail")
    assert {c["family"] for c in run.report["checks"]} == {
        "registration", "attention", "kernels", "quantization", "batch_invariance", "communicator", "memory", "end_to_end"}
    # Skips are only what the plugin does not declare (it registers no kernels), each saying so.
    assert all(reason.startswith("unsupported: ") for reason in run.checks("skip").values()), run.checks("skip")
    assert len(run.checks("pass")) > 100


def test_report_describes_the_run(runs):
    report = runs["cpu"].report
    assert report["platform"] == "cpu"
    assert report["plugin"] == {"entry_point": "cpu", "distribution": "runtime-cpu", "version": __version__,
                                "contract": ">=1.0,<2"}
    assert report["contract_version"] == CONTRACT_VERSION
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert set(report["checks"][0]) == {"id", "family", "outcome", "reason", "duration_s", "margin"}
    # Each numeric check keeps its closest comparison, so a vendor sees a margin shrink before it fails.
    margins = {c["id"]: c["margin"] for c in report["checks"] if c["margin"]}
    rms = margins["kernels/kernel[rms_norm-bfloat16]"]
    assert rms["dtype"] == "bfloat16" and rms["comparisons"] == 3 and 0 < rms["used"] <= 1
    assert rms["mean"] <= rms["limit_mean"] and rms["baseline_mean"] > 0
    assert all(m["used"] <= 1 for m in margins.values())
    assert any(i.startswith("attention/") for i in margins)
    assert report["summary"]["pass"] == len(runs["cpu"].checks("pass"))
    # The summary table a vendor pastes into a README.
    assert "| area | pass | fail | skip |" in runs["cpu"].output
    assert re.search(r"\| end to end \| 7 \| 0 \| 0 \|", runs["cpu"].output)


@pytest.mark.parametrize("module", FAULTS)
def test_broken_plugin_fails_with_a_message_naming_the_fault(module, runs):
    fault, run = FAULTS[module], runs[module]
    failures = run.checks("fail")
    assert run.returncode == 1, run.output[-5000:]
    assert run.report["result"] == "fail"
    assert run.failed_families == {fault.area}, f"only {fault.area} checks may fail: {sorted(failures)}"
    assert fault.check in failures, f"{fault.check} did not fail; failures: {sorted(failures)}"
    assert fault.message.search(failures[fault.check]), failures[fault.check]
    assert len(run.checks("pass")) >= 8, "registration checks must pass: the plugin loads fine"


def test_cli_reports_an_unknown_platform(tmp_path):
    """``runtime conformance --platform NAME --report PATH -- ...`` through add_parser, on a platform no
    plugin provides: the registration check fails and says which platforms exist."""
    shim = ("import argparse, sys; from runtime_conformance.cli import add_parser; p = argparse.ArgumentParser(); "
            "add_parser(p.add_subparsers()); ns = p.parse_args(sys.argv[1:]); sys.exit(ns.func(ns))")
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-c", shim, "conformance", "--platform", "no-such-platform", "--report",
                           str(report), "--", "-q", "-k", "registration"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    checks = {c["id"]: c for c in json.loads(report.read_text())["checks"]}
    reason = checks["registration/platform_loaded"]["reason"]
    assert "unknown --device 'no-such-platform'" in reason and "cpu" in reason
    assert checks["registration/platform_metadata"]["reason"].startswith("platform not loaded")


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    ns = parser.parse_args(["conformance", "--platform", "x", "--", "-k", "attention"])
    assert pytest_arguments(ns) == ["-p", "runtime_conformance", "--pyargs", "runtime_conformance",
                                    "--runtime-platform", "x", "-k", "attention"]
