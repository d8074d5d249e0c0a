"""Tar sizing and the stated per-epoch share deviation (mmbalance.operators.export.epoch)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmbalance.operators.export.epoch import balanced_sizes, shard_size_for, share_deviation, tar_size


def test_equal_tars_give_the_binomial_closed_form():
    """Tars of one size s drawn uniformly: a domain's share is Binomial(N/s, t)/(N/s)."""
    sizes, domain = [5] * 30, [0] * 10 + [1] * 20
    shares, sds = share_deviation(domain, sizes, [1.0] * 30, 600, 2)
    assert shares == pytest.approx([1 / 3, 2 / 3])
    assert sds == pytest.approx([math.sqrt(1 / 3 * 2 / 3 * 5 / 600)] * 2)


def test_sized_tars_meet_the_bound_whenever_tars_larger_than_one_sample_are_chosen():
    rng = np.random.default_rng(0)
    for _ in range(500):
        rows = rng.integers(1, 5000, size=int(rng.integers(1, 12)))
        n, bound = int(rng.integers(100, 200_000)), float(rng.choice([0.005, 0.01, 0.05]))
        s = shard_size_for((rows / rows.sum()).tolist(), n, bound, 10_000)
        domain, sizes = [], []
        for j, r in enumerate(rows):
            b = balanced_sizes(int(r), s)
            assert sum(b) == r and max(b) - min(b) <= 1 and max(b) <= s
            domain += [j] * len(b)
            sizes += b
        _, sds = share_deviation(domain, sizes, [1.0] * len(sizes), n, len(rows))
        if s > 1:
            assert max(sds) <= bound * (1 + 1e-9)
        if s < 10_000:  # the next size up would break the bound for an equal-size layout
            t = rows / rows.sum()
            assert math.sqrt(float((t * (1 - t)).max()) * (s + 1) / n) > bound


def test_one_domain_and_degenerate_inputs():
    assert shard_size_for([1.0], 100, 0.01, 10_000) == 10_000  # one domain: its share never moves
    assert balanced_sizes(0, 7) == [] and balanced_sizes(10, 4) == [4, 3, 3]
    assert share_deviation([0], [3], [0.0], 10, 1) == ([0.0], [0.0])


def test_min_size_floors_the_tar_size_and_max_size_still_caps_it():
    shares = [0.5, 0.5]
    assert shard_size_for(shares, 10_000, 0.01, 10_000) == 4  # 1e-4 * 10,000 / 0.25
    assert tar_size(shares, 10_000, 0.01, 100, 10_000) == (100, "min_shard_size")
    assert tar_size(shares, 10**8, 0.01, 100, 10_000) == (10_000, "max_share_deviation")  # the bound allows more: the cap
    assert tar_size(shares, 10**6, 0.01, 100, 10_000) == (400, "max_share_deviation")  # the floor does not bind
