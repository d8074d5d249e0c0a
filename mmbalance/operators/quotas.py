"""Max-min fair integer quotas: shared by the water-filling solver and hierarchical k-means
(operators/hierarchy.py), below both so neither imports the other."""

from __future__ import annotations

import numpy as np


def waterfill_quotas(sizes: np.ndarray, target: int) -> np.ndarray:
    """Max-min fair integer quotas: quota_c <= sizes_c, sum == min(target, sum(sizes)).

    The cap x is the largest integer with ``sum_c min(x, n_c) <= target``; every cluster gets
    ``min(x, n_c)`` and the remainder (fewer than the clusters larger than x, by maximality of x)
    goes one each to the clusters larger than x in index order, so the result is deterministic.
    """
    n = np.asarray(sizes)
    if n.ndim != 1:
        raise ValueError(f"sizes must be one-dimensional, got shape {n.shape}")
    if n.size and not np.issubdtype(n.dtype, np.integer):
        if not np.all(np.isfinite(n)) or np.any(n != np.floor(n)):
            raise ValueError("sizes must be non-negative integers")
    n = n.astype(np.int64)
    if np.any(n < 0):
        raise ValueError("sizes must be non-negative integers")
    target = int(target)
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    total = int(n.sum())
    if target >= total:
        return n.copy()
    # f(x) = sum min(x, n_c) is piecewise linear and increasing: for x in [s_(j), s_(j+1)] with
    # ascending sizes s, f(x) = prefix_j + x * (C - j). Find the segment, then solve for x.
    s = np.sort(n)
    c = s.size
    prefix = np.concatenate(([0], np.cumsum(s)))  # prefix[j] = sum of the j smallest
    at_sizes = prefix[:-1] + s * (c - np.arange(c))  # f(s_j) (ties give equal values)
    j = int(np.searchsorted(at_sizes, target, side="right"))  # s_(j) is the first size with f > target
    # x lies in [s_(j-1), s_(j)): f(x) = prefix[j] + x * (c - j)
    x = (target - int(prefix[j])) // (c - j)
    quotas = np.minimum(n, x)
    remainder = target - int(quotas.sum())
    if remainder:
        above = np.flatnonzero(n > x)[:remainder]
        quotas[above] += 1
    return quotas
