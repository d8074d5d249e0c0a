"""R&B Regroup's choice of k: fit each k and keep the best cosine silhouette on one seeded subsample."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmbalance.operators.arrays import unit_rows
from mmbalance.operators.cluster.index import assign
from mmbalance.operators.cluster.kmeans import KMeansModel, fit_kmeans


def silhouette_cosine(x: np.ndarray, labels: np.ndarray, *, chunk_rows: int = 1024) -> float:
    """Mean silhouette with cosine distance of unit rows ``x`` (sklearn's definition: a point alone
    in its cluster scores 0). Exact, O(m^2 d), in memory O(chunk_rows * m): for a subsample."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    codes, inv = np.unique(labels, return_inverse=True)
    if not 2 <= len(codes) <= len(x) - 1:
        raise ValueError(f"silhouette needs 2 <= clusters <= points - 1, got {len(codes)} clusters, {len(x)} points")
    order = np.argsort(inv, kind="stable")
    xs, lab = x[order], inv[order]
    counts = np.bincount(lab)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    scores = np.empty(len(xs), np.float64)
    for lo in range(0, len(xs), chunk_rows):
        blk = xs[lo : lo + chunk_rows]
        dist = 1.0 - blk @ xs.T  # (b, m) cosine distances
        sums = np.add.reduceat(dist, starts, axis=1, dtype=np.float64)  # (b, clusters)
        rows = np.arange(len(blk))
        own = lab[lo : lo + len(blk)]
        self_dist = 1.0 - np.einsum("ij,ij->i", blk, blk)  # ~0, but not exactly in float32
        n_own = counts[own]
        a = (sums[rows, own] - self_dist) / np.maximum(n_own - 1, 1)
        mean_other = sums / counts
        mean_other[rows, own] = np.inf
        b = mean_other.min(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = (b - a) / np.maximum(a, b)
        scores[lo : lo + len(blk)] = np.where(n_own > 1, np.nan_to_num(s), 0.0)
    return float(scores.mean())


@dataclass
class KSweep:
    best_k: int
    scores: dict[int, float]  # silhouette per k
    models: dict[int, KMeansModel]
    score_rows: int

    @property
    def best(self) -> KMeansModel:
        return self.models[self.best_k]

    def to_dict(self) -> dict[str, Any]:
        return {"best_k": self.best_k, "silhouette": {str(k): v for k, v in self.scores.items()},
                "score_rows": self.score_rows, "inertia": {str(k): m.meta["inertia"] for k, m in self.models.items()}}


def sweep_k(
    x: np.ndarray,
    ks: Sequence[int],
    *,
    score_rows: int = 10_000,
    seed: int = 0,
    **fit_kwargs: Any,
) -> KSweep:
    """Fit spherical k-means for each k and keep the best cosine silhouette, scored on one seeded
    subsample of ``x`` shared by every k (labels from assignment to each model's centroids).
    Ties go to the smaller k."""
    x, ok = unit_rows(x)
    x = x[ok]
    rng = np.random.default_rng([seed, 0x5111])
    sub = x[np.sort(rng.choice(len(x), size=min(score_rows, len(x)), replace=False))]
    scores: dict[int, float] = {}
    models: dict[int, KMeansModel] = {}
    for k in sorted({int(k) for k in ks}):
        model = fit_kmeans(x, k, seed=seed, **fit_kwargs)
        labels, _ = assign(sub, model)
        scores[k] = silhouette_cosine(sub, labels) if len(np.unique(labels)) >= 2 else -1.0
        model.meta["silhouette"] = scores[k]
        models[k] = model
    best = max(scores, key=lambda k: (scores[k], -k))
    return KSweep(best, scores, models, len(sub))
