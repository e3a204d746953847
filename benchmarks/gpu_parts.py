"""Running one part of a GPU benchmark script (runtime, vLLM, report, ...) in its own process."""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable


def run_part(parts: dict[str, Callable[[argparse.Namespace], list[dict]]], args: argparse.Namespace) -> None:
    """``parts[args.part](args)``, its rows written to ``args.json`` (a failure as one error row,
    then raised), then the process ends at once."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        rows = parts[args.part](args)
    except Exception as exc:  # noqa: BLE001  (one JSON result per part, a failure included)
        args.json.write_text(json.dumps([{"part": args.part, "error": f"{type(exc).__name__}: {exc}"}], indent=1))
        raise
    args.json.write_text(json.dumps(rows, indent=1))
    os._exit(0)  # vLLM's engine processes can hold the interpreter's exit; the results are written
