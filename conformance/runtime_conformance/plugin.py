"""The pytest plugin: ``--runtime-platform``, the fixtures the checks share, the JSON report
and the summary table.

Registered through the ``pytest11`` entry point, so every pytest run in an environment with
runtime-conformance installed loads it; without ``--runtime-platform`` it does nothing except
refuse to run the suite's own checks. It imports torch and the runtime only when asked to run,
so other test sessions neither pay for nor depend on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .report import Report
    from .target import Target

TARGET = pytest.StashKey["Target"]()
REPORT = pytest.StashKey["Report"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("runtime-conformance", "runtime platform plugin conformance")
    group.addoption("--runtime-platform", metavar="NAME", default=None,
                    help="the platform to check, as --device NAME names it (see `runtime plugins`)")
    group.addoption("--runtime-report", metavar="PATH", default=None,
                    help="where to write the JSON report (default: runtime-conformance-NAME.json)")


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("runtime_platform")
    if name:
        from .report import Report

        path = config.getoption("runtime_report") or f"runtime-conformance-{name}.json"
        config.stash[REPORT] = Report(name, Path(path))


def target_for(config: pytest.Config) -> Target | None:
    """The platform under test, discovered on first use (collection parametrizes checks by what it
    declares); None without --runtime-platform."""
    name = config.getoption("runtime_platform")
    if name and TARGET not in config.stash:
        from .target import Target

        config.stash[TARGET] = Target.discover(name)
    return config.stash.get(TARGET, None)


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Target:
    return target_for(request.config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tag the suite's checks, so the report finds them whatever the rootdir or xdist worker;
    refuse to run them without a platform."""
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.startswith("runtime_conformance.checks."):
            if not config.getoption("runtime_platform"):
                raise pytest.UsageError("runtime-conformance needs --runtime-platform NAME (`runtime plugins` lists the names)")
            from .report import CHECK_PROPERTY, check_identity

            item.user_properties.append((CHECK_PROPERTY, check_identity(module.__name__, item.name)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Record the margins of every comparison a check makes; its report keeps the closest one."""
    if REPORT not in item.config.stash:
        return (yield)
    from .compare import recording
    from .report import CHECK_PROPERTY, MARGIN_PROPERTY

    if not any(name == CHECK_PROPERTY for name, _ in item.user_properties):
        return (yield)

    with recording() as margins:
        try:
            return (yield)
        finally:
            if margins:
                closest = max(margins, key=lambda m: m.used)
                item.user_properties.append((MARGIN_PROPERTY, {**closest.as_dict(), "comparisons": len(margins)}))


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    if REPORT in session.config.stash:
        session.config.pluginmanager.register(_Recorder(session.config), "runtime-conformance-recorder")


class _Recorder:
    """Feeds each check's outcome to the report and writes it when the session ends."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.report = config.stash[REPORT]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.report.record(report)

    # target_for, not the stash: under pytest-xdist this process never collected, so it has not discovered yet.
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.report.write(target_for(self.config))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_sep("=", "runtime-conformance summary")
        terminalreporter.write_line(self.report.markdown(target_for(self.config)))
        terminalreporter.write_line(f"report written to {self.report.path}")
