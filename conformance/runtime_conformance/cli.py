"""``runtime conformance --platform NAME``: the suite through pytest, as a subcommand of ``runtime``.

Equivalent to ``pytest -p runtime_conformance --pyargs runtime_conformance --runtime-platform
NAME [--runtime-report PATH] [PYTEST_ARGS...]``; the exit status is pytest's (0: every check
passed or was reported unsupported).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "conformance", help="check an installed platform plugin against the plugin contract",
        description="Run runtime-conformance on one platform; writes a JSON report and prints a summary table.")
    parser.add_argument("--platform", required=True, metavar="NAME", help="platform to check (see `runtime plugins`)")
    parser.add_argument("--report", metavar="PATH", default=None,
                        help="JSON report path (default: runtime-conformance-NAME.json)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help="after --, arguments for pytest, e.g. -- -k attention -x")
    parser.set_defaults(func=run)
    return parser


def pytest_arguments(ns: argparse.Namespace) -> list[str]:
    # -p by the entry-point name loads the plugin even where PYTEST_DISABLE_PLUGIN_AUTOLOAD is set.
    args = ["-p", "runtime_conformance", "--pyargs", "runtime_conformance", "--runtime-platform", ns.platform]
    if ns.report:
        args += ["--runtime-report", ns.report]
    extra = list(ns.pytest_args)
    return args + (extra[1:] if extra[:1] == ["--"] else extra)


def run(ns: argparse.Namespace) -> int:
    import pytest

    return int(pytest.main(pytest_arguments(ns)))
