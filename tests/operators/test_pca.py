"""The principal components behind M4's embedding moments, against scikit-learn's PCA."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from mmbalance.operators.pca import CHUNK_ROWS, PcaBasis, fit_pca


def _embeddings(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.2, d)  # distinct variances: a well-defined order of components
    return (rng.normal(size=(n, d)) * scales + rng.normal(size=d)).astype(np.float16)


@pytest.mark.parametrize("d, k", [(16, 64), (48, 8)])
def test_components_match_sklearn_on_unit_rows(d, k):
    x = _embeddings(3000, d, d)
    valid = np.ones(len(x), bool)
    valid[::97] = False  # rows the fit must leave out
    basis = fit_pca(x, valid, k, "image")
    unit = x[valid].astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    ref = PCA(n_components=min(k, d)).fit(unit)
    assert basis.k == min(k, d)  # all d components when d is smaller than asked
    np.testing.assert_allclose(np.abs(basis.components @ ref.components_.T), np.eye(basis.k), atol=2e-4)
    np.testing.assert_allclose(basis.mean, ref.mean_, atol=1e-6)
    np.testing.assert_allclose(basis.sd, np.sqrt(ref.explained_variance_), rtol=1e-4)
    # signs are fixed by the largest loading, so a refit on the same rows gives the same bytes
    assert fit_pca(x, valid, k, "image").stacked().tobytes() == basis.stacked().tobytes()
    assert np.all(basis.components[np.arange(basis.k), np.argmax(np.abs(basis.components), axis=1)] > 0)


def test_projection_round_trips_and_matches_numpy():
    x = _embeddings(CHUNK_ROWS * 2 + 123, 16, 3)
    basis = fit_pca(x, np.ones(len(x), bool), 8, "text")
    z = basis.project(x)
    again = PcaBasis.from_dict(basis.to_dict())
    np.testing.assert_array_equal(again.project(x), z)
    np.testing.assert_array_equal(basis.project(x[CHUNK_ROWS:]), z[CHUNK_ROWS:])  # the same chunks: the same bytes
    np.testing.assert_allclose(basis.project(x[1000:]), z[1000:], atol=1e-6)  # other chunks: rounding only
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(z, (unit - basis.mean) @ basis.components.T.astype(np.float64), atol=1e-5)
    # an unusable row projects to 0 (the mean): it adds nothing to any moment
    x[5] = 0
    valid = np.ones(len(x), bool)
    valid[7] = False
    z = basis.project(x, valid)
    assert not z[5].any() and not z[7].any()


def test_too_few_rows_is_an_error():
    with pytest.raises(ValueError, match="usable image embeddings"):
        fit_pca(np.zeros((5, 4), np.float32), np.ones(5, bool), 4, "image")
