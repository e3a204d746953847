"""Communicator: every collective on the world sizes the device allows (two gloo processes on
a CPU), with correct values and shapes, in every dtype the platform supports.

All collectives of one world size run in one spawn of processes (see
:mod:`runtime_conformance.collectives`); each check below reports its part of that run.
"""

from __future__ import annotations

import pytest

from ..collectives import check_keys, run_world, world_sizes
from ..params import case, parametrize, unsupported


def pytest_generate_tests(metafunc):
    parametrize(metafunc, _collectives)


def _collectives(target):
    if target.communicator is None:
        yield unsupported("none", "no communicator registered (no --tensor-parallel-size > 1)")
        return
    sizes = world_sizes(target.platform)
    if not sizes:
        yield unsupported("one-device", f"collectives need 2 devices; this machine has {target.platform.device_count()}")
    for world in sizes:
        yield from (case((world, key), f"world{world}-{key}") for key, _, _ in check_keys(target.platform))


@pytest.fixture(scope="session")
def world_results(target):
    """World size -> its run, started on first use: one spawn per world size per session."""
    runs = {}

    def get(world: int):
        if world not in runs:
            runs[world] = run_world(target.name, world)
        return runs[world]
    return get


def test_collective(case, world_results):
    world, key = case
    problems = world_results(world).check(key)
    assert not problems, f"{key.split('-')[0]} over {world} ranks: " + "; ".join(problems)
