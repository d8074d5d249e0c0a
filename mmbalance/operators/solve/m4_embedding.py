"""M4 embedding moments on the driver (docs/algorithms.md section 8): the per-row dual.

For an [attribute, embedding.<side>] pair with principal components z_k (fitted on the sample,
``operators/pca.py``) the coordinates are |E_w[(s_v - pi_v) z_k]| <= eps sd(z_k) E_w[carrying], one
per attribute value v and component k. Rows are not compressible into signatures, so every dual
evaluation is one pass over the row blocks (``m4_rows``): row i's shift is t_s(i) + z_i . C_c(i),
with t the signature part of N T x and C = reshape(Mz' s_z) per class (the tuple of attribute
values), Mz mapping the per-class sums of omega q z to the embedding moments. The sparse Newton of
``m4_newton`` runs unchanged on ``RowDual``: the embedding block of its Hessian and the block
between embedding and signature duals come back from the same pass (one more pass only when
Newton's free set reaches signature rows the pass did not cover).

The largest feasible retention is the same LP over rows (exact) while the rows fit
ROW_LP_NONZEROS; above that, bisection on the retention to BISECTION_RTOL: a probe counts as
feasible only when its dual solve is certified (every moment within 1e-9), so the answer errs low
(probes within ~1e-3 of the limit are slow to settle and may count as infeasible).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from mmbalance.operators.pca import PcaBasis
from mmbalance.operators.solve.m4 import (
    FEASIBILITY_TOL, MomentProblem, _Dual, retention_lp, solve_moments)
from mmbalance.operators.solve.m4_problem import Coordinates, _codes
from mmbalance.operators.solve.m4_rows import RowSpec, unpack
from mmbalance.operators.solve.m4_stream import LocalBlocks
from mmbalance.schemas.balance import M4Balance, embedding_pairs
from mmbalance.schemas.contract import tag_column

ROW_LP_NONZEROS = 30_000_000  # the exact row LP (and Clarabel fallback) up to this many nonzeros
BISECTION_RTOL = 1e-4  # relative width of the retention interval bisection stops at
PROBE_NEWTON_ITERATIONS = 40  # a probe that has not settled by then counts as infeasible


@dataclass
class Family:
    attribute: str
    group: int  # attribute group (index into the problem's A columns)
    side: str
    values: list[str]
    pi: np.ndarray  # (m,)
    k: int  # components
    offset: int  # first column of this side in z
    start: int  # first embedding coordinate: (v, k) is start + v * k + k_index
    sd: np.ndarray  # (k,)


@dataclass
class EmbeddingMoments:
    families: list[Family]
    class_codes: np.ndarray  # (classes, G) attribute codes of each class, -1 = null
    Mz: sp.csr_matrix  # (Kz, classes * ktot): embedding moments = Mz @ vec(per-class sums of omega q z)
    ktot: int
    size: int  # Kz
    attributes: list[list[Any]]  # [name, values] of the attributes that make a class, in order


class RowMomentStream:
    """The row blocks and what a pass needs; stands in for ``SampleStream`` as ``MomentProblem.stream``."""

    def __init__(self, blocks, counts: np.ndarray, spec: RowSpec, totals: dict[str, float], class_codes: np.ndarray,
                 retention: float, max_weight: float):
        self.blocks, self.counts, self.spec = blocks, counts, spec
        self.S = len(counts)
        self.rows = int(totals["rows"])
        self.mean_u = totals["sum_omega_u"] / totals["sum_omega"] if totals["sum_omega"] else 0.0
        self.class_codes = class_codes
        self.retention, self.max_weight = retention, max_weight
        self.embedded_groups: list[tuple[int, int]] = []
        self.class_needed = np.zeros(len(class_codes), bool)
        self.zsum_before: np.ndarray | None = None
        self.passes = 0

    def with_retention(self, retention: float) -> "RowMomentStream":
        clone = object.__new__(RowMomentStream)
        clone.__dict__.update(self.__dict__)
        clone.retention = retention
        return clone

    def params(self, objective: str) -> dict[str, Any]:
        return {"S": self.S, "max_weight": self.max_weight, "objective": objective, "mean_u": self.mean_u,
                "retention": self.retention, "classes": len(self.class_codes), "ktot": self.spec.ktot,
                "class_codes": self.class_codes.ravel().tolist(), "embedded_groups": [list(g) for g in self.embedded_groups],
                "class_needed": self.class_needed.tolist()}

    def _mean(self, total: np.ndarray) -> np.ndarray:
        return np.divide(total, self.counts, out=np.zeros(self.S), where=self.counts > 0)

    def mean_eta(self) -> np.ndarray:
        out = self.blocks.reduce("eta", None, self.params("l2"))
        self.zsum_before = out[self.S :].reshape(len(self.class_codes), self.spec.ktot)
        return self._mean(out[: self.S])

    def worst(self, objective: str) -> np.ndarray:
        return self._mean(self.blocks.reduce("worst", None, self.params(objective)))

    def run_pass(self, kind: str, t: np.ndarray, C: np.ndarray, watched: sp.csr_matrix, objective: str) -> dict[str, np.ndarray]:
        self.passes += 1
        payload = {"t": np.asarray(t, np.float64), "C": np.asarray(C, np.float64), "w_data": watched.data,
                   "w_indices": watched.indices, "w_indptr": watched.indptr, "w_count": np.array(watched.shape[1])}
        params = self.params(objective)
        out = self.blocks.reduce(kind, payload, params)
        if kind == "cross":
            return {"cross": out.reshape(-1, watched.shape[1], self.spec.ktot)}
        return unpack(out, params, watched.shape[1])

    def close(self) -> None:
        self.blocks.close()


def row_stream(step: M4Balance, stats, keys, counts: np.ndarray, retention: float, used_attrs: list[str],
               stream: RowMomentStream | None) -> RowMomentStream:
    """The row blocks of an M4 step with embedding moments (built once; a new retention reuses them)."""
    if stream is not None:
        return stream.with_retention(retention)
    if stats.rows is None:
        raise ValueError("balance.associate: embedding moments are solved over every row, which this input "
                         "does not stream (use the pipeline, or give CorpusStats the rows)")
    bases = []
    for side in dict.fromkeys(side for _, side in embedding_pairs(step)):
        basis = (stats.embedding_bases or {}).get(side)
        if basis is None:
            raise ValueError(f"balance.associate names embedding.{side} but no principal components of the {side} "
                             "embeddings were fitted (the fit stage fits them on the sample)")
        k = min(basis.k, step.embedding_components)
        bases.append(PcaBasis(basis.side, basis.mean, basis.components[:k], basis.sd[:k], basis.meta))
    attrs = {a.name: a for a in stats.recipe.attributes}
    codes = np.column_stack([_codes(keys[tag_column(a)], list(attrs[a].values)) for a in used_attrs])
    radix = np.array([len(attrs[a].values) + 1 for a in used_attrs], np.int64)
    ids = ((codes + 1) * np.concatenate([[1], np.cumprod(radix[:-1])])).sum(axis=1)
    present, class_of_sig = np.unique(ids, return_inverse=True)
    first = np.zeros(len(present), np.int64)
    first[class_of_sig[::-1]] = np.arange(len(ids))[::-1]  # the first signature of each class
    class_codes = codes[first]
    spec = RowSpec(bases, class_of_sig.astype(np.int32), utility="utility_sum" in stats.signatures.column_names,
                   prior=stats.prior.to_dict() if getattr(stats, "prior", None) is not None else None)
    blocks = stats.rows.blocks() if hasattr(stats.rows, "blocks") else LocalBlocks(stats.rows)
    totals = blocks.build_rows(keys, spec)
    return RowMomentStream(blocks, counts, spec, totals, class_codes, retention, float(step.max_weight))


def add_embedding_coordinates(problem: MomentProblem, coords: Coordinates, stream: RowMomentStream,
                              notes: dict[str, Any], used_attrs: list[str], step: M4Balance) -> None:
    """Append the embedding coordinates (v, k) of each [attribute, embedding.side] pair."""
    offsets, at = {}, 0
    for basis in stream.spec.bases:
        offsets[basis.side] = (at, basis)
        at += basis.k
    classes, ktot = len(stream.class_codes), stream.spec.ktot
    families: list[Family] = []
    start = 0
    for attribute, side in embedding_pairs(step):
        g = used_attrs.index(attribute)
        values = list(notes["pi"][attribute])
        pi = np.array([notes["pi"][attribute][v] for v in values])
        offset, basis = offsets[side]
        families.append(Family(attribute, g, side, values, pi, basis.k, offset, start, basis.sd))
        start += len(values) * basis.k
    rows, cols, vals = [], [], []
    for fam in families:
        u = stream.class_codes[:, fam.group]
        for c in np.flatnonzero(u >= 0):
            coef = (np.arange(len(fam.values)) == u[c]) - fam.pi  # (s_v - pi_v) of the class's rows
            for v in range(len(fam.values)):
                rows.append(fam.start + v * fam.k + np.arange(fam.k))
                cols.append(c * ktot + fam.offset + np.arange(fam.k))
                vals.append(np.full(fam.k, coef[v]))
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    Mz = sp.csr_matrix((cat(vals, np.float64), (cat(rows, np.int64), cat(cols, np.int64))), shape=(start, classes * ktot))
    first = problem.Kb + problem.P + problem.holds + 1
    eps = np.concatenate([np.tile(step.tolerance.association_embedding * fam.sd, len(fam.values)) for fam in families])
    group = np.concatenate([np.full(len(fam.values) * fam.k, fam.group) for fam in families])
    problem.column = np.concatenate([problem.column, first + np.arange(start)])
    problem.scale = np.concatenate([problem.scale, group])
    problem.group = np.concatenate([problem.group, group])
    problem.eps = np.concatenate([problem.eps, eps])
    old = coords.size
    for fam in families:
        coords.add("embedding", fam.attribute, fam.values, f"embedding.{fam.side}", [f"pc{i + 1}" for i in range(fam.k)])
    if coords.kept is not None:
        coords.kept = np.concatenate([coords.kept, np.arange(old, coords.size)])
    attributes = [[a, list(notes["pi"][a])] for a in used_attrs]
    problem.embedding = EmbeddingMoments(families, stream.class_codes, Mz, ktot, start, attributes)
    stream.embedded_groups = list(dict.fromkeys((fam.group, len(fam.values)) for fam in families))
    stream.class_needed = np.zeros(classes, bool)
    for fam in families:
        stream.class_needed |= stream.class_codes[:, fam.group] >= 0
    notes["embedding"] = {"families": [
        {"attribute": fam.attribute, "side": fam.side, "values": fam.values, "pi": fam.pi.tolist(), "components": fam.k,
         "tolerance": step.tolerance.association_embedding, "constraints": len(fam.values) * fam.k, "sd": fam.sd.tolist()}
        for fam in families]}


class RowDual(_Dual):
    """The dual with embedding moments: t per signature as in ``_Dual`` plus z_i . C_c(i) per row."""

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
        mean = self.stream._mean
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
        grad = self.T.T @ self.shift_sums(x, q)
        if p.holds:
            value -= float(x[self.hold] @ p.hold_target)
            grad[self.hold] -= p.hold_target
        if p.budget is not None:
            value -= x[-1] * p.budget
            grad[-1] -= p.budget
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
        self.primal(x)
        rows = np.arange(self.T.shape[0]) if rows is None else np.asarray(rows, np.int64)
        sig_rows, z_rows = rows[rows < self.signature_shifts], rows[rows >= self.signature_shifts] - self.signature_shifts
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


def row_matrices(p: MomentProblem):
    """(M, E, H, w, eta) over rows, as ``m4.signature_matrices`` over signatures: every moment,
    scale and held mass as a weighted row sum. None when the rows would not fit ROW_LP_NONZEROS."""
    stream: RowMomentStream = p.stream
    if stream.rows * (p.Kz + 4) > ROW_LP_NONZEROS:
        return None
    from mmbalance.operators.solve.m4_stream import baselines

    blocks = list(stream.blocks.iter_blocks())
    sig = np.concatenate([b["sig"] for b in blocks]).astype(np.int64)
    z = np.concatenate([b["z"] for b in blocks]).astype(np.float64)
    cls = np.concatenate([b["cls"] for b in blocks]).astype(np.int64)
    omega = np.concatenate([b["omega"] for b in blocks])
    eta = baselines(np.concatenate([b["u"] for b in blocks]), stream.params(p.objective))
    w = omega / p.rows
    W = sp.diags(w)
    emb = p.embedding
    M_emb = np.zeros((emb.size, len(w)))
    for fam in emb.families:
        u = emb.class_codes[cls, fam.group]
        for v in range(len(fam.values)):
            coef = np.where(u >= 0, (u == v) - fam.pi[v], 0.0) * w
            M_emb[fam.start + v * fam.k : fam.start + (v + 1) * fam.k] = (coef[:, None] * z[:, fam.offset : fam.offset + fam.k]).T
    sig_coords = p.signature_coordinates
    M_sig = (W @ p.B[sig]).T.tocsr()[p.column[sig_coords]]
    M = sp.vstack([M_sig, sp.csr_matrix(M_emb)], format="csr")
    M = M[np.argsort(np.concatenate([sig_coords, np.flatnonzero(p.column >= p.Kb)]))]  # coordinate order
    H = (W @ p.H[sig]).T.tocsr() if p.holds else None
    return M, (W @ p.E[sig]).T.tocsr(), H, w, eta


def max_feasible_retention_rows(p: MomentProblem) -> float:
    """The largest-retention LP over rows, or bisection with certified probes where the rows would
    not fit ROW_LP_NONZEROS."""
    matrices = row_matrices(p)
    if matrices is None:
        return _bisection(p)
    M, E, H, w, _ = matrices
    return retention_lp(M, E, H, w, p)


def _bisection(p: MomentProblem) -> float:
    """Largest retention certified feasible, to BISECTION_RTOL: a probe is feasible when its dual
    solve meets FEASIBILITY_TOL within PROBE_NEWTON_ITERATIONS, else (the weak-duality certificate,
    or not settled) infeasible, so the answer errs low, never high. Without a budget: 1 or 0."""
    from dataclasses import replace

    if p.budget is None:
        return 1.0 if solve_moments(p).max_violation <= FEASIBILITY_TOL else 0.0

    def feasible(r: float) -> bool:
        scaled = replace(p, budget=r, stream=p.stream.with_retention(r),
                         hold_target=None if p.hold_target is None else p.hold_target * r / p.budget)
        scaled.eta = scaled.stream.mean_eta()
        return solve_moments(scaled, newton_iterations=PROBE_NEWTON_ITERATIONS).max_violation <= FEASIBILITY_TOL

    lo, hi = 0.0, min(p.budget, p.max_weight)
    if feasible(hi):
        return hi
    while hi - lo > BISECTION_RTOL * max(hi, 1e-12):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def row_solution(p: MomentProblem, result, key_columns: list[str], key_values: dict[str, list], diagnostics: dict[str, Any]):
    """The per-row solution: t per signature and C per class from the duals, the bases, the prior."""
    from mmbalance.operators.solve.row_solution import RowMomentSolution
    from mmbalance.schemas.contract import UTILITY_COLUMN

    stream: RowMomentStream = p.stream
    t, C = RowDual(p)._shifts(result.x)
    emb = p.embedding
    families = [{"attribute": f.attribute, "side": f.side, "values": f.values, "pi": f.pi.tolist(), "sd": f.sd.tolist()}
                for f in emb.families]
    return RowMomentSolution(
        "m4", key_columns, key_values, t.tolist(), stream.retention, stream.mean_u, p.max_weight, p.objective,
        UTILITY_COLUMN if stream.spec.utility else None, emb.attributes, emb.class_codes.tolist(), C.tolist(),
        [b.to_dict() for b in stream.spec.bases], families, stream.spec.prior, diagnostics)


def warm_start(p: MomentProblem, x: np.ndarray, enforcement: float | None) -> np.ndarray:
    """Duals to start the row passes from: the signature coordinates' optimum of the compressed
    problem (each signature at its mean baseline, no embedding moments; no pass over the rows),
    embedding duals at 0. Only a starting point: the row solve certifies the result."""
    from dataclasses import replace

    sig = p.signature_coordinates
    K, Ks = p.K, len(sig)
    compressed = replace(p, stream=None, embedding=None, column=p.column[sig], scale=p.scale[sig], eps=p.eps[sig],
                         group=p.group[sig])
    result = solve_moments(compressed, enforcement)
    if result.infeasible_certificate:
        return x
    out = x.copy()
    out[sig], out[K + sig] = result.x[:Ks], result.x[Ks : 2 * Ks]
    out[2 * K :] = result.x[2 * Ks :]
    return out
