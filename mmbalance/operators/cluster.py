"""Clustering operators (docs/algorithms.md sections 2, 3, 5): fit on a bounded sample, assign every row.

- ``EmbeddingSpec`` / ``embedding_matrix``: (n, d) matrices from Arrow embedding columns (image,
  text or their normalised mean) without per-row Python.
- ``BottomKSampler`` / ``merge_samples``: a seeded uniform sample (or one capped per stratum) that
  is the same whatever the shard split, so per-shard samples merge exactly in bounded memory.
- ``fit_kmeans``: spherical k-means with faiss on every sampled row, run to convergence with
  restarts and split-and-merge trials (``kmeans_swap``) while cheap; at large k
  (``TWO_LEVEL_MIN_K``) in two levels (coarse cells, each split by size, IVF-refined);
  ``KMeansModel`` saves centroids (npy) + metadata (json).
- ``assign`` / ``cluster_index`` / ``ClusterAssigner``: exact nearest centroid by cosine (a flat
  search over all centroids, on a GPU when faiss sees one), one batch at a time.
- ``silhouette_cosine`` / ``sweep_k``: R&B Regroup's choice of k on a subsample.
- ``sbcl_subclass_counts`` / ``fit_subclasses``: SBCL subclasses inside each class.

Everything here works on unit-norm float32 vectors, where cosine similarity is the inner product.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.faiss_build import import_faiss

# embedding columns as matrices and the sample priority hash live below the stages; re-exported here
from mmbalance.operators.arrays import embedding_matrix, fixed_size_list, one_array  # noqa: F401
from mmbalance.operators.hashing import sample_priority
from mmbalance.operators.kmeans_swap import swap_search

faiss = import_faiss()  # one faiss build (CPU or GPU), else one line naming the fix

EmbeddingSource = Literal["image", "text", "mean"]
CLUSTER_ID_COLUMN = "cluster_id"
CLUSTER_DISTANCE_COLUMN = "cluster_distance"


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class EmbeddingSpec:
    """Which embedding is clustered: one column, or the normalised mean of image and text."""

    source: EmbeddingSource = "image"
    image_column: str | None = None
    text_column: str | None = None

    def __post_init__(self) -> None:
        needed = {"image": ["image_column"], "text": ["text_column"], "mean": ["image_column", "text_column"]}
        if self.source not in needed:
            raise ValueError(f"embedding source must be image, text or mean, got {self.source!r}")
        missing = [name for name in needed[self.source] if not getattr(self, name)]
        if missing:
            raise ValueError(f"embedding source '{self.source}' needs {' and '.join(missing)}")

    @property
    def columns(self) -> list[str]:
        cols = {"image": [self.image_column], "text": [self.text_column]}
        return cols.get(self.source, [self.image_column, self.text_column])  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def extract(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) unit-norm float32 matrix and a mask of usable rows (null, NaN/inf or zero rows are
        not usable and hold zeros)."""
        if self.source == "mean":
            a, va = unit_rows(*embedding_matrix(table.column(self.image_column)))
            b, vb = unit_rows(*embedding_matrix(table.column(self.text_column)))
            if a.shape[1] != b.shape[1]:
                raise ValueError(f"image ({a.shape[1]}) and text ({b.shape[1]}) embeddings differ in dimension")
            a += b
            return unit_rows(a, va & vb)
        return unit_rows(*embedding_matrix(table.column(self.columns[0])))


def unit_rows(matrix: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Float32 copy of ``matrix`` with unit-norm rows; rows with NaN/inf or zero norm become unusable
    (zeros in the output, False in the mask)."""
    x = np.array(matrix, dtype=np.float32, order="C", copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    ok = np.isfinite(norms) & (norms > 0)
    if valid is not None:
        ok &= valid
    x[~ok] = 0.0
    x /= np.where(ok, norms, 1.0)[:, None].astype(np.float32)
    return x, ok


def _as_unit(data: np.ndarray | pa.Table, embedding: EmbeddingSpec | None) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, pa.Table):
        if embedding is None:
            raise ValueError("an Arrow table needs an EmbeddingSpec to say which column to use")
        return embedding.extract(data)
    return unit_rows(data)


# --------------------------------------------------------------------------- sampling

SAMPLE_UID, SAMPLE_PRIORITY, SAMPLE_STRATUM, SAMPLE_EMBEDDING = "uid", "priority", "stratum", "embedding"


def _select(table: pa.Table, k: int | None, per_stratum: int | dict[str, int] | None) -> pa.Table:
    """Rows with the smallest (priority, uid), k overall or per stratum, in that canonical order.

    The result depends only on the set of rows, never on their order or on how they were split,
    so selecting from a union of selections equals selecting from the union (exact merge). The
    canonical order matters too: faiss's own subsampling and initialisation depend on row order.
    Only the key columns are sorted; the embedding column is copied once, by the final take.
    """
    keys = [(SAMPLE_PRIORITY, "ascending"), (SAMPLE_UID, "ascending")]
    prio = table.column(SAMPLE_PRIORITY).to_numpy()
    cand = np.arange(table.num_rows)
    if per_stratum is None:
        if k is not None and table.num_rows > k:
            # cheap pre-filter on priority alone; ties at the boundary are kept for the exact sort
            cand = np.flatnonzero(prio <= np.partition(prio, k - 1)[k - 1])
        order = pc.sort_indices(table.select([SAMPLE_PRIORITY, SAMPLE_UID]).take(pa.array(cand)), sort_keys=keys)
        return table.take(pa.array(cand[order.to_numpy()[: k if k is not None else len(cand)]]))
    key_table = table.select([SAMPLE_STRATUM, SAMPLE_PRIORITY, SAMPLE_UID])
    # nulls sort last: the null stratum is one group like any other
    order = pc.sort_indices(key_table, sort_keys=[(SAMPLE_STRATUM, "ascending"), *keys]).to_numpy()
    if len(order) == 0:
        return table
    codes = pc.dictionary_encode(one_array(key_table.column(SAMPLE_STRATUM)).take(pa.array(order)),
                                 null_encoding="encode")
    idx = codes.indices.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    rank = np.arange(len(idx)) - np.repeat(starts, np.diff(np.r_[starts, len(idx)]))
    if isinstance(per_stratum, dict):
        caps = np.array([per_stratum.get(name, 0) for name in codes.dictionary.to_pylist()], np.int64)
        cap = caps[idx]
    else:
        cap = np.int64(per_stratum)
    kept = order[rank < cap]
    # final canonical order by priority (strata interleaved), so a capped sample is also uniform-looking
    final = pc.sort_indices(key_table.select([SAMPLE_PRIORITY, SAMPLE_UID]).take(pa.array(kept)), sort_keys=keys)
    return table.take(pa.array(kept[final.to_numpy()]))


_MIN_COMPACT_ROWS = 65536


class BottomKSampler:
    """Streaming bottom-k sample of a corpus: keep the rows with the smallest seeded uid priority.

    With ``k``: a uniform sample without replacement of size min(k, rows). With ``per_stratum``
    (an int, or a dict of caps per stratum value; absent values get 0): up to that many rows per
    value of ``stratum_column`` (nulls form their own stratum, keyed None), uniform within each.
    Memory is bounded by about twice the sample plus one batch (candidates are buffered and the
    sample recomputed when the buffer doubles, at least ``buffer_rows``). Uids must be unique (the dedup stage runs
    first): a repeated uid has one priority and may be kept more than once.
    """

    def __init__(
        self,
        embedding: EmbeddingSpec,
        *,
        k: int | None = None,
        seed: int = 0,
        uid_column: str = "uid",
        stratum_column: str | None = None,
        per_stratum: int | dict[str, int] | None = None,
        buffer_rows: int = _MIN_COMPACT_ROWS,
    ):
        if (k is None) == (per_stratum is None):
            raise ValueError("give exactly one of k (uniform sample) or per_stratum (capped per stratum)")
        if per_stratum is not None and stratum_column is None:
            raise ValueError("per_stratum needs stratum_column")
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.embedding, self.k, self.seed = embedding, k, seed
        self.uid_column, self.stratum_column, self.per_stratum = uid_column, stratum_column, per_stratum
        self._parts: list[pa.Table] = []  # the last compacted sample + candidates since
        self._pending = 0
        self._buffer_rows = buffer_rows
        self._compact_at = buffer_rows
        self._limits: tuple[pa.Array, np.ndarray] | None = None  # full strata and their max priority
        self.rows_seen = 0
        self.rows_unusable = 0

    def _candidates(self, prio: np.ndarray, stratum: pa.Array | None) -> np.ndarray:
        """Rows that can still enter the sample: priority <= the largest kept in their full
        stratum (or in the sample). Ties pass; the exact sort settles them."""
        if self._limits is None:
            return np.arange(len(prio))
        names, limit = self._limits
        if stratum is None:
            return np.flatnonzero(prio <= limit[0])
        idx = pc.fill_null(pc.index_in(stratum, value_set=names, skip_nulls=False), -1).to_numpy(zero_copy_only=False)
        return np.flatnonzero(prio <= np.append(limit, np.iinfo(np.uint64).max)[idx])

    def update(self, batch: pa.Table) -> None:
        self.rows_seen += batch.num_rows
        uid = pc.cast(one_array(batch.column(self.uid_column)), pa.string())
        prio = sample_priority(uid, self.seed)
        stratum = None
        if self.stratum_column is not None:
            stratum = pc.cast(one_array(batch.column(self.stratum_column)), pa.string())
        cand = self._candidates(prio, stratum)
        if len(cand) == 0:
            return
        take = pa.array(cand)
        x, ok = self.embedding.extract(batch.select(self.embedding.columns).take(take))  # decode candidates only
        self.rows_unusable += int((~ok).sum())
        keep = pa.array(ok)
        cols = {SAMPLE_UID: uid.take(take).filter(keep), SAMPLE_PRIORITY: pa.array(prio[cand][ok], pa.uint64())}
        if stratum is not None:
            cols[SAMPLE_STRATUM] = stratum.take(take).filter(keep)
        cols[SAMPLE_EMBEDDING] = fixed_size_list(x[ok])
        self._parts.append(pa.table(cols))
        self._pending += int(ok.sum())
        # compact only when the buffer doubles: copying the sample every batch would cost O(k) per batch
        if self._pending >= self._compact_at:
            self._compact()

    def _compact(self) -> None:
        if not self._parts:
            return
        sample = _select(pa.concat_tables(self._parts), self.k, self.per_stratum)
        self._parts, self._pending = [sample], sample.num_rows
        self._compact_at = max(2 * sample.num_rows, self._buffer_rows)
        prio = sample.column(SAMPLE_PRIORITY)
        if self.k is not None:
            if sample.num_rows >= self.k:
                self._limits = (pa.array([], pa.string()), np.array([pc.max(prio).as_py()], np.uint64))
            return
        groups = sample.group_by(SAMPLE_STRATUM).aggregate([(SAMPLE_PRIORITY, "max"), (SAMPLE_PRIORITY, "count")])
        names = groups.column(SAMPLE_STRATUM).combine_chunks()
        if isinstance(self.per_stratum, dict):
            caps = np.array([self.per_stratum.get(v, 0) for v in names.to_pylist()], np.int64)
        else:
            caps = np.full(len(names), self.per_stratum, np.int64)
        full = groups.column(f"{SAMPLE_PRIORITY}_count").to_numpy() >= caps
        self._limits = (names.filter(pa.array(full)),
                        groups.column(f"{SAMPLE_PRIORITY}_max").to_numpy()[full].astype(np.uint64))

    def result(self) -> pa.Table:
        """The sample as an Arrow table: uid, priority, [stratum], embedding (unit float32)."""
        self._compact()
        if not self._parts:
            fields = [pa.field(SAMPLE_UID, pa.string()), pa.field(SAMPLE_PRIORITY, pa.uint64())]
            if self.stratum_column is not None:
                fields.append(pa.field(SAMPLE_STRATUM, pa.string()))
            fields.append(pa.field(SAMPLE_EMBEDDING, pa.list_(pa.float32(), 1)))  # dimension unknown: no rows
            return pa.schema(fields).empty_table()
        return self._parts[0]


def merge_samples(
    samples: Iterable[pa.Table], *, k: int | None = None, per_stratum: int | dict[str, int] | None = None
) -> pa.Table:
    """Merge per-shard samples taken with the same seed and size: exactly the sample of the union."""
    merged = None
    for s in samples:
        if s.num_rows == 0:
            continue
        merged = s if merged is None else _select(pa.concat_tables([merged, s]), k, per_stratum)
    if merged is None:
        raise ValueError("no non-empty sample to merge")
    return _select(merged, k, per_stratum)


def sample_matrix(sample: pa.Table) -> np.ndarray:
    """The (m, d) float32 embedding matrix of a sample table."""
    x, _ = embedding_matrix(sample.column(SAMPLE_EMBEDDING))
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- k-means


def gpu_available() -> bool:
    """faiss-gpu is installed and sees a GPU (faiss-cpu builds lack the GPU symbols)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class KMeansModel:
    centroids: np.ndarray  # (k, d) float32, unit rows
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def save(self, directory: str | Path, name: str = "centroids") -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{name}.npy", self.centroids)
        (d / f"{name}.json").write_text(json.dumps({**self.meta, "k": self.k, "dim": self.dim}, indent=2, sort_keys=True))
        return d / f"{name}.npy"

    @classmethod
    def load(cls, directory: str | Path, name: str = "centroids") -> KMeansModel:
        d = Path(directory)
        centroids = np.load(d / f"{name}.npy")
        meta = json.loads((d / f"{name}.json").read_text())
        if (meta.get("k"), meta.get("dim")) != centroids.shape:
            raise ValueError(f"{d / name}.json says k={meta.get('k')}, dim={meta.get('dim')}; npy has {centroids.shape}")
        return cls(np.ascontiguousarray(centroids, dtype=np.float32), meta)


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


def use_gpu(gpu: bool | None) -> bool:
    """None: a GPU when faiss-gpu sees one; True: a GPU or an error saying why not; False: CPU."""
    available = gpu_available()
    if gpu is None:
        return available
    if gpu and not available:
        raise ValueError("a GPU was asked for, but faiss sees none (faiss-cpu build, or no visible device)")
    return bool(gpu)


def _lloyd(x: np.ndarray, k: int, start: np.ndarray | None, *, seed: int, niter: int, tol: float,
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
        out, done, _ = _lloyd(rows, len(start), start, seed=seed, niter=iters, **lloyd_kw)
        return unit_rows(out)[0], done

    return swap_search(rows, centroids, run, lambda c: _flat_ip(c, lloyd_kw["gpu"]).search(rows, 2), trials=trials,
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
    lloyd = functools.partial(_lloyd, x, k, **lloyd_kw)
    best: tuple[float, int, np.ndarray, np.ndarray, int, bool] | None = None
    scores = []
    for redo in range(restarts):
        start = greedy_kmeanspp(x, k, seed=faiss_seed(seed, 7, redo), init_size=init_size) if ours else init_centroids
        centroids, iters, converged = lloyd(start, seed=faiss_seed(seed, redo), niter=short)
        centroids, _ = unit_rows(centroids)
        _, sim = _search(x, _flat_ip(centroids, gpu_used))
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
            _, sim = _search(x, _flat_ip(centroids, gpu_used))
    if not converged and iters < niter:  # the best restart continues to convergence
        centroids, more, converged = lloyd(centroids, seed=faiss_seed(seed, redo), niter=niter - iters)
        centroids, iters = unit_rows(centroids)[0], iters + more
        _, sim = _search(x, _flat_ip(centroids, gpu_used))
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
        index = _to_gpu(ivf) if gpu else ivf
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


def _flat_ip(centroids: np.ndarray, gpu: bool = False) -> faiss.Index:
    """Exact inner-product index over the centroids, on the GPU(s) when ``gpu``."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return _to_gpu(index) if gpu else index


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    # one set of GPU resources (streams, scratch memory) per process, made on first use
    return faiss.StandardGpuResources()


def _to_gpu(index: faiss.Index) -> faiss.Index:
    # device 0 of what this process sees (Ray gives each GPU worker its own CUDA_VISIBLE_DEVICES)
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)


def cluster_index(centroids: np.ndarray | KMeansModel, gpu: bool | None = None) -> faiss.Index:
    """The nearest-centroid index ``assign`` searches: flat (exact) over unit centroids, on a GPU
    when ``use_gpu(gpu)``. Build once per process and pass as ``assign(index=...)``."""
    c = centroids.centroids if isinstance(centroids, KMeansModel) else centroids
    return _flat_ip(unit_rows(c)[0], use_gpu(gpu))


def _search(x: np.ndarray, index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    sim, ids = index.search(x, 1)
    return ids[:, 0].astype(np.int32), sim[:, 0]


def assign(
    data: np.ndarray | pa.Table,
    centroids: np.ndarray | KMeansModel,
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
        x, ok = _as_unit(part, embedding)
        if not ok.any():
            continue
        if x.shape[1] != index.d:
            raise ValueError(f"embeddings have dimension {x.shape[1]}, centroids {index.d}")
        i, s = _search(x[ok] if not ok.all() else x, index)
        rows = np.arange(start, start + len(ok))[ok]
        ids[rows] = i
        dist[rows] = np.clip(1.0 - s, 0.0, 2.0)
    return ids, dist


class ClusterAssigner:
    """Ray Data operator (``map_batches(..., batch_format="pyarrow")``): adds ``cluster_id`` (int32,
    -1 for unusable rows) and ``cluster_distance`` (1 - cos, float32), plus ``cluster_id_l2``...
    when ``parents`` gives the upper levels of a hierarchy. Centroids load once per actor.

    ``keep_columns``: None appends to the batch; a list returns only those columns plus the new
    ones (a sidecar, e.g. ``["row", "uid"]``). ``gpu``: False (default, CPU actors), True, or None
    for a GPU when one is visible.
    """

    def __init__(
        self,
        centroids: KMeansModel | str | Path,
        embedding: EmbeddingSpec,
        *,
        parents: Sequence[np.ndarray] = (),
        keep_columns: list[str] | None = None,
        id_column: str = CLUSTER_ID_COLUMN,
        distance_column: str = CLUSTER_DISTANCE_COLUMN,
        num_threads: int | None = None,
        gpu: bool | None = False,
    ):
        if num_threads is not None:
            faiss.omp_set_num_threads(num_threads)  # one actor per core: avoid oversubscription
        model = centroids if isinstance(centroids, KMeansModel) else KMeansModel.load(*_split_model_path(centroids))
        self.index = cluster_index(model, gpu)  # None: a GPU when this actor sees one
        self.embedding, self.parents, self.keep_columns = embedding, [np.asarray(p) for p in parents], keep_columns
        self.id_column, self.distance_column = id_column, distance_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids, dist = assign(batch, None, embedding=self.embedding, batch_rows=max(batch.num_rows, 1), index=self.index)
        out = batch if self.keep_columns is None else batch.select(self.keep_columns)
        out = out.append_column(pa.field(self.id_column, pa.int32()), pa.array(ids, pa.int32()))
        out = out.append_column(pa.field(self.distance_column, pa.float32()), pa.array(dist, pa.float32()))
        level = ids
        for depth, parent in enumerate(self.parents, start=2):
            level = np.where(level >= 0, parent[np.maximum(level, 0)], -1).astype(np.int32)
            out = out.append_column(pa.field(f"{self.id_column}_l{depth}", pa.int32()), pa.array(level, pa.int32()))
        return out


def _split_model_path(path: str | Path) -> tuple[Path, str]:
    p = Path(path)
    return (p.parent, p.stem) if p.suffix in (".npy", ".json") else (p, "centroids")


# --------------------------------------------------------------------------- k selection (R&B Regroup)


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


# --------------------------------------------------------------------------- SBCL subclasses


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


def sbcl_sample_caps(class_sizes: np.ndarray, m0: int, points_per_subclass: int) -> np.ndarray:
    """Per-class sample caps for a stratified fit: min(n_c, K_c * points_per_subclass)."""
    n = np.asarray(class_sizes, dtype=np.int64)
    return np.minimum(n, sbcl_subclass_counts(n, m0) * int(points_per_subclass))


@dataclass
class SubclassModel:
    """SBCL subclasses: class i owns global ids offsets[i] .. offsets[i] + counts[i] - 1."""

    classes: list[Any]  # class values (str or int), in the order of ``counts``
    counts: np.ndarray  # K_c per class
    centroids: np.ndarray  # (sum K_c, d), unit rows, grouped by class
    meta: dict[str, Any] = field(default_factory=dict)

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

    def save(self, directory: str | Path, name: str = "subclasses") -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{name}.npy", self.centroids)
        payload = {**self.meta, "classes": self.classes, "counts": self.counts.tolist()}
        (d / f"{name}.json").write_text(json.dumps(payload, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path, name: str = "subclasses") -> SubclassModel:
        d = Path(directory)
        meta = json.loads((d / f"{name}.json").read_text())
        classes, counts = meta.pop("classes"), np.asarray(meta.pop("counts"), np.int64)
        centroids = np.ascontiguousarray(np.load(d / f"{name}.npy"), dtype=np.float32)
        if centroids.shape[0] != counts.sum():
            raise ValueError(f"{d / name}.npy has {centroids.shape[0]} centroids, counts sum to {counts.sum()}")
        return cls(classes, counts, centroids, meta)


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
