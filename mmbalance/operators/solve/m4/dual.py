"""The M4 dual over signatures (docs/algorithms.md section 1): its value, gradient and curvature.

For duals x = (mu+ [K], mu- [K], nu [held masses], gamma [budget]) each signature's shift is
t = N T x, N = [B, -E, H, 1] sparse (E = [A | L] the scale columns) and T sparse, and its weight the
closed-form minimiser of ``objective.Objective`` at that shift: the dual has 2K + R + 1 variables
whatever the number of rows. With embedding moments the weights are per row (``row_dual.RowDual``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from mmbalance.operators.solve.m4.newton import projected_residual
from mmbalance.operators.solve.m4.problem import MomentProblem


@dataclass
class DualResult:
    x: np.ndarray  # (mu+ [K], mu- [K], gamma [1 if budget])
    q: np.ndarray  # (S,) primal weights
    dual_value: float  # per row
    primal_value: float  # per row
    kkt_residual: float
    moments: np.ndarray  # (K,) sum_s w_s q_s b_s,col(j)
    carrying: np.ndarray  # (G,) sum_s w_s q_s a_sg
    violation: np.ndarray  # (K,) max(0, |moment| - eps * scale mass) / carrying
    budget_residual: float
    infeasible_certificate: bool  # dual value exceeded every feasible primal value
    info: dict[str, Any] = field(default_factory=dict)
    scale_mass: np.ndarray | None = None  # (P,) sum_s w_s q_s E_sp: the carrying weights, then per-label masses
    sum_q2: float | None = None  # sum_i w_i q_i^2 over rows (the per-row path), for the ESS

    @property
    def max_violation(self) -> float:
        v = float(self.violation.max()) if self.violation.size else 0.0
        return max(v, abs(self.budget_residual))


class SignatureDual:
    """Evaluations of the dual: t = N T x with N = [B, -E, H, 1] (sparse; E = [A | L] the scale
    columns) and T sparse. x = (mu+ [K], mu- [K], nu [holds, free], gamma [1 if budget, free])."""

    def __init__(self, p: MomentProblem):
        self.p = p
        K, G, P, S, R, Kb = p.K, p.G, p.P, p.B.shape[0], p.holds, p.Kb
        self.hold = slice(2 * K, 2 * K + R)
        self.nx = 2 * K + R + (1 if p.budget is not None else 0)
        self.signature_shifts = Kb + P + R + 1  # shift rows over signatures; embedding moments follow
        blocks = [p.B, -p.E] + ([p.H] if R else []) + [sp.csr_matrix(np.ones((S, 1)))]
        self.N = sp.hstack(blocks, format="csr")
        # shift rows every carrying signature touches (-A per group, the budget's 1): kept dense and
        # out of the sparse curvature product, where they would make every row of N count
        self.dense_rows = np.concatenate([Kb + np.arange(G), [Kb + P + R]]).astype(np.int64)
        self.dense_cols = np.column_stack([-p.A.toarray(), np.ones(S)])
        # T maps the duals to shifts per column of N; sparse (a dual has at most two shift rows: its
        # moment's column and its scale column)
        k = np.arange(K)
        col, scale = p.column, Kb + p.scale
        rows = [col, col, scale, scale, Kb + P + np.arange(R)]
        cols = [k, K + k, k, K + k, 2 * K + np.arange(R)]
        vals = [np.ones(K), -np.ones(K), p.eps, p.eps, np.ones(R)]  # e_p = sum_{j: scale j = p} eps_j (mu+_j + mu-_j)
        if p.budget is not None:
            rows.append(np.array([Kb + P + R]))
            cols.append(np.array([2 * K + R]))
            vals.append(np.ones(1))
        T = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(self.signature_shifts + p.Kz, self.nx))
        T.eliminate_zeros()  # eps = 0: the dual has no tolerance row
        self.T = self.Ts = T
        self.NT = self.N.T.tocsr()
        self.objective = p.closed_form
        with np.errstate(divide="ignore"):
            self.log_eta = np.log(p.eta)  # KL: kept across evaluations
        self.evaluations = 0
        self._last: tuple[np.ndarray, tuple] | None = None

    def primal(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """q(t), f(q), -dq/dt and t per signature (the last point's are kept: Newton asks for the
        curvature where it just evaluated, and on the streaming path each pass reads every row)."""
        if self._last is not None and np.array_equal(self._last[0], x):
            return self._last[1]
        out = self._primal(x)
        self._last = (x.copy(), out)
        return out

    def _primal(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        p = self.p
        t = self.N @ (self.T @ x)
        if p.stream is not None:
            q, f, curv = p.stream.aggregate(t, p.objective)
        else:
            q, f, curv = self.objective.minimiser(p.eta, t, self.log_eta)
        return q, f, curv, t

    def sum_q2(self, x: np.ndarray) -> float | None:
        """sum_i w_i q_i^2 over rows where that differs from the signatures' (the per-row path)."""
        return None

    def shift_sums(self, x: np.ndarray, q: np.ndarray) -> np.ndarray:
        """N' (w q): the moment of every shift row (B columns, minus the scale masses, held masses,
        the retention) at weights ``q``."""
        return self.NT @ (self.p.weight * q)

    def value_grad(self, x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        self.evaluations += 1
        p = self.p
        q, f, _, t = self.primal(x)
        wq = p.weight * q
        value, grad = self._targets(x, float(p.weight @ f + wq @ t), self.T.T @ (self.NT @ wq))
        return value, grad, q

    def _targets(self, x: np.ndarray, value: float, grad: np.ndarray) -> tuple[float, np.ndarray]:
        """The held masses' and the budget's terms of the dual's value and gradient."""
        p = self.p
        if p.holds:
            value -= float(x[self.hold] @ p.hold_target)
            grad[self.hold] -= p.hold_target
        if p.budget is not None:
            value -= x[-1] * p.budget
            grad[-1] -= p.budget
        return value, grad

    def curvature(self, x: np.ndarray, rows: np.ndarray | None = None) -> sp.csr_matrix:
        """Z = N' diag(w dq/dt) N: minus the generalised Hessian in shift space (sparse), or its
        ``rows`` x ``rows`` block."""
        _, _, curv, _ = self.primal(x)
        d = self.p.weight * curv
        rows = np.arange(self.NT.shape[0]) if rows is None else np.asarray(rows, np.int64)
        at = np.searchsorted(self.dense_rows, rows)
        dense = (at < len(self.dense_rows)) & (self.dense_rows[np.minimum(at, len(self.dense_rows) - 1)] == rows)
        X = self.NT[rows[~dense]]
        scaled = X.copy()
        scaled.data *= d[X.indices]  # N' D without a broadcast (COO) product
        Dm = self.dense_cols[:, at[dense]]
        cross = sp.csr_matrix(scaled @ Dm)
        # CSR blocks stacked by their fast paths (no COO round trip of the large block)
        Z = sp.vstack([sp.hstack([(scaled @ X.T.tocsr()).tocsr(), cross], format="csr"),
                       sp.hstack([cross.T.tocsr(), sp.csr_matrix(Dm.T @ (d[:, None] * Dm))], format="csr")], format="csr")
        order = np.concatenate([np.flatnonzero(~dense), np.flatnonzero(dense)])  # Z's rows, as positions in ``rows``
        if np.array_equal(order, np.arange(len(order))):  # the dense rows already last (as Newton asks)
            return Z
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return Z[back][:, back].tocsr()

    def hessian(self, x: np.ndarray) -> np.ndarray:
        """Minus the (generalised) Hessian of the dual: T' N' diag(w dq/dt) N T (dense)."""
        Hz = self.curvature(x).toarray()
        return np.asarray(self.T.T @ (self.T.T @ Hz.T).T)


def make_dual(p: MomentProblem) -> "SignatureDual":
    """The dual over signatures, or, with embedding moments, over rows (``row_dual.RowDual``)."""
    if p.embedding is not None:
        from mmbalance.operators.solve.m4.row_dual import RowDual

        return RowDual(p)
    return SignatureDual(p)


def primal_upper_bound(p: MomentProblem) -> float:
    """Largest value the primal objective takes on [0, Q]^S: a dual value above it certifies infeasibility."""
    if p.stream is not None:
        return float(p.weight @ p.stream.worst(p.objective))
    return float(p.weight @ p.closed_form.worst(p.eta))


def dual_bounds(p: MomentProblem, dual: "SignatureDual", enforcement: float | None) -> tuple[np.ndarray, np.ndarray]:
    lo = np.zeros(dual.nx)
    hi = np.full(dual.nx, np.inf if enforcement is None else float(enforcement))
    lo[dual.hold], hi[dual.hold] = -np.inf, np.inf  # equalities: free duals
    if p.budget is not None:
        lo[-1], hi[-1] = -np.inf, np.inf
    return lo, hi


def dual_result(p: MomentProblem, dual: "SignatureDual", x: np.ndarray, lo: np.ndarray, hi: np.ndarray, certificate: bool,
                info: dict[str, Any], q: np.ndarray | None = None) -> DualResult:
    """Primal weights, moments, violations and the certificate at duals ``x`` (the primal ``q`` of
    another solver when given: the gap then compares it with the dual value at ``x``)."""
    bound = primal_upper_bound(p)
    value, grad, q_dual = dual.value_grad(x)
    if not certificate and value > bound * (1 + 1e-9) + 1e-12:
        certificate = True
    kkt = projected_residual(x, grad, lo, hi)
    if q is None:
        q = q_dual
        _, f, _, _ = dual.primal(x)
        primal_value = float(p.weight @ f)
    else:
        primal_value = float(p.weight @ p.closed_form.terms(p.eta, q))
    wq = p.weight * q
    sums = dual.shift_sums(x, q)
    moments = sums[p.column]
    scale_mass = -sums[p.Kb : p.Kb + p.P]
    carrying = scale_mass[: p.G]
    W = carrying[p.group]
    with np.errstate(divide="ignore", invalid="ignore"):
        violation = np.where(W > 0, np.maximum(0.0, np.abs(moments) - p.eps * scale_mass[p.scale]) / W, 0.0)
    budget_residual = float(wq.sum() - p.budget) if p.budget is not None else 0.0
    if p.budget is not None and p.budget > 0:
        budget_residual /= p.budget
    if p.holds:  # a held mass that moved counts as a violation (relative to its target)
        moved = np.abs(p.H.T @ wq - p.hold_target) / np.maximum(p.hold_target, 1e-300)
        budget_residual = max(abs(budget_residual), float(moved.max()))
    info["dual_evaluations"] = dual.evaluations
    if p.embedding is not None:  # every evaluation is a pass over the rows; a missing Hessian block one more
        info["row_passes"] = p.stream.passes
    return DualResult(
        x=x, q=q, dual_value=value, primal_value=primal_value, kkt_residual=kkt, moments=moments,
        carrying=carrying, violation=violation, budget_residual=budget_residual,
        infeasible_certificate=certificate, info=info, scale_mass=scale_mass, sum_q2=dual.sum_q2(x),
    )
