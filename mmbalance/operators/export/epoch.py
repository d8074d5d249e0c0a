"""How far one epoch of open_clip's resampled webdataset strays from the mixture, and tar sizes that
bound it.

With ``--dataset-resampled`` open_clip (``ResampledShards2``) draws tar URLs with replacement, each
with probability proportional to its upsampling factor, and reads every sample of a drawn tar
until ``--train-num-samples`` samples are out. With p_s the draw probability of tar s, x_s its
sample count and x_ds = x_s when s belongs to domain d (else 0), one draw brings E[x] samples and
an epoch takes K = N / E[x] draws, so domain d's epoch share is a ratio of sums over K iid draws.
By the delta method its standard deviation is

    sd_d = sqrt( sum_s p_s (x_ds - t_d x_s)^2 / (N E[x]) ),     t_d = sum_s p_s x_ds / E[x],

which for tars of one size s is sqrt(t_d (1 - t_d) s / N). The sample shuffle buffer reads a few
thousand samples past the epoch and emits a random subset of what it read; that only lowers the
deviation of shard draws, so the figure is an upper estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def shard_size_for(shares: Sequence[float], epoch_size: int, max_deviation: float, max_size: int) -> int:
    """The largest tar size (samples, at most ``max_size``) whose per-epoch share deviation stays
    within ``max_deviation`` for every domain: s = eps^2 N / max_d t_d (1 - t_d)."""
    spread = max((t * (1.0 - t) for t in shares), default=0.0)
    if spread <= 0.0:
        return max_size
    return int(max(1, min(max_size, math.floor(max_deviation**2 * epoch_size / spread))))


def tar_size(shares: Sequence[float], epoch_size: int, max_deviation: float, min_size: int, max_size: int) -> tuple[int, str]:
    """``shard_size_for``, but never below ``min_size`` (an epoch too short for the bound gets
    ``min_size`` tars, not a request per few samples), and which limit set it:
    ``max_share_deviation`` or ``min_shard_size``."""
    bound = shard_size_for(shares, epoch_size, max_deviation, max_size)
    return (min_size, "min_shard_size") if bound < min_size else (bound, "max_share_deviation")


def balanced_sizes(samples: int, size: int) -> list[int]:
    """``ceil(samples / size)`` tar sizes differing by at most one (no small tail tar)."""
    if samples <= 0:
        return []
    count = -(-samples // size)
    base, extra = divmod(samples, count)
    return [base + 1] * extra + [base] * (count - extra)


def share_deviation(domain: Sequence[int], sizes: Sequence[int], weights: Sequence[float],
                    epoch_size: int, ndomains: int) -> tuple[list[float], list[float]]:
    """(expected share t_d, per-epoch standard deviation sd_d) of each domain for tars with the given
    domain index, sample count and draw weight, at ``epoch_size`` samples per epoch."""
    w = np.asarray(weights, dtype=np.float64)
    x = np.asarray(sizes, dtype=np.float64)
    dom = np.asarray(domain, dtype=np.int64)
    if w.sum() <= 0 or epoch_size <= 0 or not np.any(w * x > 0):
        return [0.0] * ndomains, [0.0] * ndomains
    p = w / w.sum()
    mean = float(p @ x)
    shares = np.bincount(dom, weights=p * x, minlength=ndomains) / mean
    # sum_s p_s (x_ds - t_d x_s)^2 = A_d (1 - 2 t_d) + t_d^2 B, A_d = sum_{s in d} p_s x_s^2, B = sum_s p_s x_s^2
    a = np.bincount(dom, weights=p * x * x, minlength=ndomains)
    var = np.maximum(a * (1.0 - 2.0 * shares) + shares**2 * float(p @ (x * x)), 0.0)
    return shares.tolist(), np.sqrt(var / (epoch_size * mean)).tolist()
