"""The M4 dual with embedding moments (docs/algorithms.md section 8): ``SignatureDual`` over rows.

Row i's shift is t_s(i) + z_i . C_c(i): t per signature as over signatures, C = reshape(Mz' s_z)
per class. Every evaluation is one pass over the row blocks (``rows.row_block_sums``); the sparse
Newton of ``newton`` runs unchanged on it, the embedding block of its Hessian and the block between
embedding and signature duals coming back from the same pass (one more pass only when Newton's
free set reaches signature rows the pass did not cover).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from mmbalance.operators.solve.m4.dual import SignatureDual
from mmbalance.operators.solve.m4.embedding import EmbeddingMoments, RowMomentStream
from mmbalance.operators.solve.m4.problem import MomentProblem


class RowDual(SignatureDual):
    """The dual with embedding moments: t per signature as in ``SignatureDual`` plus z_i . C_c(i) per row."""

    def __init__(self, p: MomentProblem):
        super().__init__(p)
        self.emb: EmbeddingMoments = p.embedding
        self.stream: RowMomentStream = p.stream
        self.n = float(p.rows)
        self.MzT = self.emb.Mz.T.tocsr()
        self._extra: dict[str, np.ndarray] = {}
        self._watched = np.zeros(0, np.int64)  # sparse signature shift rows the last pass covered
        self._requested = np.zeros(0, np.int64)  # sparse rows Newton last asked curvature for

    def _shifts(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.T @ x
        t = self.N @ s[: self.signature_shifts]
        C = (self.MzT @ s[self.signature_shifts :]).reshape(len(self.emb.class_codes), self.emb.ktot)
        return t, C

    def _sparse(self, rows: np.ndarray) -> np.ndarray:
        rows = rows[rows < self.signature_shifts]
        return rows[~np.isin(rows, self.dense_rows)]

    def _watch(self, x: np.ndarray) -> np.ndarray:
        """Sparse signature rows whose curvature Newton will likely ask for at ``x``: those of the
        duals away from 0 (and the free held masses), and the last ones it asked for."""
        active = np.flatnonzero(x != 0)
        rows = np.unique(self.T[:, active].indices) if len(active) else np.zeros(0, np.int64)
        return np.union1d(self._sparse(rows), self._requested)

    def _primal(self, x: np.ndarray):
        p = self.p
        t, C = self._shifts(x)
        self._watched = self._watch(x)
        out = self.stream.run_pass("aggregate", t, C, self.NT[self._watched].T.tocsr(), p.objective)
        self._extra = out
        mean = self.stream.per_signature
        return mean(out["q"]), mean(out["f"]), mean(out["curv"]), t

    def embedding_moments(self, x: np.ndarray) -> np.ndarray:
        self.primal(x)
        return (self.emb.Mz @ self._extra["qz"].ravel()) / self.n

    def shift_sums(self, x: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.concatenate([self.NT @ (self.p.weight * q), self.embedding_moments(x)])

    def sum_q2(self, x: np.ndarray) -> float | None:
        self.primal(x)
        return float(self._extra["q2"].sum() / self.n)

    def value_grad(self, x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        self.evaluations += 1
        p = self.p
        q, f, _, t = self.primal(x)
        _, C = self._shifts(x)
        wq = p.weight * q
        value = float(p.weight @ f + wq @ t + (C * self._extra["qz"]).sum() / self.n)
        value, grad = self._targets(x, value, self.T.T @ self.shift_sums(x, q))
        return value, grad, q

    def _cross(self, x: np.ndarray, sparse_rows: np.ndarray) -> np.ndarray:
        """Per embedded attribute value, sum over rows of N_sr omega dq/dt z for ``sparse_rows``
        (values, rows, ktot), from the last pass or one more pass for the rows it did not cover."""
        missing = np.setdiff1d(sparse_rows, self._watched)
        if len(missing):
            t, C = self._shifts(x)
            extra = self.stream.run_pass("cross", t, C, self.NT[missing].T.tocsr(), self.p.objective)["cross"]
            merged = np.union1d(self._watched, missing)
            full = np.zeros((extra.shape[0], len(merged), self.emb.ktot))
            full[:, np.searchsorted(merged, self._watched)] = self._extra["cross"]
            full[:, np.searchsorted(merged, missing)] = extra
            self._extra["cross"], self._watched = full, merged
        return self._extra["cross"][:, np.searchsorted(self._watched, sparse_rows)]

    def curvature(self, x: np.ndarray, rows: np.ndarray | None = None) -> sp.csr_matrix:
        rows = np.arange(self.T.shape[0]) if rows is None else np.asarray(rows, np.int64)
        is_sig = rows < self.signature_shifts
        Z = self._curvature(x, rows[is_sig], rows[~is_sig] - self.signature_shifts)
        order = np.concatenate([np.flatnonzero(is_sig), np.flatnonzero(~is_sig)])  # Z's rows, as positions in ``rows``
        if np.array_equal(order, np.arange(len(order))):
            return Z
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return Z[back][:, back].tocsr()

    def _curvature(self, x: np.ndarray, sig_rows: np.ndarray, z_rows: np.ndarray) -> sp.csr_matrix:
        """Z over the signature shift rows (in their order), then the embedding coordinates."""
        self.primal(x)
        Zss = super().curvature(x, sig_rows) if len(sig_rows) else sp.csr_matrix((0, 0))
        emb, n = self.emb, self.n
        classes, ktot = len(emb.class_codes), emb.ktot
        Mz = emb.Mz[z_rows]
        # embedding x embedding: sum_c Mz_c (sum omega dq/dt z z') Mz_c'
        Zzz = np.zeros((len(z_rows), len(z_rows)))
        for c in range(classes):
            block = Mz[:, c * ktot : (c + 1) * ktot]
            if block.nnz:
                dense = block.toarray()
                Zzz += dense @ self._extra["zz"][c] @ dense.T
        Zzz /= n
        # signature x embedding: dense rows (carrying groups, the budget) from per-class sums, sparse from the pass
        Zsz = np.zeros((len(sig_rows), len(z_rows)))
        if len(sig_rows) and len(z_rows):
            dense_at = np.searchsorted(self.dense_rows, sig_rows)
            is_dense = (dense_at < len(self.dense_rows)) & (self.dense_rows[np.minimum(dense_at, len(self.dense_rows) - 1)] == sig_rows)
            for i in np.flatnonzero(is_dense):
                j = dense_at[i]
                value = -(emb.class_codes[:, j] >= 0).astype(np.float64) if j < self.p.G else np.ones(classes)
                Zsz[i] = Mz @ (value[:, None] * self._extra["dz"]).ravel() / n
            sparse_idx = np.flatnonzero(~is_dense)
            if len(sparse_idx):
                self._requested = np.union1d(self._requested, sig_rows[sparse_idx])
                cross = self._cross(x, sig_rows[sparse_idx])  # (values, rows, ktot)
                Zsz[sparse_idx] = self._sparse_cross(cross, z_rows) / n
        return sp.bmat([[Zss if len(sig_rows) else None, sp.csr_matrix(Zsz) if len(sig_rows) else None],
                        [sp.csr_matrix(Zsz.T) if len(sig_rows) else None, sp.csr_matrix(Zzz)]], format="csr") \
            if len(z_rows) else Zss

    def _sparse_cross(self, cross: np.ndarray, z_rows: np.ndarray) -> np.ndarray:
        """Z[r, (f, v, k)] = sum_u (delta_vu - pi_v) X_{g,u}[r, offset_f + k] for the requested embedding rows."""
        out = np.zeros((cross.shape[1], len(z_rows)))
        at, base = 0, {}
        for g, m in self.stream.embedded_groups:
            base[g] = at
            at += m
        for fam in self.emb.families:
            X = cross[base[fam.group] : base[fam.group] + len(fam.values), :, fam.offset : fam.offset + fam.k]
            total = X.sum(axis=0)
            for v in range(len(fam.values)):
                local = z_rows - (fam.start + v * fam.k)
                pick = np.flatnonzero((local >= 0) & (local < fam.k))
                out[:, pick] = X[v][:, local[pick]] - fam.pi[v] * total[:, local[pick]]
        return out
