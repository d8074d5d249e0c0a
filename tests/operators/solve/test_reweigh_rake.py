"""Reweighing equals its closed form exactly; raking meets its marginals or says it did not."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mmbalance.operators.solve import CorpusStats, solve
from mmbalance.schemas.recipe import parse_recipe

BASE = {"attributes": [{"name": "g", "values": ["w", "m"]}], "labels": [{"name": "occ"}, {"name": "place"}]}
SIG = pa.table({
    "tag.g": ["w", "w", "m", "m", "w", None, "m", "m"],
    "tag.occ": ["a", "b", "a", "b", None, "a", "c", "a"],
    "tag.place": ["in", "in", "in", "out", "out", "in", "out", "out"],
    "count": pa.array([30, 10, 20, 40, 7, 9, 5, 11], pa.int64()),
})
VOCAB = {"g": ["w", "m"], "occ": ["a", "b", "c"], "place": ["in", "out"]}


def stats(balance: dict) -> CorpusStats:
    return CorpusStats(parse_recipe({**BASE, "balance": balance}), SIG, VOCAB, int(np.sum(SIG["count"].to_numpy())))


def test_reweigh_equals_the_closed_form_exactly():
    sol = solve(stats({"method": "reweigh", "attribute": "g", "label": "occ"}))
    w = sol.weights(SIG.select(["tag.g", "tag.occ"]))
    # cells over rows carrying both: (w,a)=30 (w,b)=10 (m,a)=20+11 (m,b)=40 (m,c)=5; n = 116
    n_s = {"w": 40, "m": 76}
    n_y = {"a": 61, "b": 50, "c": 5}
    n_sy = {("w", "a"): 30, ("w", "b"): 10, ("m", "a"): 31, ("m", "b"): 40, ("m", "c"): 5}
    expected = [
        n_s[s] * n_y[y] / (116 * n_sy[(s, y)]) if (s, y) in n_sy else 1.0
        for s, y in zip(SIG["tag.g"].to_pylist(), SIG["tag.occ"].to_pylist())
    ]
    assert w.tolist() == expected


def test_rake_meets_the_target_marginals():
    sol = solve(stats({
        "method": "rake", "targets": {"g": {"w": 0.5, "m": 0.5}},
        "label_targets": {"place": {"in": 0.3, "out": 0.7}}, "tolerance": 1e-10, "retention": 0.8,
    }))
    d = sol.diagnostics
    assert d["converged"] and d["max_share_error"] <= 1e-10
    w = sol.weights(SIG.select(["tag.g", "tag.place"]))
    cw = SIG["count"].to_numpy() * w
    g = np.array(SIG["tag.g"].to_pylist(), dtype=object)
    place = np.array(SIG["tag.place"].to_pylist(), dtype=object)
    carrying = g != None  # noqa: E711
    assert cw[g == "w"].sum() / cw[carrying].sum() == pytest.approx(0.5, abs=1e-10)
    assert cw[place == "in"].sum() / cw.sum() == pytest.approx(0.3, abs=1e-10)
    assert cw.sum() / SIG["count"].to_numpy().sum() == pytest.approx(0.8, rel=1e-12)


def test_rake_reports_non_convergence():
    # occ=c only occurs with g=m, so "g=w only" and "occ=c only" cannot both hold: the weights collapse
    sol = solve(stats({
        "method": "rake", "targets": {"g": {"w": 1.0, "m": 0.0}},
        "label_targets": {"occ": {"a": 0.0, "b": 0.0, "c": 1.0}}, "max_iterations": 50,
    }))
    assert not sol.diagnostics["converged"] and "warning" in sol.diagnostics


@pytest.mark.parametrize("balance, message", [
    ({"method": "reweigh", "attribute": "occ", "label": "occ"}, "balance.attribute names 'occ'"),
    ({"method": "reweigh", "attribute": "g", "label": "job"}, "balance.label names 'job'"),
    ({"method": "rake", "label_targets": {"job": {"x": 1.0}}}, "balance.label_targets names 'job'"),
    ({"method": "rake", "label_targets": {"occ": {"zz": 1.0}}}, "balance.label_targets.occ has values no row carries"),
])
def test_user_errors_name_the_recipe_key(balance, message):
    with pytest.raises(ValueError, match=message):
        solve(stats(balance))
