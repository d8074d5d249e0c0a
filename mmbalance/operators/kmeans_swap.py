"""Split-and-merge local search for spherical k-means (issue 21 item 6).

Lloyd iterations only move a centroid within its basin: when k-means++ puts two seeds in one
planted cluster and none in a neighbouring pair, no restart budget sklearn or faiss spends by
default reliably gets out (on Zipf-sized, overlapping clusters it is the usual failure). Each
trial here moves one or more centroids: centroid ``j`` whose removal costs least (its points go to
their second-nearest centroid) is moved into cluster ``s`` whose split into two gains most, Lloyd
runs a few iterations, and the move is kept only if the mean cosine over all rows rose. The
estimates only order the trials; every decision is the measured objective.

Work per trial: ``trial_iters`` Lloyd iterations, one top-2 search and ~11 row passes (the
per-cluster split), all in row blocks so memory stays O(block x d + k x d).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sparse

BLOCK_ROWS = 65_536
SPLIT_POWER_ITERS = 2  # power iterations for each cluster's main axis (the first split)
SPLIT_LLOYD_ITERS = 3  # 2-means iterations inside each cluster


def _unit(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms > 0, norms, 1.0)


def _group_sum(ids: np.ndarray, rows: np.ndarray, groups: int) -> np.ndarray:
    """sum of ``rows`` per group id, float64 (groups, d)."""
    member = sparse.csr_matrix((np.ones(len(ids), np.float32), (ids, np.arange(len(ids)))), shape=(groups, len(ids)))
    return np.asarray(member @ rows, np.float64)


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def split_gains(x: np.ndarray, labels: np.ndarray, k: int, *, seed: int = 0,
                block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For each cluster, the spherical objective gained by splitting it in two, and the two halves.

    The split starts along the cluster's main axis (power iterations on its residuals), then
    ``SPLIT_LLOYD_ITERS`` spherical 2-means iterations. Returns gain (k,) float64 (-inf where a
    cluster cannot be split: fewer than 2 points, or one half empty) and halves (k, 2, d) float32.
    """
    n, d = x.shape
    blocks = [slice(lo, min(lo + block_rows, n)) for lo in range(0, n, block_rows)]
    whole = sum(_group_sum(labels[b], x[b], k) for b in blocks)
    count = np.bincount(labels, minlength=k)
    mean = (whole / np.maximum(count, 1)[:, None]).astype(np.float32)
    axis = np.random.default_rng([seed, 0x5B17]).normal(size=(k, d)).astype(np.float32)
    for _ in range(SPLIT_POWER_ITERS):
        acc = np.zeros((k, d), np.float64)
        for b in blocks:
            r = x[b] - mean[labels[b]]
            acc += _group_sum(labels[b], r * _row_dot(r, axis[labels[b]])[:, None], k)
        axis = _unit(acc).astype(np.float32)
    side = np.concatenate([_row_dot(x[b] - mean[labels[b]], axis[labels[b]]) > 0 for b in blocks])
    halves2 = 2 * labels
    for step in range(SPLIT_LLOYD_ITERS + 1):
        sums = sum(_group_sum(halves2[b] + side[b], x[b], 2 * k) for b in blocks)
        if step == SPLIT_LLOYD_ITERS:
            break
        centre = _unit(sums).astype(np.float32)
        side = np.concatenate([_row_dot(x[b], centre[halves2[b] + 1]) > _row_dot(x[b], centre[halves2[b]])
                               for b in blocks])
    norms = np.linalg.norm(sums, axis=1).reshape(k, 2)
    gain = norms.sum(axis=1) - np.linalg.norm(whole, axis=1)
    gain[(norms == 0).any(axis=1) | (count < 2)] = -np.inf
    return gain, _unit(sums).reshape(k, 2, d).astype(np.float32)


def swap_pairs(removal: np.ndarray, gain: np.ndarray, limit: int) -> list[tuple[int, int, float]]:
    """Disjoint (move j, into s, estimated gain) pairs: cheapest removals matched with the
    largest split gains, in that order, at most ``limit``."""
    by_gain = [int(s) for s in np.argsort(-gain, kind="stable") if np.isfinite(gain[s])]
    used: set[int] = set()
    pairs = []
    for j in np.argsort(removal, kind="stable").tolist():
        if len(pairs) >= limit or not by_gain:
            break
        if j in used:
            continue
        s = next((s for s in by_gain if s not in used and s != j), None)
        if s is None:
            break
        by_gain.remove(s)
        used.update((j, s))
        pairs.append((j, s, float(gain[s] - removal[j])))
    return pairs


@dataclass
class SwapRecord:
    tried: int = 0
    accepted: int = 0
    moved: int = 0  # centroids moved by accepted trials
    lloyd_iterations: int = 0
    mean_cosine_before: float = float("nan")
    mean_cosine_after: float = float("nan")


Search = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # centroids -> top-2 (sim, ids), each (n, 2)
Lloyd = Callable[[np.ndarray], tuple[np.ndarray, int]]  # centroids -> (unit centroids, iterations run)


def swap_search(x: np.ndarray, centroids: np.ndarray, lloyd: Lloyd, search: Search, *, trials: int,
                accept: float, patience: int = 3, seed: int = 0) -> tuple[np.ndarray, SwapRecord]:
    """Improve ``centroids`` by at most ``trials`` split-and-merge trials (see the module doc).

    Each round first tries every pair whose estimate is positive at once (when there are several),
    then the best ``patience`` single pairs in turn; a trial is kept when the mean cosine rises by
    more than ``accept`` (relative). Stops when a round keeps nothing or the trials are spent.
    """
    k = len(centroids)
    record = SwapRecord()
    if k < 2 or trials <= 0:
        return centroids, record
    sim, ids = search(centroids)
    score = float(sim[:, 0].astype(np.float64).sum())
    record.mean_cosine_before = record.mean_cosine_after = score / len(x)
    for round_ in range(trials):
        removal = np.bincount(ids[:, 0], weights=(sim[:, 0] - sim[:, 1]).astype(np.float64), minlength=k)
        gain, halves = split_gains(x, ids[:, 0], k, seed=seed + round_)
        pairs = swap_pairs(removal, gain, max(patience, k // 8))
        promising = [p for p in pairs if p[2] > 0]
        groups = ([promising] if len(promising) > 1 else []) + [[p] for p in pairs[:patience]]
        kept = False
        for group in groups:
            if record.tried >= trials:
                break
            trial = centroids.copy()
            for j, s, _ in group:
                trial[s], trial[j] = halves[s, 0], halves[s, 1]
            trial, iters = lloyd(trial)
            trial_sim, trial_ids = search(trial)
            trial_score = float(trial_sim[:, 0].astype(np.float64).sum())
            record.tried += 1
            record.lloyd_iterations += iters
            if trial_score - score > accept * abs(score):
                centroids, sim, ids, score, kept = trial, trial_sim, trial_ids, trial_score, True
                record.accepted += 1
                record.moved += len(group)
                break
        if not kept or record.tried >= trials:
            break
    record.mean_cosine_after = score / len(x)
    return centroids, record
