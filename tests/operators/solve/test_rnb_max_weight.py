"""R&B row weights respect balance.max_weight: clipped, the rest scaled so the total holds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from operators.solve.test_rnb import _recipe, _stats, synthetic
from scipy.optimize import brentq

from mmbalance.operators.solve import solve
from mmbalance.operators.solve.rnb import cap_domain_weights

CORPUS = {"a": 6000, "b": 3000, "c": 500, None: 400}


def test_weights_never_exceed_max_weight_and_keep_the_total():
    sample, *_ = synthetic(seed=2, rows=(200, 200, 200))
    free = solve(_stats(_recipe(), sample, CORPUS))
    raw = free.diagnostics["domain_weight"]
    assert max(raw.values()) > 1.5  # the uncapped run exceeds the cap below
    sol = solve(_stats(_recipe(max_weight=1.5), sample, CORPUS))
    tags = pa.table({"tag.dom": pa.array(["a", "b", "c", None], pa.string())})
    w = sol.weights(tags)
    assert w.max() <= 1.5 + 1e-12 and w[3] == 1.0
    n = np.array([CORPUS[k] for k in "abc"], dtype=np.float64)
    assert float(n @ w[:3]) == pytest.approx(n.sum(), rel=1e-9)  # expected manifest size unchanged
    # independent: the one scale c with sum_d n_d min(Q, c w_d) = n, found by root bracketing
    w0 = np.array([raw[k] for k in "abc"])
    c = brentq(lambda c: float(n @ np.minimum(1.5, c * w0)) - n.sum(), 1e-9, 1e9, xtol=1e-14)
    np.testing.assert_allclose(w[:3], np.minimum(1.5, c * w0), rtol=1e-5)  # diagnostics round to 6 digits
    assert sol.diagnostics["clipped_domains"] and sum(sol.diagnostics["p_applied"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_capping_is_water_filling(seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 1000, 12).astype(np.float64)
    weight = rng.gamma(0.5, 2.0, 12)
    weight *= rows.sum() / (rows @ weight)  # mean weight 1
    capped = cap_domain_weights(weight, rows, 1.2)
    assert capped.max() <= 1.2 + 1e-12
    assert rows @ capped == pytest.approx(rows.sum(), rel=1e-12)
    assert np.all(np.diff(capped[np.argsort(weight)]) >= -1e-12)  # order kept
    c = brentq(lambda c: float(rows @ np.minimum(1.2, c * weight)) - rows.sum(), 1e-9, 1e9, xtol=1e-15)
    np.testing.assert_allclose(capped, np.minimum(1.2, c * weight), rtol=1e-9)
