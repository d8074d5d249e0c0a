"""Spherical k-means with faiss on every sampled row (docs/algorithms.md sections 2 and 3): Lloyd to
convergence with restarts and split-and-merge trials (``kmeans_swap``) while cheap; at large k
(``TWO_LEVEL_MIN_K``) in two levels (coarse cells, each split by size, IVF-refined)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from mmbalance.operators.arrays import unit_rows
from mmbalance.operators.cluster.index import assign, cluster_index, faiss, flat_ip, search, to_gpu, use_gpu
from mmbalance.operators.cluster.vectors import EmbeddingSpec
from mmbalance.operators.kmeans_swap import swap_search


@dataclass
class KMeansModel:
    """Centroids and what made them; a hierarchy's upper levels ride in ``meta["parents"]``.
    Saved and loaded by ``operators.models`` (kind ``cluster``)."""

    centroids: np.ndarray  # (k, d) float32, unit rows
    meta: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "cluster"

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def parents(self) -> list[np.ndarray]:
        """The hierarchy above the leaves: parents[l][i] = level-(l+2) cluster of level-(l+1) cluster i."""
        return [np.asarray(p, np.int64) for p in self.meta.get("parents", [])]

    @functools.cached_property
    def search_index(self):
        """The nearest-centroid index (built once per process, on a GPU when faiss sees one)."""
        return cluster_index(self.centroids)

    def files(self) -> tuple[np.ndarray, dict[str, Any]]:
        return self.centroids, {**self.meta, "kind": self.kind}

    @classmethod
    def from_files(cls, array: np.ndarray, meta: dict[str, Any]) -> "KMeansModel":
        return cls(array, meta)


def faiss_seed(seed: int, *stream: int) -> int:
    # faiss takes a 31-bit int seed; derive independent ones for sub-fits from (seed, stream...)
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0] & 0x7FFFFFFF)


def default_init_size(n: int, k: int, init_size: int | None = None) -> int:
    # 10 per centroid seeded as well as 30 in our runs (quality was within restart noise)
    return min(n, init_size or max(10 * k, 4096))


def greedy_kmeanspp(x: np.ndarray, k: int, *, seed: int = 0, init_size: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding (as in scikit-learn) of unit rows, on a seeded subsample of
    ``init_size`` rows (default min(n, max(10 k, 4096))): each step draws 2 + ln k candidates by D^2 and keeps
    the one that lowers the potential most. Cost ~ k (2 + ln k) init_size d flops.

    faiss's own k-means++ draws one candidate per step; on Zipf-sized clusters that left k-means
    in visibly worse optima (benchmarks/bench_cluster.py records both)."""
    rng = np.random.default_rng([seed, 0x6B2B])
    m = default_init_size(len(x), k, init_size)
    pts = x[np.sort(rng.choice(len(x), size=m, replace=False))] if m < len(x) else x
    trials = 2 + int(np.log(k))
    chosen = [int(rng.integers(m))]
    closest = np.maximum(2.0 - 2.0 * (pts @ pts[chosen[0]]), 0.0).astype(np.float64)
    for _ in range(1, k):
        cum = np.cumsum(closest)
        if cum[-1] <= 0:  # fewer distinct points than k: faiss splits the duplicates later
            chosen.append(int(rng.integers(m)))
            continue
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1]), m - 1)
        dist = np.maximum(2.0 - 2.0 * (pts[cand] @ pts.T), 0.0)
        pot = np.minimum(closest, dist).sum(axis=1, dtype=np.float64)
        best = int(pot.argmin())
        chosen.append(int(cand[best]))
        closest = np.minimum(closest, dist[best])
    return np.ascontiguousarray(pts[chosen], dtype=np.float32)


KMeansInit = Literal["auto", "greedy-kmeans++", "kmeans++", "random"]
KMeansMethod = Literal["auto", "flat", "two_level"]
# greedy seeding costs ~k^2 (2 + ln k) 10 d flops: beyond this k, "auto" uses faiss's k-means++
GREEDY_INIT_MAX_K = 2048
# from this k on, method "auto" fits in two levels. Measured (bench_cluster.py --scale, 1M x 512): at
# k=100 flat used 0.44x the CPU of two-level; at k=1000 4.6x, with two-level's mean cosine 0.08% higher
TWO_LEVEL_MIN_K = 1000
# Lloyd stops when an iteration raises the objective by less than tol (relative), at most niter
DEFAULT_TOL = 1e-5
LLOYD_CHUNK = 5  # iterations per faiss call between convergence checks
# restarts while they are cheap: each costs about RESTART_ITERS iterations of n*k*d multiply-adds
RESTART_ITERS = 10
RESTART_BUDGET = 2e11
MAX_AUTO_RESTARTS = 3
# split-and-merge trials (kmeans_swap.py) while cheap: each costs about SWAP_ITERS iterations; up
# to max(8, k/8) of them (the local optima to escape grow with k)
SWAP_BUDGET = 1e12
MIN_AUTO_SWAPS, AUTO_SWAPS_PER_K = 8, 1 / 8
SWAP_ACCEPT = 1e-4  # a trial is kept when the mean cosine rises by more than this (relative)
SWAP_ITERS = 10  # Lloyd iterations a trial runs before it is judged
SWAP_PATIENCE = 3  # single trials a round tries before giving up
COARSE_POINTS_PER_CENTROID = 1024  # the two-level fit's coarse cells only route points
REFINE_ITERS, REFINE_NPROBE = 3, 3  # two-level: global Lloyd rounds, each point searching its 3 nearest cells
QUALITY_ROWS = 50_000  # rows the two-level fit scores its (exact, flat) mean cosine on


def default_restarts(n: int, k: int, d: int) -> int:
    """Restarts "auto" runs: up to 3 while their short runs fit a budget of ~2e11 multiply-adds
    (a few seconds); at large n*k a single run (restarts then matter little for mean cosine)."""
    return int(min(MAX_AUTO_RESTARTS, max(1, RESTART_BUDGET // (n * k * d * RESTART_ITERS))))


def default_swaps(n: int, k: int, d: int) -> int:
    """Split-and-merge trials "auto" allows: max(8, k/8) while their Lloyd iterations fit ~1e12
    multiply-adds (5x the restarts' budget); none at k = 1 or when not even one fits."""
    if k < 2:
        return 0
    wanted = max(MIN_AUTO_SWAPS, int(k * AUTO_SWAPS_PER_K))
    return int(min(wanted, SWAP_BUDGET // (n * k * d * SWAP_ITERS)))


def run_lloyd(x: np.ndarray, k: int, start: np.ndarray | None, *, seed: int, niter: int, tol: float,
           max_points_per_centroid: int, faiss_init: int, gpu: bool) -> tuple[np.ndarray, int, bool]:
    """Spherical Lloyd iterations with faiss until converged (relative gain < tol) or niter.
    Returns (centroids, iterations run, converged)."""
    d = x.shape[1]
    centroids, done, last = start, 0, None
    while done < niter:
        step = min(LLOYD_CHUNK, niter - done)
        km = faiss.Kmeans(d, k, niter=step, seed=seed, spherical=True, verbose=False, nredo=1,
                          max_points_per_centroid=max_points_per_centroid,
                          min_points_per_centroid=1,  # we size the sample ourselves; the warning is noise
                          init_method=faiss_init, gpu=gpu)
        km.train(x, init_centroids=centroids)
        centroids, done = np.array(km.centroids, np.float32), done + step
        # obj[i]: sum of cosines to the centroids before update i (faiss, inner-product index)
        obj = np.r_[[] if last is None else [last], np.asarray(km.obj, np.float64)]
        last = float(obj[-1])
        gains = np.diff(obj)
        if len(gains) and np.any(np.abs(gains) <= tol * np.abs(obj[1:])):
            return centroids, done, True
    return centroids, done, False


def _swap(x: np.ndarray, centroids: np.ndarray, lloyd_kw: dict[str, Any], *, trials: int, seed: int, cap: int,
          iters: int):
    """Split-and-merge trials on the rows Lloyd trains on (a seeded subsample of ``cap`` when faiss
    would subsample too), each trial ``iters`` Lloyd iterations."""
    rows = x
    if len(x) > cap:
        rows = x[np.sort(np.random.default_rng([seed, 0x5A]).choice(len(x), size=cap, replace=False))]

    def run(start: np.ndarray) -> tuple[np.ndarray, int]:
        out, done, _ = run_lloyd(rows, len(start), start, seed=seed, niter=iters, **lloyd_kw)
        return unit_rows(out)[0], done

    return swap_search(rows, centroids, run, lambda c: flat_ip(c, lloyd_kw["gpu"]).search(rows, 2), trials=trials,
                       accept=SWAP_ACCEPT, patience=SWAP_PATIENCE, seed=seed)


def split_counts(sizes: np.ndarray, k: int) -> np.ndarray:
    """k split over cells in proportion to their sizes (largest remainders): every non-empty cell
    gets at least 1 and at most its size; the counts sum to k."""
    sizes = np.asarray(sizes, np.int64)
    if not 1 <= k <= sizes.sum():
        raise ValueError(f"cannot split k={k} over cells holding {int(sizes.sum())} points")
    share = k * sizes / sizes.sum()
    counts = np.minimum(np.maximum(np.floor(share), sizes > 0), sizes).astype(np.int64)
    while (gap := k - int(counts.sum())) != 0:
        if gap > 0:  # largest remaining share first, among cells with room
            room = np.flatnonzero(counts < sizes)
            pick = room[np.argsort(-(share[room] - counts[room]), kind="stable")[:gap]]
            counts[pick] += 1
        else:  # the >= 1 floors overshot: take from the most over-served cells that keep one
            spare = np.flatnonzero(counts > 1)
            pick = spare[np.argsort(share[spare] - counts[spare], kind="stable")[:-gap]]
            counts[pick] -= 1
    return counts


def fit_kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 100,
    tol: float = DEFAULT_TOL,
    max_points_per_centroid: int | None = None,
    nredo: int | None = None,
    init: KMeansInit = "auto",
    init_size: int | None = None,
    gpu: bool | None = None,
    embedding: EmbeddingSpec | None = None,
    init_centroids: np.ndarray | None = None,
    method: KMeansMethod = "auto",
    coarse_k: int | None = None,
    swaps: int | None = None,
) -> KMeansModel:
    """Spherical k-means of unit rows with faiss.

    Lloyd runs to convergence (an iteration gains less than ``tol`` of the objective) or ``niter``.
    ``nredo`` restarts (None: ``default_restarts``, i.e. several while cheap) each run
    ``RESTART_ITERS`` iterations from their own seeding; from the best mean cosine, up to ``swaps``
    split-and-merge trials (kmeans_swap.py; None: ``default_swaps``, 0: off) move centroids out of
    the local optima restarts leave, then Lloyd continues to convergence. ``method``: "flat" (one
    k-means over all points), "two_level" (``coarse_k`` ~ sqrt(k) cells, each split into clusters
    in proportion to its size; trials only when ``swaps`` is given), or "auto" (two-level from
    ``TWO_LEVEL_MIN_K``). ``max_points_per_centroid`` (None: every row) caps the rows Lloyd trains
    on at k times it (faiss's own default, 256, silently dropped rows and cost up to 0.012 mean
    cosine on held-out corpora); the number of points used is recorded. ``gpu=None`` uses a GPU
    when faiss-gpu sees one. Inertia (sum of 2 - 2 cos) and mean cosine are measured on all of
    ``x`` (two-level: on a seeded subsample of ``QUALITY_ROWS``, against all k centroids).
    """
    x, ok = unit_rows(x)
    x = x[ok] if not ok.all() else x
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} clusters need at least k usable points, got {n}")
    max_points_per_centroid = max_points_per_centroid or -(-n // k)  # None: every row
    if method == "auto":
        method = "two_level" if k >= TWO_LEVEL_MIN_K and init_centroids is None else "flat"
    gpu_used = use_gpu(gpu)
    if method == "two_level":
        if init_centroids is not None:
            raise ValueError("init_centroids applies to a flat fit only")
        return _fit_two_level(x, k, seed=seed, niter=niter, tol=tol, max_points_per_centroid=max_points_per_centroid,
                              nredo=nredo, init=init, init_size=init_size, gpu=gpu_used, embedding=embedding,
                              coarse_k=coarse_k, swaps=swaps)
    if init == "auto":
        init = "greedy-kmeans++" if k <= GREEDY_INIT_MAX_K else "kmeans++"
    faiss_init = {"kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
                  "random": faiss.ClusteringInitMethod_RANDOM,
                  "greedy-kmeans++": faiss.ClusteringInitMethod_RANDOM}[init]
    ours = init_centroids is None and init == "greedy-kmeans++"
    restarts = 1 if init_centroids is not None else int(nredo or default_restarts(n, k, d))
    short = min(RESTART_ITERS, niter) if restarts > 1 else niter
    lloyd_kw = {"tol": tol, "max_points_per_centroid": max_points_per_centroid, "faiss_init": faiss_init,
                "gpu": gpu_used}
    lloyd = functools.partial(run_lloyd, x, k, **lloyd_kw)
    best: tuple[float, int, np.ndarray, np.ndarray, int, bool] | None = None
    scores = []
    for redo in range(restarts):
        start = greedy_kmeanspp(x, k, seed=faiss_seed(seed, 7, redo), init_size=init_size) if ours else init_centroids
        centroids, iters, converged = lloyd(start, seed=faiss_seed(seed, redo), niter=short)
        centroids, _ = unit_rows(centroids)
        _, sim = search(x, flat_ip(centroids, gpu_used))
        score = float(sim.astype(np.float64).sum())
        scores.append(score / n)
        if best is None or score > best[0]:
            best = (score, redo, centroids, sim, iters, converged)
    _, redo, centroids, sim, iters, converged = best
    trials = default_swaps(min(n, k * max_points_per_centroid), k, d) if swaps is None else int(swaps)
    swapped = None
    if trials > 0:
        centroids, swapped = _swap(x, centroids, lloyd_kw, trials=trials, seed=faiss_seed(seed, redo),
                                   cap=k * max_points_per_centroid, iters=min(SWAP_ITERS, niter))
        if swapped.accepted:  # moved centroids: Lloyd has to converge again (trial iterations are not counted)
            converged = False
            _, sim = search(x, flat_ip(centroids, gpu_used))
    if not converged and iters < niter:  # the best restart continues to convergence
        centroids, more, converged = lloyd(centroids, seed=faiss_seed(seed, redo), niter=niter - iters)
        centroids, iters = unit_rows(centroids)[0], iters + more
        _, sim = search(x, flat_ip(centroids, gpu_used))
    meta = {
        "algorithm": "faiss.Kmeans spherical", "method": "flat", "faiss_version": faiss.__version__, "k": k, "dim": d,
        "seed": seed, "niter": niter, "tol": tol, "iterations": iters, "converged": converged,
        "nredo": restarts, "restart_iterations": short, "restart_mean_cosine": scores, "best_restart": redo,
        "swaps": trials, "swap": asdict(swapped) if swapped else None,
        "init": init if init_centroids is None else "given",
        "init_size": default_init_size(n, k, init_size) if ours else None,
        "max_points_per_centroid": max_points_per_centroid,
        "n_sample": n, "n_trained": min(n, k * max_points_per_centroid), "gpu": gpu_used,
        "inertia": float(np.sum(2.0 - 2.0 * sim.astype(np.float64))),
        "mean_cosine": float(sim.mean()),
        "embedding": embedding.to_dict() if embedding else None,
    }
    return KMeansModel(centroids, meta)


def _fit_two_level(x: np.ndarray, k: int, *, seed: int, niter: int, tol: float, max_points_per_centroid: int,
                   nredo: int | None, init: KMeansInit, init_size: int | None, gpu: bool,
                   embedding: EmbeddingSpec | None, coarse_k: int | None, swaps: int | None,
                   refine_iters: int = REFINE_ITERS) -> KMeansModel:
    """Coarse k-means into k1 ~ sqrt(k) cells, then each cell's points into a share of k in
    proportion to its size (as ssl-data-curation and NeMo Curator do at large k): ~sqrt(k) times
    less work per iteration than a flat fit. Points near a cell's border were fitted with their
    cell only, so ``REFINE_ITERS`` global Lloyd rounds follow in which each point's centroid is
    searched in its ``REFINE_NPROBE`` nearest cells (an IVF search). The result is k ordinary
    centroids: assignment stays a flat nearest-centroid search over all of them."""
    n, d = x.shape
    k1 = int(min(max(coarse_k or round(np.sqrt(k)), 1), k))
    # split-and-merge only when asked: "auto" keeps large-k fits at their measured cost
    swaps = swaps or 0
    coarse = fit_kmeans(x, k1, seed=faiss_seed(seed, 0xC0), niter=niter, tol=tol, nredo=nredo, init=init,
                        max_points_per_centroid=min(max_points_per_centroid, COARSE_POINTS_PER_CENTROID),
                        gpu=gpu, method="flat", swaps=swaps)
    cell, _ = assign(x, coarse.centroids, gpu=gpu)
    sizes = np.bincount(cell, minlength=k1)
    counts = split_counts(sizes, k)
    order = np.argsort(cell, kind="stable")
    bounds = np.r_[0, np.cumsum(sizes)]
    blocks, within, iters, unconverged = [], 0.0, [], 0
    for c in range(k1):
        if counts[c] == 0:
            continue
        pts = x[order[bounds[c] : bounds[c + 1]]]
        if counts[c] == 1:
            cent = unit_rows(pts.sum(axis=0, keepdims=True))[0]  # spherical mean
            within += float((pts @ cent[0]).astype(np.float64).sum())
        else:
            # cells fit once each (nredo=None would restart every small cell): restarts pay at the coarse level
            model = fit_kmeans(pts, int(counts[c]), seed=faiss_seed(seed, 0xCE, c), niter=niter, tol=tol, nredo=nredo or 1,
                               init=init, init_size=init_size, max_points_per_centroid=max_points_per_centroid,
                               gpu=gpu, method="flat", swaps=swaps)
            cent = model.centroids
            within += model.meta["mean_cosine"] * len(pts)
            iters.append(model.meta["iterations"])
            unconverged += not model.meta["converged"]
        blocks.append(cent)
    centroids = np.ascontiguousarray(np.concatenate(blocks), np.float32)
    centroids, refine_gain = _refine(x, centroids, coarse.centroids, iters=refine_iters, nprobe=REFINE_NPROBE, gpu=gpu)
    rng = np.random.default_rng([seed, 0x5C0])
    rows = np.sort(rng.choice(n, size=QUALITY_ROWS, replace=False)) if n > QUALITY_ROWS else np.arange(n)
    _, sim = assign(x[rows], centroids, gpu=gpu)
    sim = 1.0 - sim.astype(np.float64)
    meta = {
        "algorithm": "faiss.Kmeans spherical", "method": "two_level", "faiss_version": faiss.__version__, "k": k,
        "dim": d, "seed": seed, "niter": niter, "tol": tol, "coarse_k": k1, "cell_sizes": sizes.tolist(),
        "cell_k": counts.tolist(), "coarse_mean_cosine": coarse.meta["mean_cosine"], "coarse_nredo": coarse.meta["nredo"],
        "cell_iterations_max": max(iters, default=0), "cells_unconverged": unconverged,
        "init": init, "max_points_per_centroid": max_points_per_centroid, "n_sample": n, "gpu": gpu,
        "swaps": swaps,
        "mean_cosine_within_cell": within / n,  # each point scored against its own cell's centroids only
        "refine_iters": refine_iters, "refine_nprobe": REFINE_NPROBE, "refine_mean_cosine": refine_gain,
        "quality_rows": len(rows), "mean_cosine": float(sim.mean()),
        "inertia": float(np.sum(2.0 - 2.0 * sim) * n / len(rows)),  # scaled from the scored rows
        "embedding": embedding.to_dict() if embedding else None,
    }
    return KMeansModel(centroids, meta)


def _refine(x: np.ndarray, centroids: np.ndarray, coarse: np.ndarray, *, iters: int, nprobe: int, gpu: bool,
            batch_rows: int = 65536) -> tuple[np.ndarray, list[float]]:
    """Lloyd rounds over all of ``x`` with each point's centroid searched among the centroids of
    its ``nprobe`` nearest coarse cells; returns the centroids and each round's mean cosine."""
    import scipy.sparse as sparse

    n, d = x.shape
    k = len(centroids)
    scores = []
    for _ in range(iters):
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(coarse)
        ivf = faiss.IndexIVFFlat(quantizer, d, len(coarse), faiss.METRIC_INNER_PRODUCT)
        ivf.is_trained = True  # the coarse centroids are the cells
        ivf.add(centroids)
        ivf.nprobe = nprobe
        index = to_gpu(ivf) if gpu else ivf
        sums = np.zeros((k, d), np.float64)
        total = 0.0
        for lo in range(0, n, batch_rows):
            xb = x[lo : lo + batch_rows]
            sim, ids = index.search(xb, 1)
            ids = ids[:, 0]
            found = ids >= 0
            total += float(sim[found, 0].astype(np.float64).sum())
            members = sparse.csr_matrix((np.ones(int(found.sum()), np.float32), (ids[found], np.flatnonzero(found))),
                                        shape=(k, len(xb)))
            sums += members @ xb
        norms = np.linalg.norm(sums, axis=1)
        moved = norms > 0  # a centroid that won no point stays where it was
        centroids = centroids.copy()
        centroids[moved] = (sums[moved] / norms[moved, None]).astype(np.float32)
        scores.append(total / n)
    return np.ascontiguousarray(centroids, np.float32), scores
