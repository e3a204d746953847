"""`runtime serve --deterministic` reaches the engine, and /v1/models and /version report the mode."""

from __future__ import annotations

import dataclasses

import pytest
from litestar.testing import TestClient

from runtime.api.app import create_app
from runtime.cli import build_parser, engine_args_from
from scripted_engine import ScriptedEngine
from tiny_models import make_tiny_tokenizer


@pytest.mark.parametrize("flags, expected", [([], False), (["--deterministic"], True)])
def test_serve_flag_sets_the_engine_argument(flags, expected):
    assert engine_args_from(build_parser().parse_args(["serve", *flags])).deterministic is expected


@pytest.mark.parametrize("deterministic", [False, True])
def test_models_and_version_report_the_mode(deterministic):
    engine = ScriptedEngine(make_tiny_tokenizer())
    engine.args = dataclasses.replace(engine.args, deterministic=deterministic)
    with TestClient(create_app(engine, ["scripted"])) as http:
        models = http.get("/v1/models").json()["data"]
        version = http.get("/version").json()
    assert [card["deterministic"] for card in models] == [deterministic]
    assert version["deterministic"] is deterministic and version["version"]
