"""The balance-method registry is the only list of methods: every method the recipe accepts has a
solver registered for it (found by importing the package's modules, no list to edit) and no solver
is registered for a method the recipe cannot name."""

from __future__ import annotations

import pytest

from mmbalance.operators.solve import SOLVERS, CorpusStats, load_solvers, register, solve
from mmbalance.schemas.balance import balance_methods
from mmbalance.schemas.recipe import parse_recipe


def test_the_recipe_names_exactly_the_registered_solvers():
    assert load_solvers() is SOLVERS
    assert set(SOLVERS) == balance_methods()


def test_a_method_without_a_solver_is_an_error(monkeypatch):
    import pyarrow as pa

    recipe = parse_recipe({"attributes": [{"name": "g", "values": ["a", "b"]}], "labels": [{"name": "y"}],
                           "balance": {"method": "reweigh", "attribute": "g", "label": "y"}})
    monkeypatch.delitem(SOLVERS, "reweigh")
    monkeypatch.setattr("mmbalance.operators.solve.load_solvers", lambda: SOLVERS)
    stats = CorpusStats(recipe, pa.table({"tag.g": ["a"], "tag.y": ["r"], "count": [1]}), {"g": ["a", "b"], "y": ["r"]}, 1)
    with pytest.raises(ValueError, match="balance.method 'reweigh' has no solver"):
        solve(stats)


def test_registration_is_by_decorator_in_any_module(monkeypatch):
    monkeypatch.setitem(SOLVERS, "probe", None)  # removed again after the test

    @register("probe")
    def solve_probe(step, stats):
        return "solved"

    assert SOLVERS["probe"] is solve_probe
