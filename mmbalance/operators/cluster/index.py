"""Nearest-centroid search with faiss: an exact flat inner-product index over unit centroids (on a
GPU when faiss sees one), searched one batch at a time, and the coarser levels of a hierarchy."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from mmbalance.faiss_build import import_faiss
from mmbalance.operators.arrays import unit_rows
from mmbalance.operators.cluster.vectors import EmbeddingSpec, as_unit

faiss = import_faiss()  # one faiss build (CPU or GPU), else one line naming the fix


def gpu_available() -> bool:
    """faiss-gpu is installed and sees a GPU (faiss-cpu builds lack the GPU symbols)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def use_gpu(gpu: bool | None) -> bool:
    """None: a GPU when faiss-gpu sees one; True: a GPU or an error saying why not; False: CPU."""
    available = gpu_available()
    if gpu is None:
        return available
    if gpu and not available:
        raise ValueError("a GPU was asked for, but faiss sees none (faiss-cpu build, or no visible device)")
    return bool(gpu)


def flat_ip(centroids: np.ndarray, gpu: bool = False) -> faiss.Index:
    """Exact inner-product index over the centroids, on the GPU(s) when ``gpu``."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return to_gpu(index) if gpu else index


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    # one set of GPU resources (streams, scratch memory) per process, made on first use
    return faiss.StandardGpuResources()


def to_gpu(index: faiss.Index) -> faiss.Index:
    # device 0 of what this process sees (Ray gives each GPU worker its own CUDA_VISIBLE_DEVICES)
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)


def cluster_index(centroids: np.ndarray, gpu: bool | None = None) -> faiss.Index:
    """The nearest-centroid index ``assign`` searches: flat (exact) over unit centroids (an array,
    or anything with ``.centroids``), on a GPU when ``use_gpu(gpu)``. Build once per process and
    pass as ``assign(index=...)``."""
    return flat_ip(unit_rows(getattr(centroids, "centroids", centroids))[0], use_gpu(gpu))


def search(x: np.ndarray, index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    sim, ids = index.search(x, 1)
    return ids[:, 0].astype(np.int32), sim[:, 0]


def assign(
    data: np.ndarray | pa.Table,
    centroids: np.ndarray | None,
    *,
    embedding: EmbeddingSpec | None = None,
    batch_rows: int = 16384,
    index: faiss.Index | None = None,
    gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine: (cluster_id int32, cosine distance 1 - cos float32), exact
    (a flat search over every centroid).

    Rows are processed ``batch_rows`` at a time, so the float32 working copy (and on a GPU the
    device's query buffer) never exceeds one batch. Unusable rows (null, NaN/inf, zero vector) get
    id -1 and distance NaN. Without ``index``, one is built (``cluster_index``: a GPU when
    ``use_gpu(gpu)``); pass one built once to reuse it across calls.
    """
    index = index if index is not None else cluster_index(centroids, gpu)
    n = data.num_rows if isinstance(data, pa.Table) else len(data)
    ids = np.full(n, -1, np.int32)
    dist = np.full(n, np.nan, np.float32)
    for start in range(0, n, batch_rows):
        part = data.slice(start, batch_rows) if isinstance(data, pa.Table) else data[start : start + batch_rows]
        x, ok = as_unit(part, embedding)
        if not ok.any():
            continue
        if x.shape[1] != index.d:
            raise ValueError(f"embeddings have dimension {x.shape[1]}, centroids {index.d}")
        i, s = search(x[ok] if not ok.all() else x, index)
        rows = np.arange(start, start + len(ok))[ok]
        ids[rows] = i
        dist[rows] = np.clip(1.0 - s, 0.0, 2.0)
    return ids, dist


def level_ids(leaf_ids: np.ndarray, parents: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Cluster ids at the coarser levels of a hierarchy (level 2 first) from level-1 ids;
    ``parents[l][i]`` is the level-(l+2) cluster of level-(l+1) cluster i; -1 stays -1."""
    out, prev = [], np.asarray(leaf_ids)
    for parent in parents:
        prev = np.where(prev >= 0, np.asarray(parent)[np.maximum(prev, 0)], -1)
        out.append(prev)
    return out


def cluster_tags(ids: np.ndarray) -> pa.Array:
    """Cluster ids as the label's string values; null where a row has none (-1)."""
    return pa.array([str(i) if i >= 0 else None for i in ids.tolist()], pa.string())
