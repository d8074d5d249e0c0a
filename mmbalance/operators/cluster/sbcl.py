"""SBCL subclasses (docs/algorithms.md section 3): class c splits into K_c = max(1, floor(n_c /
max(min n, M0))) spherical k-means clusters of its rows, fitted on a sample capped per class."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.operators.arrays import one_array, unit_rows
from mmbalance.operators.cluster.kmeans import faiss_seed, fit_kmeans
from mmbalance.schemas.contract import InputError


def sbcl_subclass_counts(class_sizes: np.ndarray, m0: int) -> np.ndarray:
    """SBCL: K_c = max(1, floor(n_c / max(min_c' n_c', M0))), the min over non-empty classes.
    An empty class gets 0 subclasses (it has no rows to split)."""
    n = np.asarray(class_sizes, dtype=np.int64)
    if m0 < 1:
        raise ValueError(f"M0 must be >= 1, got {m0}")
    if np.any(n < 0):
        raise ValueError("class sizes must be non-negative")
    present = n > 0
    if not present.any():
        return np.zeros_like(n)
    floor_size = max(int(n[present].min()), int(m0))
    return np.where(present, np.maximum(1, n // floor_size), 0)


def subclass_caps(sizes: dict[str, int], m0: int, points_per_subclass: int, budget: int) -> tuple[dict[str, int], int]:
    """SBCL per-class fit caps min(n_c, K_c * p) with the largest p <= ``points_per_subclass`` whose
    caps sum to at most ``budget`` rows; returns (caps, p). Every class gets at least K_c rows."""
    names = sorted(sizes)
    n = np.array([sizes[c] for c in names], np.int64)
    counts = sbcl_subclass_counts(n, m0)
    if counts.sum() > budget:
        raise InputError(f"{int(counts.sum())} SBCL subclasses need at least as many fit rows, but sample.size is "
                         f"{budget}: raise sample.size or m0")
    lo, hi = 1, int(points_per_subclass)  # p = 1 fits: sum(min(n_c, K_c)) <= sum(K_c) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(n, counts * mid).sum() <= budget else (lo, mid - 1)
    return {c: int(v) for c, v in zip(names, np.minimum(n, counts * lo))}, lo


@dataclass
class SubclassModel:
    """SBCL subclasses: class i owns global ids offsets[i] .. offsets[i] + counts[i] - 1. Saved and
    loaded by ``operators.models`` (kind ``subclass``)."""

    classes: list[Any]  # class values (str or int), in the order of ``counts``
    counts: np.ndarray  # K_c per class
    centroids: np.ndarray  # (sum K_c, d), unit rows, grouped by class
    meta: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "subclass"

    @property
    def offsets(self) -> np.ndarray:
        return np.r_[0, np.cumsum(self.counts)[:-1]].astype(np.int64)

    def assign(self, x: np.ndarray, class_labels: pa.Array | np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
        """Nearest subclass centroid of each row's own class: (global subclass id int32, 1 - cos);
        -1 / NaN for rows whose class is null or unknown, or whose vector is unusable."""
        x, ok = unit_rows(x)
        labels = pa.array(class_labels) if not isinstance(class_labels, (pa.Array, pa.ChunkedArray)) else class_labels
        value_set = pa.array(self.classes)
        if labels.type != value_set.type:
            labels = pc.cast(labels, value_set.type)
        cls = pc.fill_null(pc.index_in(labels, value_set=value_set), -1).to_numpy(zero_copy_only=False)
        ids = np.full(len(x), -1, np.int32)
        dist = np.full(len(x), np.nan, np.float32)
        use = ok & (cls >= 0)
        offsets = self.offsets
        order = np.argsort(np.where(use, cls, -1), kind="stable")
        sorted_cls = np.where(use, cls, -1)[order]
        bounds = np.flatnonzero(np.r_[True, sorted_cls[1:] != sorted_cls[:-1], True])
        for lo, hi in pairwise(bounds):
            c = sorted_cls[lo]
            if c < 0:
                continue
            rows = order[lo:hi]
            block = self.centroids[offsets[c] : offsets[c] + self.counts[c]]
            sim = x[rows] @ block.T  # K_c is small: a matmul beats building an index per class
            best = sim.argmax(axis=1)
            ids[rows] = offsets[c] + best
            dist[rows] = np.clip(1.0 - sim[np.arange(len(rows)), best], 0.0, 2.0)
        return ids, dist

    def tags(self, ids: np.ndarray) -> pa.Array:
        """Global subclass ids as the label's values '<class>/<j>'; null where a row has none (-1)."""
        owner = np.searchsorted(self.offsets, ids, side="right") - 1
        return pa.array(
            [f"{self.classes[o]}/{i - self.offsets[o]}" if i >= 0 else None for i, o in zip(ids.tolist(), owner.tolist())],
            pa.string(),
        )

    def files(self) -> tuple[np.ndarray, dict[str, Any]]:
        return self.centroids, {**self.meta, "kind": self.kind, "classes": self.classes, "counts": self.counts.tolist()}

    @classmethod
    def from_files(cls, array: np.ndarray, meta: dict[str, Any]) -> "SubclassModel":
        return cls(meta["classes"], np.asarray(meta["counts"], np.int64), array, meta)


def fit_subclasses(
    x: np.ndarray,
    class_labels: pa.Array | np.ndarray | list,
    *,
    m0: int,
    class_sizes: dict[Any, int] | None = None,
    seed: int = 0,
    **fit_kwargs: Any,
) -> SubclassModel:
    """SBCL subclasses by spherical k-means inside each class.

    ``x``/``class_labels`` are the fit points (e.g. a sample stratified by class); ``class_sizes``
    are the corpus counts n_c that set K_c (default: counted from ``class_labels``, i.e. the fit
    points are the whole corpus). A class needs at least K_c fit points: the rule is never bent.
    """
    x, ok = unit_rows(x)
    labels = pa.array(class_labels) if not isinstance(class_labels, (pa.Array, pa.ChunkedArray)) else one_array(class_labels)
    ok &= labels.is_valid().to_numpy(zero_copy_only=False)
    x, labels = x[ok], labels.filter(pa.array(ok))
    if class_sizes is None:
        vc = pc.value_counts(labels)
        class_sizes = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))
    classes = sorted(c for c, size in class_sizes.items() if size > 0)
    counts = sbcl_subclass_counts(np.array([class_sizes[c] for c in classes], np.int64), m0)
    value_set = pa.array(classes)
    if labels.type != value_set.type:
        labels = pc.cast(labels, value_set.type)
    code = pc.fill_null(pc.index_in(labels, value_set=value_set), -1).to_numpy(zero_copy_only=False)
    blocks = []
    for i, (c, k_c) in enumerate(zip(classes, counts)):
        pts = x[code == i]
        if len(pts) < k_c:
            raise ValueError(f"class {c!r}: {len(pts)} fit points for K_c={k_c} subclasses "
                             f"(n_c={class_sizes[c]}, M0={m0}); sample more points for this class")
        if k_c == 1:
            blocks.append(unit_rows(pts.sum(axis=0, keepdims=True))[0])  # spherical mean
        else:
            blocks.append(fit_kmeans(pts, int(k_c), seed=faiss_seed(seed, i), **fit_kwargs).centroids)
    centroids = np.concatenate(blocks) if blocks else np.zeros((0, x.shape[1]), np.float32)
    meta = {"m0": m0, "seed": seed, "class_sizes": [int(class_sizes[c]) for c in classes],
            "fit_points": [int((code == i).sum()) for i in range(len(classes))], **{k: v for k, v in fit_kwargs.items()
                                                                                     if isinstance(v, (int, float, str))}}
    return SubclassModel(classes, counts.astype(np.int64), centroids, meta)
