"""waterfill_quotas against a brute-force leximin reference, and the waterfill method."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmbalance.operators.solve import CorpusStats, solve
from mmbalance.operators.solve.waterfill import waterfill_quotas
from mmbalance.schemas.recipe import parse_recipe


def leximin_optimal(sizes: list[int], target: int) -> set[tuple[int, ...]]:
    """All allocations 0 <= q <= n with sum min(target, sum n) whose sorted vector is leximin-best."""
    total = min(target, sum(sizes))
    feasible = [q for q in itertools.product(*(range(n + 1) for n in sizes)) if sum(q) == total]
    best = max(sorted(q) for q in feasible)
    return {q for q in feasible if sorted(q) == best}


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=0, max_size=4), target=st.integers(0, 22))
def test_quotas_are_max_min_fair(sizes, target):
    q = waterfill_quotas(np.array(sizes, dtype=np.int64), target)
    assert q.dtype == np.int64
    assert tuple(int(v) for v in q) in leximin_optimal(sizes, target)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 10**12), min_size=1, max_size=50), frac=st.floats(0, 1.2))
def test_quotas_sum_exactly_and_respect_sizes_at_scale(sizes, frac):
    n = np.array(sizes, dtype=np.int64)
    target = int(frac * n.sum())
    q = waterfill_quotas(n, target)
    assert int(q.sum()) == min(target, int(n.sum()))
    assert np.all((q >= 0) & (q <= n))
    # max-min: a cluster below its size is within one of the largest quota
    if np.any(q < n):
        assert q[q < n].min() >= q.max() - 1


def test_remainder_goes_to_the_first_large_clusters_in_index_order():
    # x = 3 gives 1 + 3 + 3 + 3 = 10; the remaining 2 go to clusters 1 and 2
    assert waterfill_quotas(np.array([1, 9, 5, 7]), 12).tolist() == [1, 4, 4, 3]
    assert waterfill_quotas(np.array([4, 4]), 100).tolist() == [4, 4]
    assert waterfill_quotas(np.array([], dtype=np.int64), 5).tolist() == []


@pytest.mark.parametrize("bad", [np.array([-1, 3]), np.array([1.5, 2.0]), np.array([[1, 2]])])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError):
        waterfill_quotas(bad, 3)


def test_waterfill_method_weights_are_quota_over_count():
    recipe = parse_recipe({
        "labels": [{"name": "occ"}],
        "balance": {"method": "waterfill", "by": "occ", "size": 30, "unlabeled": "drop"},
    })
    sig = pa.table({"tag.occ": ["a", "b", "c", None], "count": pa.array([100, 8, 20, 5], pa.int64())})
    sol = solve(CorpusStats(recipe, sig, {"occ": ["a", "b", "c"]}, 133))
    w = sol.weights(pa.table({"tag.occ": ["a", "b", "c", None]}))
    expected = waterfill_quotas(np.array([100, 8, 20]), 30) / np.array([100, 8, 20])
    np.testing.assert_array_equal(w[:3], expected)
    assert w[3] == 0.0
    assert sol.diagnostics["expected_labeled_rows"] == 30


def test_waterfill_unknown_label_is_a_recipe_error():
    with pytest.raises(ValueError, match="balance.by names 'job'"):
        parse_recipe({"labels": [{"name": "occ"}], "balance": {"method": "waterfill", "by": "job", "retention": 0.5}})
