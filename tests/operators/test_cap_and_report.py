import polars as pl
import pyarrow as pa
import pytest

from mmbalance.operators.report import association_gaps, attribute_representation, concept_balance
from mmbalance.operators.solve import CorpusStats, LookupSolution, solution_from_dict, solve
from mmbalance.operators.solve.cap import cap_probabilities
from mmbalance.schemas.recipe import parse_recipe


def test_cap_probabilities_follow_metaclip():
    assert cap_probabilities({"a": 10, "b": 3, "c": 4}, 4) == {"a": 0.4, "b": 1.0, "c": 1.0}


def _stats(unlabeled="keep"):
    recipe = parse_recipe({
        "attributes": [{"name": "g", "values": ["w", "m"]}],
        "labels": [{"name": "occ"}],
        "balance": {"method": "cap", "by": "occ", "cap": 50, "unlabeled": unlabeled},
    })
    sig = pa.table({
        "tag.g": ["w", "m", "w", None, None],
        "tag.occ": ["a", "a", "b", "a", None],
        "count": pa.array([100, 60, 20, 40, 30], pa.int64()),
    })
    return CorpusStats(recipe, sig, {"g": ["w", "m"], "occ": ["a", "b"]}, 250)


@pytest.mark.parametrize("unlabeled, expected", [("keep", 1.0), ("drop", 0.0)])
def test_cap_solution_round_trips_and_weighs(unlabeled, expected):
    sol = solve(_stats(unlabeled))
    again = solution_from_dict(sol.to_dict())
    tags = pa.table({"tag.g": ["w", None, "m", "w"], "tag.occ": ["a", None, "b", "zzz"]})
    with pytest.raises(ValueError, match="no weight for tags"):
        again.weights(tags)
    w = again.weights(tags.slice(0, 3))
    assert w.tolist() == [50 / 200, expected, 1.0]
    assert sol.diagnostics["expected_rows"] == 50 + 20 + 30 * expected


def test_lookup_solution_without_keys():
    sol = LookupSolution("none", [], {}, [1.0], default=1.0)
    assert sol.weights(pa.table({"x": [1, 2]})).tolist() == [1.0, 1.0]


def test_metrics_on_a_hand_computed_table():
    frame = pl.DataFrame({
        "tag.g": ["w", "m", "w", "m", None],
        "tag.occ": ["a", "a", "b", "b", "a"],
        "count": [30, 10, 10, 50, 99],
    })
    rep = attribute_representation(frame, "count", "g", ["w", "m"], {"w": 0.5, "m": 0.5})
    assert rep["share"] == {"w": 0.4, "m": 0.6}  # the no-person rows do not count
    assert rep["rb"] == pytest.approx(0.1)
    ab = association_gaps(frame, "count", "g", ["w", "m"], "occ", ["a", "b"])
    # P(a | w) = 30/40, P(a | m) = 10/60
    assert ab["gaps"]["w"]["a"] == pytest.approx(0.75 - 1 / 6)
    assert ab["gaps"]["m"]["b"] == pytest.approx(50 / 60 - 10 / 40)
    assert ab["ab"] == pytest.approx(0.75 - 1 / 6)
    cb = concept_balance(frame, "count", "occ")
    assert cb["values"] == 2 and cb["largest"] == 139 and cb["top1pct_share"] == pytest.approx(139 / 199)
    assert cb["gini"] == pytest.approx((139 - 60) / (2 * 199))
