"""Split-and-merge local search (issue 21 item 6): split gains against a direct numpy recomputation,
and an escape from a local optimum that Lloyd iterations cannot leave."""

from __future__ import annotations

import faiss
import numpy as np

from mmbalance.operators.arrays import unit_rows
from mmbalance.operators.cluster.index import flat_ip
from mmbalance.operators.cluster.kmeans import fit_kmeans, run_lloyd
from mmbalance.operators.kmeans_swap import split_gains, swap_pairs, swap_search

faiss.omp_set_num_threads(1)


def blobs(sizes, d=16, noise=0.25, seed=0):
    """Well-separated clusters of the given sizes around random unit centres."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.normal(size=(len(sizes), d)))[0]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return unit_rows(centres[labels] + noise * rng.normal(size=(len(labels), d)) / np.sqrt(d))[0], labels, centres


def spherical_objective(x, labels):
    """Sum over clusters of |sum of members|: the mean cosine times n at the optimal centroids."""
    return sum(np.linalg.norm(x[labels == j].astype(np.float64).sum(axis=0)) for j in np.unique(labels))


def test_split_gain_is_the_objective_gain_of_the_returned_halves():
    x, planted, centres = blobs([300, 300, 500], seed=1)
    merged = np.where(planted == 2, 1, planted)  # cluster 1 holds two planted clusters, cluster 0 one
    gain, halves = split_gains(x, merged, 2, block_rows=128)  # several row blocks
    for j in range(2):
        pts = x[merged == j]
        side = (pts @ halves[j, 1] > pts @ halves[j, 0]).astype(int)
        direct = spherical_objective(pts, side) - spherical_objective(pts, np.zeros(len(pts), int))
        # the halves' own members can only do better than the membership they were computed from
        assert direct >= gain[j] - 1e-3 and gain[j] >= 0
    assert gain[1] > 20 * gain[0]  # splitting the merged pair gains far more than splitting a real cluster
    # and its halves sit on the two planted centres
    assert sorted(np.max(halves[1] @ centres[1:].T, axis=0)) > [0.95, 0.95]


def test_a_cluster_that_cannot_be_split_is_never_chosen():
    x, labels, _ = blobs([1, 200, 200], seed=2)
    gain, _ = split_gains(x, labels, 3)
    assert gain[0] == -np.inf and np.isfinite(gain[1:]).all()
    pairs = swap_pairs(np.array([0.0, 5.0, 9.0]), gain, limit=3)
    assert pairs == [(0, int(np.argmax(gain[1:])) + 1, float(gain[1:].max()))]  # moves 0, splits the best other


def test_swaps_escape_a_local_optimum_lloyd_keeps():
    # two centroids share planted cluster 0 and one covers clusters 2 and 3: Lloyd stays there
    x, planted, centres = blobs([400, 400, 400, 400], seed=3)
    start = unit_rows(np.stack([centres[0] + 0.1 * centres[1], centres[0] - 0.1 * centres[1], centres[1],
                                centres[2] + centres[3]]))[0].astype(np.float32)

    def lloyd(c):
        out, iters, _ = run_lloyd(x, 4, c, seed=0, niter=10, tol=1e-6, max_points_per_centroid=len(x), faiss_init=0, gpu=False)
        return unit_rows(out)[0], iters

    stuck, _ = lloyd(start)
    found, record = swap_search(x, stuck, lloyd, lambda c: flat_ip(c).search(x, 2), trials=5, accept=1e-4)
    best = spherical_objective(x, planted) / len(x)
    ids = np.argmax(x @ found.T, axis=1)
    assert spherical_objective(x, np.argmax(x @ stuck.T, axis=1)) / len(x) < best - 0.05  # Lloyd alone is stuck
    assert record.accepted >= 1 and len(np.unique(ids)) == 4
    assert abs(record.mean_cosine_after - np.max(x @ found.T, axis=1).mean()) < 1e-5  # recomputed here
    assert np.max(x @ found.T, axis=1).mean() >= best - 1e-3


def test_fit_records_its_trials_and_swaps_zero_turns_them_off():
    x, _, _ = blobs([50] * 3 + [2000], d=8, noise=0.6, seed=4)
    on, off = fit_kmeans(x, 4, seed=0), fit_kmeans(x, 4, seed=0, swaps=0)
    assert on.meta["swaps"] >= 1 and on.meta["swap"]["tried"] >= 1 and on.meta["converged"]
    assert off.meta["swaps"] == 0 and off.meta["swap"] is None
    assert on.meta["mean_cosine"] >= off.meta["mean_cosine"] - 1e-6
