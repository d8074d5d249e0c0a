"""Hierarchical k-means with resampling, and water-filling balanced quotas over the hierarchy."""

from __future__ import annotations

import os
from itertools import pairwise

os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss
import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import adjusted_rand_score

from mmbalance.io.store import RunStore
from mmbalance.operators.arrays import fixed_size_list, unit_rows
from mmbalance.operators.cluster.index import assign, level_ids
from mmbalance.operators.cluster.kmeans import KMeansModel, fit_kmeans
from mmbalance.operators.cluster.vectors import EmbeddingSpec
from mmbalance.operators.models import load_models, save_model
from mmbalance.operators.hierarchy import (
    Hierarchy,
    balanced_keep_probability,
    closest_per_cluster,
    fit_hierarchical_kmeans,
    hierarchical_quotas,
    resampled_kmeans,
)

faiss.omp_set_num_threads(1)


def two_level_corpus(seed: int, n_super=4, n_sub=5, n=12000, d=48):
    """Super-centres, each with sub-centres around it; returns (x, sub_label, super_label)."""
    rng = np.random.default_rng(seed)
    sup = unit_rows(rng.normal(size=(n_super, d)))[0]
    sub = unit_rows(np.repeat(sup, n_sub, axis=0) + rng.normal(0, 0.7 / np.sqrt(d), size=(n_super * n_sub, d)))[0]
    sub_label = rng.integers(0, n_super * n_sub, size=n)
    x = unit_rows(sub[sub_label] + rng.normal(0, 0.25 / np.sqrt(d), size=(n, d)))[0]
    return x, sub_label, sub_label // n_sub


def random_hierarchy(rng, ks) -> Hierarchy:
    """A random tree (every parent has at least one child) for quota tests; centroids unused."""
    parents = []
    for k_child, k_parent in pairwise(ks):
        p = np.concatenate([np.arange(k_parent), rng.integers(0, k_parent, size=k_child - k_parent)])
        parents.append(rng.permutation(p).astype(np.int32))
    return Hierarchy([np.zeros((k, 2), np.float32) for k in ks], parents)


def test_two_level_hierarchy_recovers_planted_levels(tmp_path):
    x, sub, sup = two_level_corpus(seed=0)
    h = fit_hierarchical_kmeans(x, [20, 4], resample_sizes=[0, 0], seed=0, niter=25, nredo=5,
                                embedding=EmbeddingSpec("image", image_column="img"))
    level1, _ = assign(x, h.leaf_model())
    (level2,) = level_ids(level1, h.parents)
    assert adjusted_rand_score(sub, level1) >= 0.9
    assert adjusted_rand_score(sup, level2) >= 0.9
    # saved as a run saves it (the leaf centroids, the levels above in the metadata), read back, and
    # the assign step's search gives the same ids at both levels
    store = RunStore(str(tmp_path))
    save_model(store, "concept", KMeansModel(h.centroids[0], {**h.meta, "parents": [p.tolist() for p in h.parents]}))
    again = load_models(store)["concept"]
    assert again.meta["embedding"]["image_column"] == "img" and [p.tolist() for p in again.parents] == [h.parents[0].tolist()]
    table = pa.table({"img": fixed_size_list(x[:500].astype(np.float32))})
    ids, _ = assign(table, None, embedding=EmbeddingSpec("image", image_column="img"), index=again.search_index)
    np.testing.assert_array_equal(ids, level1[:500])
    np.testing.assert_array_equal(level_ids(ids, again.parents)[0], level2[:500])


def test_resampling_spreads_centroids_over_concepts():
    # one dense concept holds 90% of the points: plain k-means spends most centroids on it,
    # resampling (r closest points per centroid, re-fit, reassign) spreads them over concepts
    rng = np.random.default_rng(1)
    d = 16
    concepts = unit_rows(rng.normal(size=(10, d)))[0]
    label = np.repeat(np.arange(10), [9000] + [100] * 9)
    x = unit_rows(concepts[label] + rng.normal(0, 0.15, size=(len(label), d)))[0]
    plain = fit_kmeans(x, 20, seed=0, niter=20)
    spread, ids = resampled_kmeans(x, 20, sample_size=20, n_resamples=10, seed=0, niter=20)
    on_dense = [int((np.argmax(m.centroids @ concepts.T, axis=1) == 0).sum()) for m in (plain, spread)]
    assert on_dense[1] < on_dense[0] / 2, on_dense
    assert len(np.unique(np.argmax(spread.centroids @ concepts.T, axis=1))) == 10  # every concept covered
    assert spread.meta["n_sample"] == len(x) and spread.meta["n_resample_points"] <= 20 * 20
    np.testing.assert_array_equal(ids, assign(x, spread)[0])


def test_closest_per_cluster_takes_the_most_similar():
    ids = np.array([0, 1, 0, 0, 1, 2])
    sim = np.array([0.5, 0.9, 0.7, 0.6, 0.1, 0.3])
    np.testing.assert_array_equal(closest_per_cluster(ids, sim, 2), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(closest_per_cluster(ids, sim, 1), [1, 2, 5])


def test_quotas_sum_to_target_at_every_level_and_are_max_min_fair_per_parent():
    rng = np.random.default_rng(2)
    for trial in range(30):
        ks = sorted(rng.choice(np.arange(2, 60), size=int(rng.integers(2, 4)), replace=False).tolist(), reverse=True)
        h = random_hierarchy(rng, ks)
        leaf_sizes = rng.integers(0, 300, size=ks[0]) * (rng.random(ks[0]) < 0.9)
        total = int(leaf_sizes.sum())
        target = int(rng.integers(0, total + 50))
        quotas = hierarchical_quotas(h, leaf_sizes, target)
        sizes = h.level_sizes(leaf_sizes)
        for q, n in zip(quotas, sizes):
            assert q.sum() == min(target, total)
            assert np.all((q >= 0) & (q <= n))
        for level, parent in enumerate(h.parents):
            child_q, child_n = quotas[level], sizes[level]
            # children's quotas add up to their parent's quota
            np.testing.assert_array_equal(np.bincount(parent, weights=child_q, minlength=ks[level + 1]), quotas[level + 1])
            for p in range(ks[level + 1]):
                kids = np.flatnonzero(parent == p)
                unsaturated = kids[child_q[kids] < child_n[kids]]
                if len(unsaturated):  # max-min fair: nobody gets more than an unsaturated sibling + 1
                    assert child_q[kids].max() <= child_q[unsaturated].min() + 1
        # the top level is max-min fair too
        top_q, top_n = quotas[-1], sizes[-1]
        unsat = top_q < top_n
        if unsat.any():
            assert top_q.max() <= top_q[unsat].min() + 1


def test_quotas_hand_worked_example():
    # leaves 0..3 under top clusters [0, 0, 1, 1]; sizes 50, 10 | 30, 30; target 60:
    # top sizes 60, 60 -> 30 each; cluster 0: 20 + 10, cluster 1: 15 + 15
    h = Hierarchy([np.zeros((4, 2), np.float32), np.zeros((2, 2), np.float32)], [np.array([0, 0, 1, 1], np.int32)])
    leaf_q, top_q = hierarchical_quotas(h, np.array([50, 10, 30, 30]), 60)
    np.testing.assert_array_equal(top_q, [30, 30])
    np.testing.assert_array_equal(leaf_q, [20, 10, 15, 15])
    everything = hierarchical_quotas(h, np.array([50, 10, 30, 30]), 10**6)[0]
    np.testing.assert_array_equal(everything, [50, 10, 30, 30])


def test_keep_probability_matches_quotas():
    leaf = np.array([0, 0, 0, 0, 1, 1, -1, 2])
    p = balanced_keep_probability(leaf, np.array([2, 2, 0]), np.array([4, 2, 1]))
    np.testing.assert_allclose(p, [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 0.0, 0.0])
    assert np.bincount(leaf[leaf >= 0], weights=p[leaf >= 0]).tolist() == [2.0, 2.0, 0.0]


def test_hierarchy_inputs_are_checked():
    x, _, _ = two_level_corpus(seed=3, n=500)
    with pytest.raises(ValueError, match="decreasing"):
        fit_hierarchical_kmeans(x, [4, 20])
    h = fit_hierarchical_kmeans(x, [8, 2], niter=5)
    with pytest.raises(ValueError, match="leaf sizes"):
        hierarchical_quotas(h, np.ones(7, np.int64), 3)
