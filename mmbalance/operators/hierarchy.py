"""Hierarchical k-means with resampling and balanced sampling over the hierarchy (docs/algorithms.md
section 5, Vo et al. 2024).

Level 1 clusters the fit sample; level l clusters the centroids of level l-1. Within a level the
resampling step moves centroids toward an even spread over concepts: take the r points closest
to each centroid, re-run k-means on their union, reassign. Balanced sampling gives each top-level
cluster a water-filling quota of the target and recurses into the children, down to level 1;
rows then get keep-probability quota / size of their level-1 cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from mmbalance.operators.arrays import unit_rows
from mmbalance.operators.cluster.index import assign
from mmbalance.operators.cluster.kmeans import KMeansModel, faiss_seed, fit_kmeans
from mmbalance.operators.cluster.vectors import EmbeddingSpec
from mmbalance.operators.quotas import waterfill_quotas


@dataclass
class Hierarchy:
    """``centroids[0]`` are the level-1 (finest) centroids; ``parents[l][i]`` is the level-(l+2)
    cluster of level-(l+1) cluster i (0-based lists, 1-based level names)."""

    centroids: list[np.ndarray]
    parents: list[np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def levels(self) -> int:
        return len(self.centroids)

    @property
    def ks(self) -> list[int]:
        return [int(c.shape[0]) for c in self.centroids]

    def leaf_model(self) -> KMeansModel:
        return KMeansModel(self.centroids[0], {**self.meta, "level": 1})

    def level_sizes(self, leaf_sizes: np.ndarray) -> list[np.ndarray]:
        """Rows under each cluster at every level, from the level-1 counts."""
        sizes = [np.asarray(leaf_sizes, np.int64)]
        if len(sizes[0]) != self.ks[0]:
            raise ValueError(f"{len(sizes[0])} leaf sizes for {self.ks[0]} level-1 clusters")
        for parent, k in zip(self.parents, self.ks[1:]):
            sizes.append(np.bincount(parent, weights=sizes[-1], minlength=k).astype(np.int64))
        return sizes


def closest_per_cluster(ids: np.ndarray, sim: np.ndarray, r: int) -> np.ndarray:
    """Indices of the r points most similar to their own centroid, per cluster (all of a smaller one)."""
    order = np.lexsort((-sim, ids))
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    rank = np.arange(len(ids)) - np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
    return np.sort(order[rank < r])


def resampled_kmeans(
    x: np.ndarray,
    k: int,
    *,
    sample_size: int,
    n_resamples: int,
    seed: int = 0,
    **fit_kwargs: Any,
) -> tuple[KMeansModel, np.ndarray]:
    """k-means, then ``n_resamples`` times: k-means on the union of the ``sample_size`` points
    closest to each centroid, and reassign all of ``x``. Returns the model and x's assignment.

    Like the reference implementation, each re-fit starts from a fresh (seeded) initialisation
    rather than the previous centroids, so dense regions cannot keep their surplus centroids.
    """
    model = fit_kmeans(x, k, seed=seed, **fit_kwargs)
    ids, dist = assign(x, model)
    for step in range(n_resamples):
        keep = closest_per_cluster(ids, 1.0 - dist, sample_size)
        if len(keep) < k:
            break  # too few distinct points to place k centroids
        model = fit_kmeans(x[keep], k, seed=faiss_seed(seed, 1 + step), **fit_kwargs)
        ids, dist = assign(x, model)
    # the last fit saw only the resampled points: report size and fit on all of x
    model.meta.update(resample_size=sample_size, n_resamples=n_resamples, n_resample_points=model.meta["n_sample"],
                      n_sample=len(x), inertia=float(np.sum(2.0 * dist.astype(np.float64))),
                      mean_cosine=float(1.0 - dist.mean()))
    return model, ids


def fit_hierarchical_kmeans(
    x: np.ndarray,
    ks: Sequence[int],
    *,
    resample_sizes: Sequence[int] | int = 0,
    n_resamples: int = 10,
    seed: int = 0,
    embedding: EmbeddingSpec | None = None,
    **fit_kwargs: Any,
) -> Hierarchy:
    """Hierarchical spherical k-means of the unit rows of ``x`` (a fit sample): ``ks`` from the
    finest level up, e.g. [10000, 1000, 100]. ``resample_sizes`` is r per level (0 or 1: no
    resampling at that level)."""
    ks = [int(k) for k in ks]
    if not ks or any(a <= b for a, b in pairwise(ks)):
        raise ValueError(f"ks must be non-empty and strictly decreasing (finest level first), got {ks}")
    rs = [int(resample_sizes)] * len(ks) if isinstance(resample_sizes, int) else [int(r) for r in resample_sizes]
    if len(rs) != len(ks):
        raise ValueError(f"{len(rs)} resample sizes for {len(ks)} levels")
    points, ok = unit_rows(x)
    points = points[ok]
    centroids: list[np.ndarray] = []
    parents: list[np.ndarray] = []
    level_meta = []
    for level, (k, r) in enumerate(zip(ks, rs)):
        lseed = faiss_seed(seed, level)
        if r > 1 and n_resamples > 0:
            model, ids = resampled_kmeans(points, k, sample_size=r, n_resamples=n_resamples, seed=lseed, **fit_kwargs)
        else:
            model = fit_kmeans(points, k, seed=lseed, **fit_kwargs)
            ids = None
        if level > 0:
            parents.append(ids if ids is not None else assign(points, model)[0])
        centroids.append(model.centroids)
        level_meta.append({key: model.meta[key] for key in ("k", "n_sample", "inertia", "mean_cosine")}
                          | {"resample_size": r if r > 1 else 0})
        points = model.centroids  # the next level clusters these centroids
    meta = {"seed": seed, "n_resamples": n_resamples, "levels": level_meta,
            "embedding": embedding.to_dict() if embedding else None,
            **{k: v for k, v in fit_kwargs.items() if isinstance(v, (int, float, str))}}
    return Hierarchy(centroids, [p.astype(np.int32) for p in parents], meta)


def hierarchical_quotas(hierarchy: Hierarchy, leaf_sizes: np.ndarray, target: int) -> list[np.ndarray]:
    """Balanced quotas at every level (level 1 first): water-filling of ``target`` over the top
    level, then of each cluster's quota over its children, recursively. Every level sums to
    min(target, total rows) and no quota exceeds its cluster's size."""
    sizes = hierarchy.level_sizes(leaf_sizes)
    quotas = [waterfill_quotas(sizes[-1], target)]
    for level in range(hierarchy.levels - 2, -1, -1):
        parent = hierarchy.parents[level]  # level+1 -> level+2 (0-based lists)
        child_sizes = sizes[level]
        q = np.zeros(len(child_sizes), np.int64)
        order = np.argsort(parent, kind="stable")
        bounds = np.flatnonzero(np.r_[True, parent[order][1:] != parent[order][:-1], True])
        for lo, hi in pairwise(bounds):
            children = order[lo:hi]
            q[children] = waterfill_quotas(child_sizes[children], int(quotas[0][parent[children[0]]]))
        quotas.insert(0, q)
    return quotas


def balanced_keep_probability(leaf_ids: np.ndarray, leaf_quotas: np.ndarray, leaf_sizes: np.ndarray) -> np.ndarray:
    """Per-row keep probability quota / size of its level-1 cluster (0 for unassigned rows): the
    expected kept rows per cluster equal its quota, a weight the solver or exporter can round."""
    sizes = np.asarray(leaf_sizes, np.float64)
    rate = np.divide(np.asarray(leaf_quotas, np.float64), sizes, out=np.zeros_like(sizes), where=sizes > 0)
    ids = np.asarray(leaf_ids)
    return np.where(ids >= 0, rate[np.maximum(ids, 0)], 0.0)
