"""Principal components of unit-norm embeddings, for M4's embedding moments (docs/algorithms.md section 8).

Fitted once on the fit sample (exact: the d x d covariance and its eigendecomposition, so the same
sample gives the same basis), kept under OUT/models/ and inside the solution. ``project`` maps a
batch of raw embedding rows to z = (x / |x| - mean) V' in float32, in fixed chunks so the solve's
row blocks and the weigh stage compute identical z from the same rows; an unusable row (null,
zero, NaN) projects to 0, the mean, and so adds nothing to any moment. numpy only.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

CHUNK_ROWS = 4096  # rows per projection product (fixed: results must not depend on batch sizes)
MIN_RELATIVE_SD = 1e-6  # components with a smaller sd than this times the first carry only rounding noise


@dataclass
class PcaBasis:
    side: str  # image | text
    mean: np.ndarray  # (d,) float32: mean of the unit-norm sample rows
    components: np.ndarray  # (k, d) float32: orthonormal rows, largest variance first
    sd: np.ndarray  # (k,) float64: standard deviation of each component on the sample
    meta: dict[str, Any]

    @property
    def k(self) -> int:
        return self.components.shape[0]

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    def project(self, matrix: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """z (n, k) float32 of raw embedding rows (any float dtype)."""
        n = len(matrix)
        if matrix.ndim != 2 or (n and matrix.shape[1] != self.dim):
            raise ValueError(f"{self.side} embeddings are {matrix.shape[1] if matrix.ndim == 2 else '?'}-d, "
                             f"the principal components were fitted on {self.dim}-d")
        out = np.zeros((n, self.k), np.float32)
        basis = self.components.T
        offset = self.mean @ basis
        for start in range(0, n, CHUNK_ROWS):
            x = np.asarray(matrix[start : start + CHUNK_ROWS], np.float32)
            norms = np.sqrt(np.einsum("ij,ij->i", x, x))
            ok = np.isfinite(norms) & (norms > 0)
            if valid is not None:
                ok &= valid[start : start + CHUNK_ROWS]
            scaled = np.where(ok[:, None], x / np.where(ok, norms, 1.0)[:, None], 0.0).astype(np.float32)
            out[start : start + len(x)] = np.where(ok[:, None], scaled @ basis - offset, 0.0)
        return out

    def stacked(self) -> np.ndarray:
        """(k + 1, d) float32: the mean, then the components (the models/ file)."""
        return np.vstack([self.mean[None, :], self.components]).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "dim": self.dim, "components": self.k, "sd": self.sd.tolist(),
                "basis_float32_b64": base64.b64encode(self.stacked().tobytes()).decode(), "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PcaBasis":
        raw = np.frombuffer(base64.b64decode(data["basis_float32_b64"]), np.float32).reshape(data["components"] + 1, data["dim"])
        return cls.from_stacked(data["side"], raw, np.asarray(data["sd"], np.float64), data.get("meta", {}))

    @classmethod
    def from_stacked(cls, side: str, stacked: np.ndarray, sd: np.ndarray, meta: dict[str, Any]) -> "PcaBasis":
        stacked = np.asarray(stacked, np.float32)
        return cls(side, stacked[0].copy(), stacked[1:].copy(), np.asarray(sd, np.float64), dict(meta))


def fit_pca(matrix: np.ndarray, valid: np.ndarray, components: int, side: str) -> PcaBasis:
    """The top ``components`` principal components (all d when d is smaller) of the unit-norm rows
    of ``matrix``; components with negligible variance are dropped. Each component's sign is fixed
    (its largest loading positive), so the basis is a function of the sample only."""
    x = np.asarray(matrix, np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x)) if len(x) else np.zeros(0)
    ok = np.asarray(valid, bool) & np.isfinite(norms) & (norms > 0)
    if ok.sum() < 2:
        raise ValueError(f"embedding moments: {int(ok.sum())} usable {side} embeddings in the fit sample, need at least 2")
    x = x[ok] / norms[ok, None]
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / (len(x) - 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][: min(components, x.shape[1])]
    values, vectors = np.maximum(values[order], 0.0), vectors[:, order].T
    keep = values > (MIN_RELATIVE_SD**2) * max(values[0], 1e-300)
    values, vectors = values[keep], vectors[keep]
    signs = np.sign(vectors[np.arange(len(vectors)), np.argmax(np.abs(vectors), axis=1)])
    vectors = vectors * np.where(signs == 0, 1.0, signs)[:, None]
    components_f32 = vectors.astype(np.float32)
    mean_f32 = mean.astype(np.float32)
    # sd of the float32 projection the solver uses (not the float64 eigenvalue): the bound's unit
    basis = PcaBasis(side, mean_f32, components_f32, np.ones(len(values)), {})
    z = basis.project(matrix[ok], None).astype(np.float64)
    sd = z.std(axis=0, ddof=1)
    total = float(np.trace(cov))
    basis.sd = sd
    basis.meta = {"sample_rows": int(ok.sum()), "requested_components": int(components), "dim": int(x.shape[1]),
                  "explained_variance_ratio": float(values.sum() / total) if total > 0 else 0.0,
                  "dropped_low_variance": int((~keep).sum())}
    return basis
