"""The conformance suite measured: every mutated kernel of tests/conformance_mutations.py fails
the suite's own checks, in every dtype where it is a fault, by a margin (its mean error at least
``MARGIN`` times the mean limit), and the failure names the op or sequence at fault."""

from __future__ import annotations

import pytest

from conformance_mutations import MARGIN, MUTATIONS, run
from runtime_conformance.compare import dtype_name

pytestmark = pytest.mark.xdist_group("conformance")


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_mutation_is_caught_by_a_margin(mutation):
    for dtype in mutation.dtypes:
        outcomes = run(mutation, dtype)
        caught = [o for o in outcomes if o.message]
        assert caught, f"{mutation.name} ({mutation.fault}) passes every check in {dtype_name(dtype)}"
        best = max(caught, key=lambda o: o.ratio)
        assert best.ratio >= MARGIN, (f"{mutation.name} in {dtype_name(dtype)} caught only narrowly: "
                                      f"{[(o.check, round(o.ratio, 2)) for o in caught]}")
        for outcome in caught:
            op = outcome.check.split(":")[0]
            assert outcome.message.startswith(op) or "sequence" in outcome.message, outcome.message

