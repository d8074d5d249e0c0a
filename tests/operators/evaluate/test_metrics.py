"""The metrics of docs/algorithms.md section 9 on hand-made inputs whose values are worked out by hand
here: MaxSkew@k and NDKL (Geyik et al.) on small rankings, RB/AB on a small table, recall ranks,
the bootstrap counts and the balanced pool."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmbalance.operators.evaluate import metrics

LN2 = math.log(2)


def _skew(codes, classes, ks, weights=None, order=None):
    codes = np.asarray(codes)
    order = np.arange(len(codes))[None, :] if order is None else np.asarray(order)[None, :]
    w = np.ones((1, len(codes))) if weights is None else np.asarray(weights, float)[None, :]
    skew, ndkl = metrics.ranking_skew(order, codes, classes, w, ks)
    return skew[0, 0], ndkl[0, 0]


def test_maxskew_and_ndkl_of_a_ranking_that_puts_one_value_first():
    # pool a a b b (p_pool = 1/2, 1/2), ranked a a b b
    skew, ndkl = _skew([0, 0, 1, 1], 2, [1, 2, 3, 4])
    # top-1 and top-2 are all a: ln(1 / 0.5); top-3 is 2/3 a: ln((2/3) / 0.5); top-4 is the pool: 0
    assert skew == pytest.approx([LN2, LN2, math.log(4 / 3), 0.0], abs=1e-12)
    kl3 = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    z = 1 + 1 / math.log2(3) + 1 / 2 + 1 / math.log2(5)
    assert ndkl == pytest.approx((LN2 * 1 + LN2 / math.log2(3) + kl3 / 2 + 0 / math.log2(5)) / z, abs=1e-12)


def test_an_alternating_ranking_has_smaller_skew():
    skew, ndkl = _skew([0, 1, 0, 1], 2, [1, 2, 3])
    assert skew == pytest.approx([LN2, 0.0, math.log(4 / 3)], abs=1e-12)
    kl3 = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    z = 1 + 1 / math.log2(3) + 1 / 2 + 1 / math.log2(5)
    assert ndkl == pytest.approx((LN2 + kl3 / 2) / z, abs=1e-12)


def test_skew_against_an_unbalanced_pool_and_three_values():
    # pool a a a b (p_pool = 3/4, 1/4), ranked b a a a: top-1 all b -> ln(1 / (1/4)) = ln 4
    skew, ndkl = _skew([1, 0, 0, 0], 2, [1, 2])
    assert skew == pytest.approx([math.log(4), math.log(0.5 / 0.25)], abs=1e-12)
    kl = [math.log(4), 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2), 2 / 3 * math.log((2 / 3) / 0.75) + 1 / 3 * math.log((1 / 3) / 0.25), 0.0]
    disc = [1 / math.log2(i + 1) for i in range(1, 5)]
    assert ndkl == pytest.approx(sum(k * d for k, d in zip(kl, disc)) / sum(disc), abs=1e-12)
    # three values, one absent from the top: skew_v is -inf for it, MaxSkew takes the largest
    skew3, _ = _skew([2, 2, 0, 1, 0, 1], 3, [2, 6])
    assert skew3 == pytest.approx([math.log(1 / (2 / 6)), 0.0], abs=1e-12)


def test_order_ties_k_beyond_the_ranking_and_repeats():
    # the order argument ranks pool positions; codes are per pool position
    skew, _ = _skew([1, 1, 0, 0], 2, [2, 5], order=[2, 3, 0, 1])
    assert skew[0] == pytest.approx(LN2) and math.isnan(skew[1])  # k = 5 > 4 places
    # a drawn-twice image fills two places: counts (2, 0, 1, 1) over a a b b is the ranking a a b b
    # ... i.e. the first example again, even though the second a is not drawn
    twice = _skew([0, 0, 1, 1], 2, [1, 2, 3, 4], weights=[2, 0, 1, 1])
    once = _skew([0, 0, 1, 1], 2, [1, 2, 3, 4])
    np.testing.assert_allclose(twice[0], once[0], atol=1e-12)
    assert twice[1] == pytest.approx(once[1], abs=1e-12)
    # the ranking itself: scores best first, ties in pool order
    assert metrics.rankings(np.array([[0.1, 0.9, 0.9, 0.5]])).tolist() == [[1, 2, 3, 0]]


def test_rb_ab_and_accuracy_by_hand():
    # 6 neutral images: predicted a a a b | a b; labels x x x x | y y
    pred = np.array([0, 0, 0, 1, 0, 1])
    label = np.array([0, 0, 0, 0, 1, 1])
    w = np.ones((1, 6))
    shares = metrics.value_shares(pred, 2, w)
    assert shares[0] == pytest.approx([4 / 6, 2 / 6])
    assert metrics.max_abs_gap(shares, np.array([0.5, 0.5]))[0] == pytest.approx(1 / 6)
    assoc = metrics.association(pred, label, 2, 2, w)
    # share of a: x 3/4, y 1/2, overall 4/6: gaps 1/12 and 1/6 -> AB 1/6 (label y)
    assert assoc["by_label"][0, :, 0] == pytest.approx([3 / 4, 1 / 2])
    assert assoc["gap"][0] == pytest.approx([1 / 12, 1 / 6]) and assoc["ab"][0] == pytest.approx(1 / 6)
    # images without a prediction or a label are left out; a label value without images is NaN
    assoc = metrics.association(np.array([0, -1, 1]), np.array([0, 0, -1]), 2, 3, np.ones((1, 3)))
    assert assoc["overall"][0] == pytest.approx([1, 0]) and np.isnan(assoc["gap"][0, 1:]).all()
    assert assoc["ab"][0] == pytest.approx(0.0)
    truth = np.array([0, 1, -1, 1])
    assert metrics.accuracy(np.array([0, 0, 1, 1]), truth, np.ones((1, 4)))[0] == pytest.approx(2 / 3)
    # weights are multiplicities: drawing the wrong one twice
    assert metrics.accuracy(np.array([0, 0, 1, 1]), truth, np.array([[1, 2, 0, 1]]))[0] == pytest.approx(2 / 4)
    by = metrics.accuracy_by_class(np.array([0, 0, 1, 1]), truth, 3, np.ones((1, 4)))[0]
    assert by[:2] == pytest.approx([1.0, 0.5]) and np.isnan(by[2])
    # an image without a prediction (an attribute prompted with a label it lacks) is not counted
    assert metrics.accuracy(np.array([0, -1, 1, 1]), truth, np.ones((1, 4)))[0] == pytest.approx(1.0)
    assert metrics.accuracy_by_class(np.array([0, -1, 1, 1]), truth, 3, np.ones((1, 4)))[0, 1] == pytest.approx(1.0)


def test_match_ranks_and_recall():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    g = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 1.0]])
    # image 0 matches text 0 best (rank 0); image 1's own text 1 is beaten by text 2 (rank 1); image 2: text 2
    # text 0: image 0 (1.0) and image 2 (0.707): rank 0; text 1 (1, 0.1): image 0 (0.995) beats image 1
    # (0.0995), image 2 (0.77) too: rank 2; text 2: image 2 (1.0) first: rank 0
    i2t, t2i = metrics.match_ranks(q, g)
    assert i2t.tolist() == [0, 1, 0] and t2i.tolist() == [0, 2, 0]
    # an exact tie goes to the earlier gallery item
    same = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert [r.tolist() for r in metrics.match_ranks(same, same)] == [[0, 1], [0, 1]]
    # blocks of rows give the same ranks as one block
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    assert all((x == y).all() for x, y in zip(metrics.match_ranks(a, b, block=7), metrics.match_ranks(a, b)))
    ranks = np.array([0, 1, 0, 5])
    assert metrics.recall_at_k(ranks, 1, np.ones((1, 4)))[0] == pytest.approx(0.5)
    assert metrics.recall_at_k(ranks, 5, np.array([[0, 1, 1, 2]]))[0] == pytest.approx(0.5)


def test_bootstrap_counts_interval_and_pool():
    counts = np.concatenate(list(metrics.bootstrap_weights(7, 5, seed=11, chunk=2)))
    rng = np.random.default_rng(11)
    expected = [np.bincount(rng.integers(0, 7, size=7), minlength=7) for _ in range(5)]
    np.testing.assert_array_equal(counts, expected)
    assert (counts.sum(axis=1) == 7).all()
    assert metrics.interval(np.array([np.nan, 1, 2, 3, 4, 5]), 0.5) == pytest.approx([2.0, 4.0])
    assert metrics.interval(np.array([np.nan]), 0.9) is None
    codes = np.array([0, 1, 0, 0, 1, -1, 0])
    uids = [f"u{i}" for i in range(7)]
    pool = metrics.balanced_pool(codes, 2, uids, seed=5)
    assert sorted(codes[pool].tolist()) == [0, 0, 1, 1]
    # the pool follows the uids, not the row order
    perm = np.array([6, 5, 4, 3, 2, 1, 0])
    again = metrics.balanced_pool(codes[perm], 2, [uids[i] for i in perm], seed=5)
    assert sorted(uids[i] for i in pool) == sorted(uids[perm[i]] for i in again)
    assert len(metrics.balanced_pool(np.array([0, 0, -1]), 2, uids[:3], 0)) == 0
