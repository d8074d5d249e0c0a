"""The figures of docs/algorithms.md section 9 as plain numpy functions.

Every figure takes ``weights``, a (b, n) array of per-image multiplicities, and returns one value
per row: a row of ones gives the figure itself, a row of bootstrap counts (how often each image was
drawn when resampling the n images with replacement) gives one replicate of it. So the figure and
its interval are computed by the same code. Codes are integer class indices, -1 where an image has
no value (a neutral image's attribute, an unlabelled image's label): such images are left out.
A figure with no image to stand on is NaN.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp


def bootstrap_weights(n: int, samples: int, seed: int, chunk: int | None = None) -> Iterator[np.ndarray]:
    """Bootstrap counts in chunks of replicates: replicate r draws n image indices uniformly with
    replacement, ``rng.integers(0, n, size=n)`` on ``numpy.random.default_rng(seed)``, one call per
    replicate in order, and counts them."""
    rng = np.random.default_rng(seed)
    chunk = chunk or max(1, min(samples, 8_000_000 // max(n, 1)))
    done = 0
    while done < samples:
        rows = [np.bincount(rng.integers(0, n, size=n), minlength=n) for _ in range(min(chunk, samples - done))]
        done += len(rows)
        yield np.stack(rows).astype(np.float64)


def interval(replicates: np.ndarray, confidence: float) -> list[float] | None:
    """Percentile interval of the replicates (NaN replicates left out; None when there are none)."""
    reps = np.asarray(replicates, np.float64)
    reps = reps[~np.isnan(reps)]
    if not len(reps):
        return None
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def _one_hot(codes: np.ndarray, classes: int) -> sp.csr_matrix:
    """(n, classes) indicator of ``codes``; rows with code -1 are empty."""
    codes = np.asarray(codes, np.int64)
    rows = np.flatnonzero(codes >= 0)
    return sp.csr_matrix((np.ones(len(rows)), (rows, codes[rows])), shape=(len(codes), classes))


def _weighted_counts(weights: np.ndarray, codes: np.ndarray, classes: int) -> np.ndarray:
    """(b, classes): the weight of the images of each class."""
    return np.asarray((_one_hot(codes, classes).T @ np.asarray(weights, np.float64).T).T)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def value_shares(codes: np.ndarray, classes: int, weights: np.ndarray) -> np.ndarray:
    """(b, classes): share of each class among the counted images."""
    counts = _weighted_counts(weights, codes, classes)
    return _divide(counts, counts.sum(axis=1, keepdims=True))


def max_abs_gap(shares: np.ndarray, target: np.ndarray) -> np.ndarray:
    """RB: max_v |share_v - target_v| per row."""
    gap = np.abs(shares - np.asarray(target, np.float64)[None, :])
    return np.where(np.isnan(gap).all(axis=1), np.nan, np.nanmax(np.where(np.isnan(gap), -np.inf, gap), axis=1))


def association(predicted: np.ndarray, label: np.ndarray, values: int, labels: int, weights: np.ndarray) -> dict[str, np.ndarray]:
    """AB of one attribute x label over the images with a predicted value and a label:
    ``by_label`` (b, L, V) shares of each predicted value per label value, ``overall`` (b, V) over
    all those images, ``gap`` (b, L) = max_v |by_label - overall|, ``ab`` (b,) = max over label
    values with images, ``images`` (b, L) the weight behind each label value."""
    predicted, label = np.asarray(predicted, np.int64), np.asarray(label, np.int64)
    both = (predicted >= 0) & (label >= 0)
    joint = _weighted_counts(weights, np.where(both, label * values + predicted, -1), labels * values)
    joint = joint.reshape(-1, labels, values)
    per_label = joint.sum(axis=2)
    by_label = _divide(joint, per_label[:, :, None])
    total = joint.sum(axis=(1, 2))
    overall = _divide(joint.sum(axis=1), total[:, None])
    gap = np.abs(by_label - overall[:, None, :]).max(axis=2)  # NaN where the label value has no images
    ab = np.where(np.isnan(gap).all(axis=1), np.nan, np.nanmax(np.where(np.isnan(gap), -np.inf, gap), axis=1))
    return {"by_label": by_label, "overall": overall, "gap": gap, "ab": ab, "images": per_label}


def accuracy(predicted: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Share of the images with a true and a predicted class whose predicted class is the true one."""
    predicted, truth = np.asarray(predicted, np.int64), np.asarray(truth, np.int64)
    w = np.asarray(weights, np.float64)
    counted = (truth >= 0) & (predicted >= 0)
    right = (counted & (predicted == truth)).astype(np.float64)
    return _divide(w @ right, w @ counted.astype(np.float64))


def accuracy_by_class(predicted: np.ndarray, truth: np.ndarray, classes: int, weights: np.ndarray) -> np.ndarray:
    """(b, classes): accuracy among the images of each true class (with a prediction)."""
    predicted, truth = np.asarray(predicted, np.int64), np.asarray(truth, np.int64)
    hits = _weighted_counts(weights, np.where(predicted == truth, truth, -1), classes)
    return _divide(hits, _weighted_counts(weights, np.where(predicted >= 0, truth, -1), classes))


# -- retrieval skew (Geyik et al. 2019) -------------------------------------------------------------


def uid_priority(uids: Sequence[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random order key per uid: the first 8 bytes of blake2b(f"{seed}:{uid}"),
    big-endian (independent of row order, so a pool is the same whatever the file layout)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{u}".encode(), digest_size=8).digest(), "big")
                     for u in uids], dtype=np.uint64)


def balanced_pool(codes: np.ndarray, classes: int, uids: Sequence[str], seed: int) -> np.ndarray:
    """Indices (ascending) of an attribute-balanced pool: for each value, the m images of it with the
    smallest ``uid_priority``, m the count of the rarest value. Empty when a value has no image."""
    codes = np.asarray(codes, np.int64)
    members = [np.flatnonzero(codes == v) for v in range(classes)]
    m = min(len(x) for x in members) if members else 0
    if m == 0:
        return np.zeros(0, np.int64)
    priority = uid_priority([uids[i] for i in np.flatnonzero(codes >= 0)], seed)
    key = np.zeros(len(codes), np.uint64)
    key[codes >= 0] = priority
    chosen = [idx[np.lexsort((idx, key[idx]))[:m]] for idx in members]
    return np.sort(np.concatenate(chosen))


def rankings(scores: np.ndarray) -> np.ndarray:
    """(Q, P) pool positions per query, best first; ties keep pool order."""
    return np.argsort(-np.asarray(scores, np.float64), axis=1, kind="stable")


def ranking_skew(order: np.ndarray, codes: np.ndarray, classes: int, weights: np.ndarray,
                 ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """MaxSkew@k (b, Q, K) and NDKL (b, Q) of each query's ranking of the pool.

    ``order`` (Q, P) from ``rankings``; ``codes`` (P,) the pool images' attribute values; ``weights``
    (b, P) multiplicities (an image drawn c times fills c consecutive places). With p^top-i the value
    distribution of the first i places and p^pool that of the whole ranking:
    skew_v@k = ln(p_v^top-k / p_v^pool), MaxSkew@k = max_v skew_v@k (values absent from the pool
    left out), NaN when the ranking is shorter than k; NDKL = (1/Z) sum_i KL(p^top-i || p^pool) /
    log2(i + 1), Z = sum_i 1 / log2(i + 1), natural logarithms, over every place of the ranking.
    """
    order, codes = np.asarray(order, np.int64), np.asarray(codes, np.int64)
    weights = np.rint(np.asarray(weights, np.float64)).astype(np.int64)
    b, (q, p) = weights.shape[0], order.shape
    skew = np.full((b, q, len(ks)), np.nan)
    ndkl = np.full((b, q), np.nan)
    sorted_codes = codes[order]  # (Q, P)
    for r in range(b):
        counts = weights[r][order]  # (Q, P): every row is a permutation of the same counts
        n = int(counts[0].sum()) if q else 0
        if n == 0:
            continue
        pool = np.bincount(codes, weights=weights[r], minlength=classes) / n
        present = pool > 0
        log_pool = np.log(np.where(present, pool, 1.0))  # absent values never occur: their terms are 0
        place = np.arange(1, n + 1, dtype=np.float64)
        discount = 1.0 / np.log2(place + 1.0)
        # KL(top-i || pool) = (1/i) sum_v c_v ln c_v - ln i - (1/i) sum_v c_v ln p_v, c_v the counts in the top i
        xlogx = np.zeros(n + 1)
        xlogx[1:] = place * np.log(place)
        step = max(1, 4_000_000 // max(n * classes, 1))  # queries per block: bounds the (Q, n, V) counts
        for lo in range(0, q, step):
            hi = min(q, lo + step)
            seq = np.repeat(sorted_codes[lo:hi].ravel(), counts[lo:hi].ravel()).reshape(hi - lo, n)
            top = np.cumsum(seq[:, :, None] == np.arange(classes)[None, None, :], axis=1, dtype=np.int64)
            kl = (xlogx[top].sum(axis=2) - top @ log_pool) / place[None, :] - np.log(place)[None, :]
            ndkl[r, lo:hi] = (kl * discount[None, :]).sum(axis=1) / discount.sum()
            for j, k in enumerate(ks):
                if k <= n:
                    with np.errstate(divide="ignore"):
                        log_top = np.log(top[:, k - 1, :] / k)
                    skew[r, lo:hi, j] = np.where(present[None, :], log_top - log_pool[None, :], -np.inf).max(axis=1)
    return skew, ndkl


# -- image <-> text recall ---------------------------------------------------------------------------


def match_ranks(images: np.ndarray, texts: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(image->text, text->image): rank (0 = first) of pair i's partner for query i by cosine
    similarity, ties broken by gallery order. One pass over blocks of the similarity matrix serves
    both directions: its rows rank the texts for an image, its columns the images for a text."""
    a = np.asarray(images, np.float64)
    b = np.asarray(texts, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    n = len(a)
    own = np.einsum("ij,ij->i", a, b)  # the pairs' own similarities (the matrix's diagonal)
    cols = np.arange(n)
    i2t, t2i = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        sim = a[lo:hi] @ b.T
        rows = np.arange(lo, hi)
        other = rows[:, None] != cols[None, :]  # a pair never outranks itself
        diag = sim[rows - lo, rows][:, None]
        i2t[lo:hi] = ((sim > diag) & other).sum(axis=1) + ((sim == diag) & (cols[None, :] < rows[:, None])).sum(axis=1)
        t2i += ((sim > own[None, :]) & other).sum(axis=0) + ((sim == own[None, :]) & (rows[:, None] < cols[None, :])).sum(axis=0)
    return i2t, t2i


def recall_at_k(ranks: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """Share of queries whose match is among the first k (the weights resample the queries)."""
    w = np.asarray(weights, np.float64)
    return _divide(w @ (np.asarray(ranks) < k).astype(np.float64), w.sum(axis=1))
