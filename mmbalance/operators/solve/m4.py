"""M4 moment matching (docs/algorithms.md section 1, "our formulation"), solved exactly in the dual.

Compressed path: hard tags and a per-signature baseline, so samples with the same signature share
one weight and the problem is over the rows of the signature table, with multiplicity ``count``:

    minimise    sum_s n_s f(q_s; eta_s)              f = (q - eta)^2 / 2   or   q log(q/eta) - q + eta
    subject to  sum_s n_s q_s c_sj <= 0              c_sj = +-b_sj - eps_j a_s,g(j)   (2K rows)
                sum_s n_s q_s = n * retention        (optional budget)
                0 <= q_s <= Q

For duals x = (mu+, mu-, gamma) the minimiser is per signature and closed form, q_s = clip(eta_s -
t_s, 0, Q) (L2) or min(eta_s exp(-t_s), Q) (KL) with t = C mu + gamma, so the dual has 2K + 1
variables whatever n is. Up to MAX_POLISH_VARIABLES duals: L-BFGS-B, then projected Newton on the
active set (dense Hessian). Above that (k = 10^3..10^5 cluster labels): the sparse projected
semismooth Newton of ``m4_newton``, whose Hessian block covers only the shift rows of the free
duals. A feasible problem the dual path does not certify goes to the primal (Clarabel) and back
to the Newton finish (``primal_solve``); anything the data cannot give is one ValueError.

Guarantee: status optimal means every moment within its tolerance up to FEASIBILITY_TOL (1e-9)
of the carrying weight, the budget and held masses within 1e-9 relative, and the KKT residual and
duality gap in the diagnostics (FALLBACK_FEASIBILITY_TOL, 1e-7, when only the interior-point
solution is left; ``solver.method`` says which path).

Label values must be among the label's values (declared, or seen): any other is an error, never
silently left out of the constraints.

hold_labels: each associated label value's mass among the rows carrying the attribute is held
at its baseline (equalities, free duals), and an attribute without targets is centred per pair at
its prevalence among the rows carrying both the attribute and the label (``pi_by_pair``). With
the KL objective, eps = 0 and no budget, the weights are then exactly Kamiran-Calders reweighing
n_s n_y / (n n_sy) counted over the rows carrying both, and 1 on rows missing either, with null
labels too.

Per-sample utility would give every sample its own baseline and needs the streaming path (a
map-reduce of K-vectors per dual evaluation); here utility enters per signature as utility_sum /
count, which is exact when utility is constant within a signature.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog, minimize
from scipy.special import xlogy

from mmbalance.operators.solve import CorpusStats, LookupSolution, SampleBaselineSolution, register
from mmbalance.operators.solve.m4_newton import projected_residual, newton_solve
from mmbalance.operators.solve.m4_problem import (  # noqa: F401 - the problem's names stay importable from here
    Coordinate, Coordinates, MomentProblem, _codes, build_problem)
from mmbalance.operators.solve.m4_stream import (  # noqa: F401 - the stream's names too
    LocalBlocks, SampleStream, block_sums, signature_ids)
from mmbalance.schemas.balance import M4Balance

FEASIBILITY_TOL = 1e-9  # largest constraint violation, as a share of the carrying weight, we call feasible
KKT_TOL = 1e-13  # natural-residual target of the Newton polish (duals and moments are O(1))
FALLBACK_FEASIBILITY_TOL = 1e-7  # the interior-point path's guarantee when the Newton finish does not reach 1e-9
NEWTON_TOL = 1e-12  # the sparse Newton's target; it stops earlier at the floor of rounding
MAX_POLISH_VARIABLES = 4000  # the polish forms a dense Hessian over the duals
DENSE_PATH_SIGNATURES = 20_000  # above this many signatures (or streaming) the sparse Newton goes first


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


class _Dual:
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
        with np.errstate(divide="ignore"):
            self.log_eta = np.log(p.eta)
        self.log_q_max = math.log(p.max_weight)
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
            return q, f, curv, t
        if p.objective == "l2":
            z = p.eta - t
            q = np.clip(z, 0.0, p.max_weight)
            f = 0.5 * (q - p.eta) ** 2
            curv = ((z > 0.0) & (z < p.max_weight)).astype(np.float64)
        else:
            logq = np.minimum(self.log_eta - t, self.log_q_max)
            q = np.exp(logq)
            with np.errstate(invalid="ignore"):  # eta = 0: q = 0 and f = 0
                f = np.where(q > 0, q * (logq - self.log_eta), 0.0) - q + p.eta
            curv = np.where(self.log_eta - t < self.log_q_max, q, 0.0)
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
        value = float(p.weight @ f + wq @ t)
        grad = self.T.T @ (self.NT @ wq)
        if p.holds:
            value -= float(x[self.hold] @ p.hold_target)
            grad[self.hold] -= p.hold_target
        if p.budget is not None:
            value -= x[-1] * p.budget
            grad[-1] -= p.budget
        return value, grad, q

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
        Z = sp.bmat([[scaled @ X.T, cross], [cross.T, sp.csr_matrix(Dm.T @ (d[:, None] * Dm))]], format="csr")
        order = np.concatenate([np.flatnonzero(~dense), np.flatnonzero(dense)])  # Z's rows, as positions in ``rows``
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return Z[back][:, back].tocsr()

    def hessian(self, x: np.ndarray) -> np.ndarray:
        """Minus the (generalised) Hessian of the dual: T' N' diag(w dq/dt) N T (dense)."""
        Hz = self.curvature(x).toarray()
        return np.asarray(self.T.T @ (self.T.T @ Hz.T).T)


def make_dual(p: MomentProblem) -> "_Dual":
    """The dual over signatures, or, with embedding moments, over rows (``m4_embedding.RowDual``)."""
    if p.embedding is not None:
        from mmbalance.operators.solve.m4_embedding import RowDual

        return RowDual(p)
    return _Dual(p)


def primal_upper_bound(p: MomentProblem) -> float:
    """Largest value the primal objective takes on [0, Q]^S: a dual value above it certifies infeasibility."""
    if p.stream is not None:
        return float(p.weight @ p.stream.worst(p.objective))
    if p.objective == "l2":
        worst = 0.5 * np.maximum(p.eta, p.max_weight - p.eta) ** 2
    else:
        fq = np.where(p.eta > 0, xlogy(p.max_weight, p.max_weight) - xlogy(p.max_weight, p.eta) - p.max_weight + p.eta, 0.0)
        worst = np.maximum(p.eta, fq)
    return float(p.weight @ worst)


def _bounds(p: MomentProblem, dual: "_Dual", enforcement: float | None) -> tuple[np.ndarray, np.ndarray]:
    lo = np.zeros(dual.nx)
    hi = np.full(dual.nx, np.inf if enforcement is None else float(enforcement))
    lo[dual.hold], hi[dual.hold] = -np.inf, np.inf  # equalities: free duals
    if p.budget is not None:
        lo[-1], hi[-1] = -np.inf, np.inf
    return lo, hi


def solve_moments(p: MomentProblem, enforcement: float | None = None, polish: bool = True,
                  newton_iterations: int = 200) -> DualResult:
    """Maximise the dual. Up to MAX_POLISH_VARIABLES duals: L-BFGS-B, then a dense projected-Newton
    polish; above that (or when that does not reach the KKT target): the sparse projected
    semismooth Newton of ``m4_newton``, whose cost grows with the binding constraints, not K."""
    start = time.perf_counter()
    dual = make_dual(p)
    lo, hi = _bounds(p, dual, enforcement)
    bound = primal_upper_bound(p)
    certificate = False

    def fun(x):
        v, g, _ = dual.value_grad(x)
        return -v, -g

    def callback(intermediate_result):
        nonlocal certificate
        if -intermediate_result.fun > bound * (1 + 1e-9) + 1e-12:
            certificate = True  # weak duality: no feasible q has this objective
            raise StopIteration

    x = np.zeros(dual.nx)
    if p.budget is not None:
        x[-1] = float(p.weight @ p.eta) - p.budget if p.objective == "l2" else 0.0
    info: dict[str, Any] = {"lbfgsb_iterations": 0, "polish_iterations": 0}
    if p.embedding is not None and polish:  # start the passes over rows from the signature-level optimum
        from mmbalance.operators.solve.m4_embedding import warm_start

        x = np.clip(warm_start(p, x, enforcement), lo, hi)
    # L-BFGS-B needs tens to hundreds of dual evaluations: fine on small tables, but each is a pass
    # over every signature (or, streaming, every row), where Newton needs a handful
    small = dual.nx <= MAX_POLISH_VARIABLES and p.B.shape[0] <= DENSE_PATH_SIGNATURES and p.stream is None
    if small:
        bounds = list(zip(np.where(np.isfinite(lo), lo, None), np.where(np.isfinite(hi), hi, None)))
        res = minimize(
            fun, x, jac=True, method="L-BFGS-B", bounds=bounds, callback=callback,
            options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 30},
        )
        x = np.clip(res.x, lo, hi)
        info.update({"lbfgsb_iterations": int(res.nit), "lbfgsb_status": str(res.message)})
        if not certificate and polish:
            x, info["polish_iterations"] = _polish(dual, x, lo, hi)
    if not certificate and polish:
        _, grad, _ = dual.value_grad(x)
        if not small or projected_residual(x, grad, lo, hi) > NEWTON_TOL:
            x, newton = newton_solve(dual, x, lo, hi, NEWTON_TOL, bound, max_iter=newton_iterations)
            certificate = certificate or newton.pop("certificate")
            info.update(newton)
    info["method"] = "lbfgsb+dense-newton" if small and "newton_iterations" not in info else "sparse-newton"
    result = dual_result(p, dual, x, lo, hi, certificate, info)
    result.info["seconds"] = round(time.perf_counter() - start, 6)
    return result


def dual_result(p: MomentProblem, dual: "_Dual", x: np.ndarray, lo: np.ndarray, hi: np.ndarray, certificate: bool,
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
        primal_value = float(p.weight @ objective_terms(p, q))
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
    return DualResult(
        x=x, q=q, dual_value=value, primal_value=primal_value, kkt_residual=kkt, moments=moments,
        carrying=carrying, violation=violation, budget_residual=budget_residual,
        infeasible_certificate=certificate, info=info, scale_mass=scale_mass, sum_q2=dual.sum_q2(x),
    )


def objective_terms(p: MomentProblem, q: np.ndarray) -> np.ndarray:
    """f(q_s; eta_s) per signature (compressed path)."""
    if p.objective == "l2":
        return 0.5 * (q - p.eta) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(q > 0, xlogy(q, q) - xlogy(q, p.eta), 0.0) - q + p.eta


def _polish(dual: _Dual, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_iter: int = 50) -> tuple[np.ndarray, int]:
    """Projected Newton on the dual: on each piece the dual is quadratic (L2), so a few steps reach
    the exact maximiser once L-BFGS-B has found the right active set."""
    value, grad, _ = dual.value_grad(x)
    residual = np.max(np.abs(x - np.clip(x + grad, lo, hi)))
    it = 0
    for it in range(1, max_iter + 1):
        if residual <= KKT_TOL:
            return x, it - 1
        fixed = ((x <= lo) & (grad <= 0)) | ((x >= hi) & (grad >= 0))
        free = ~fixed
        H = dual.hessian(x)[np.ix_(free, free)]
        step = np.zeros_like(x)
        # minimum-norm step: the duals are not unique (the moments of one attribute sum to zero)
        step[free] = np.linalg.lstsq(H, grad[free], rcond=1e-12)[0]
        alpha, accepted = 1.0, False
        while alpha > 1e-12:
            x_new = np.clip(x + alpha * step, lo, hi)
            v_new, g_new, _ = dual.value_grad(x_new)
            r_new = np.max(np.abs(x_new - np.clip(x_new + g_new, lo, hi)))
            if v_new >= value - 1e-15 * max(1.0, abs(value)) and (v_new > value or r_new < residual):
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            break
        x, value, grad, residual = x_new, v_new, g_new, r_new
    return x, it


def _moment_rows(M: sp.csr_matrix, p: MomentProblem) -> sp.csr_matrix:
    """The 2K inequalities over (q [n], W [P]): +-M q - eps_j W_scale(j) <= 0 (M already weighted)."""
    K, P = M.shape[0], p.P
    scale_of = sp.csr_matrix((p.eps, (np.arange(K), p.scale)), shape=(K, P))
    return sp.vstack([sp.hstack([M, -scale_of]), sp.hstack([-M, -scale_of])], format="csr")


def signature_matrices(p: MomentProblem):
    """(M, E, H, w, eta) of the compressed problem: the coordinates' moment rows (K, S), the scale
    rows (P, S) and the held-mass rows (R, S), weighted, over signatures."""
    W = sp.diags(p.weight)
    H = (W @ p.H).T.tocsr() if p.holds else None
    return (W @ p.B).T.tocsr()[p.column], (W @ p.E).T.tocsr(), H, p.weight, p.eta


def max_feasible_retention(p: MomentProblem) -> float:
    """Largest feasible scale of the request: one sparse LP (HiGHS) over (q, W, r).

    With a budget: the largest retention r = sum_s w_s q_s over q in [0, Q] meeting the moments,
    held masses scaled with r (H'wq = r * hold_target / budget: exact while no baseline is clipped
    at Q). The feasible retentions form an interval [0, r_max] (q = 0 is feasible and the set is
    convex), so the LP gives what bisection on the retention would, in one solve.
    Without a budget: the largest r <= 1 with H'wq = r * hold_target (1: feasible as asked).
    With embedding moments the LP is over rows (``m4_embedding.max_feasible_retention_rows``).
    """
    if p.embedding is not None:
        from mmbalance.operators.solve.m4_embedding import max_feasible_retention_rows

        return max_feasible_retention_rows(p)
    M, E, H, w, _ = signature_matrices(p)
    return retention_lp(M, E, H, w, p)


def retention_lp(M: sp.csr_matrix, E: sp.csr_matrix, H: sp.csr_matrix | None, w: np.ndarray, p: MomentProblem) -> float:
    """The largest-retention LP over n variables q (signatures or rows): moment rows ``M`` (K, n) and
    scale rows ``E`` (P, n) already weighted, held-mass rows ``H`` (R, n), retention weights ``w``."""
    n, P, R = M.shape[1], E.shape[0], 0 if H is None else H.shape[0]
    A_ub = _moment_rows(M, p)
    A_ub = sp.hstack([A_ub, sp.csr_matrix((A_ub.shape[0], 1))], format="csr")
    eq = [sp.hstack([-E, sp.identity(P), sp.csr_matrix((P, 1))], format="csr")]
    scale = 1.0 if p.budget is None else p.budget
    if p.budget is not None:  # sum w q = r
        eq.append(sp.hstack([sp.csr_matrix(w[None, :]), sp.csr_matrix((1, P)), sp.csr_matrix([[-1.0]])], format="csr"))
    if R:  # H'wq = r * hold_target / scale
        eq.append(sp.hstack([H, sp.csr_matrix((R, P)), sp.csr_matrix(-(p.hold_target / scale)[:, None])], format="csr"))
    A_eq = sp.vstack(eq, format="csr")
    c = np.zeros(n + P + 1)
    c[-1] = -1.0
    upper = p.max_weight if p.budget is not None else 1.0
    bounds = [(0.0, p.max_weight)] * n + [(0.0, None)] * P + [(0.0, upper)]
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(A_ub.shape[0]), A_eq=A_eq, b_eq=np.zeros(A_eq.shape[0]),
                  bounds=bounds, method="highs")
    if res.status != 0:
        raise ValueError(f"m4: the largest-feasible-retention LP did not finish ({res.message}); "
                         f"loosen balance.tolerance or set balance.enforcement for a best-effort solution")
    return float(res.x[-1])


def primal_solve(p: MomentProblem, enforcement: float | None = None) -> DualResult | None:
    """The certified slow path: the primal with Clarabel (interior point; a QP for L2, exponential
    cones for KL) over signatures, or over rows with embedding moments while they fit, then the
    sparse Newton from its duals. None without Clarabel."""
    try:
        import clarabel  # noqa: F401
    except ImportError:
        return None
    if enforcement is not None:
        return None  # bounded duals are a dual-only formulation
    if p.embedding is not None:
        from mmbalance.operators.solve.m4_embedding import row_matrices

        matrices = row_matrices(p)
        if matrices is None:
            return None
    elif p.stream is not None:
        return None  # per-row baselines without embedding moments: a dual-only formulation
    else:
        matrices = signature_matrices(p)
    return _clarabel_solve(p, *matrices)


def _clarabel_solve(p: MomentProblem, M, E, H, w: np.ndarray, eta: np.ndarray) -> DualResult | None:
    import clarabel

    start = time.perf_counter()
    S, K, G, R = M.shape[1], p.K, p.P, p.holds  # S: the primal's q variables; G: the scale variables
    kl = p.objective == "kl"
    n = S + G + (S if kl else 0)  # q, W[, t]
    A_ub, A_carry = _moment_rows(M, p), sp.hstack([-E, sp.identity(G)], format="csr")
    pad = (lambda m: sp.hstack([m, sp.csr_matrix((m.shape[0], S))], format="csc")) if kl else (lambda m: m.tocsc())
    eq_rows, eq_b = [pad(A_carry)], [np.zeros(G)]
    if R:
        eq_rows.append(pad(sp.hstack([H, sp.csr_matrix((R, G))])))
        eq_b.append(p.hold_target)
    if p.budget is not None:
        eq_rows.append(pad(sp.hstack([sp.csr_matrix(w[None, :]), sp.csr_matrix((1, G))])))
        eq_b.append(np.array([p.budget]))
    box = sp.hstack([sp.vstack([-sp.identity(S), sp.identity(S)]), sp.csr_matrix((2 * S, n - S))], format="csc")
    blocks = eq_rows + [pad(A_ub), box]
    b = np.concatenate(eq_b + [np.zeros(2 * K), np.zeros(S), np.full(S, p.max_weight)])
    n_eq = sum(m.shape[0] for m in eq_rows)
    cones = [clarabel.ZeroConeT(n_eq), clarabel.NonnegativeConeT(2 * K + 2 * S)]
    if kl:  # (-t_s, q_s, eta_s) in K_exp  <=>  t_s >= q_s log(q_s / eta_s)
        rows = np.arange(3 * S)
        sig = np.repeat(np.arange(S), 3)
        col = np.where(rows % 3 == 0, S + G + sig, sig)
        val = np.where(rows % 3 == 0, 1.0, np.where(rows % 3 == 1, -1.0, 0.0))
        keep = val != 0
        blocks.append(sp.csc_matrix((val[keep], (rows[keep], col[keep])), shape=(3 * S, n)))
        b = np.concatenate([b, np.where(rows % 3 == 2, eta[sig], 0.0)])
        cones += [clarabel.ExponentialConeT()] * S
        P = sp.csc_matrix((n, n))
        c = np.concatenate([-w, np.zeros(G), w])
    else:
        P = sp.diags(np.concatenate([w, np.zeros(G)])).tocsc()
        c = np.concatenate([-w * eta, np.zeros(G)])
    A = sp.vstack(blocks, format="csc")
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = 1e-12
    settings.tol_feas = 1e-12
    settings.max_iter = 400
    try:
        sol = clarabel.DefaultSolver(sp.triu(P).tocsc(), c, A, b, cones, settings).solve()
    except Exception:  # noqa: BLE001 - a failed fallback is reported by the caller as one line
        return None
    status = str(sol.status)
    if not status.startswith(("Solved", "AlmostSolved")):
        return None
    z = np.asarray(sol.z)
    x = np.concatenate([z[n_eq : n_eq + 2 * K], z[G : G + R], z[G + R : G + R + (1 if p.budget is not None else 0)]])
    q = np.clip(np.asarray(sol.x)[:S], 0.0, p.max_weight)
    dual = make_dual(p)
    lo, hi = _bounds(p, dual, None)
    x = np.clip(x, lo, hi)
    at_clarabel = x.copy()
    x, newton = newton_solve(dual, x, lo, hi, NEWTON_TOL, primal_upper_bound(p))
    newton.pop("certificate")
    info = {"method": "clarabel+sparse-newton", "clarabel_status": status, "clarabel_iterations": int(sol.iterations),
            **newton}
    polished = dual_result(p, dual, x, lo, hi, False, dict(info))
    if polished.max_violation <= FEASIBILITY_TOL:
        polished.info["seconds"] = round(time.perf_counter() - start, 6)
        return polished
    info["method"] = "clarabel"
    if p.embedding is not None:  # per-row weights come from duals: Clarabel's, in the closed form
        best = min((polished, dual_result(p, dual, at_clarabel, lo, hi, False, dict(info))), key=lambda r: r.max_violation)
        best.info["seconds"] = round(time.perf_counter() - start, 6)
        return best
    plain = dual_result(p, dual, x, lo, hi, False, info, q=q)
    plain.info["seconds"] = round(time.perf_counter() - start, 6)
    return plain


def _with_retention(p: MomentProblem, step: M4Balance, stats: CorpusStats, retention: float) -> MomentProblem:
    rebuilt, _, _, _ = build_problem(step, stats, retention=retention, stream=p.stream)
    return replace(p, eta=rebuilt.eta, budget=rebuilt.budget, stream=rebuilt.stream, hold_target=rebuilt.hold_target)


def _diagnostics(p: MomentProblem, r: DualResult, coords: Coordinates, step: M4Balance, enforcement: float | None) -> dict[str, Any]:
    K = p.K
    mu_plus, mu_minus = r.x[:K], r.x[K : 2 * K]
    scale = max(1.0, float(np.max(r.x[: 2 * K]))) if K else 1.0
    binding_mask = (mu_plus > 1e-10 * scale) | (mu_minus > 1e-10 * scale)
    W = r.carrying[p.group] if K else np.zeros(0)
    Ws = r.scale_mass[p.scale] if K else np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(W > 0, r.moments / W, 0.0)
        # per-label parity and embedding moments are bounded relative to their own scale
        relative = np.where(Ws > 0, r.moments / Ws, 0.0)

    def row(j: int) -> dict[str, Any]:
        c = coords[j]
        out = {"constraint": c.name(), "kind": c.kind, "moment": float(share[j]), "tolerance": float(p.eps[j]),
               "violation": float(r.violation[j]), "dual": float(mu_plus[j] - mu_minus[j]), "binding": bool(binding_mask[j])}
        if c.kind == "association_per_label":
            out["conditional_gap"] = float(relative[j])  # P_w(s = v | y = j) - pi_v
        return out

    # largest violation first, then the moment nearest its tolerance
    bound = np.maximum(p.eps * np.where(W > 0, Ws / np.where(W > 0, W, 1.0), 0.0), 1e-300) if K else np.zeros(0)
    order = np.lexsort((-np.abs(share) / bound, -r.violation)) if K else np.zeros(0, np.int64)
    limit = 200
    n = p.rows
    wq = p.weight * r.q
    sum_q = float(wq.sum())
    # streaming: per-row squares where the pass summed them (else the per-signature mean's square)
    sum_q2 = r.sum_q2 if r.sum_q2 is not None else float(p.weight @ (r.q**2))
    # summed excess over the tolerances (per row): what the bounded-dual variant penalises by V
    excess = float((np.maximum(0.0, r.moments - p.eps * Ws) + np.maximum(0.0, -r.moments - p.eps * Ws)).sum())
    penalty = float(enforcement * excess) if enforcement is not None else 0.0
    out = {
        "objective": step.objective,
        "objective_value": r.primal_value * n,
        "objective_per_row": r.primal_value,
        "dual_value": r.dual_value * n,
        "duality_gap": (r.primal_value + penalty - r.dual_value) * n,
        # relative to the objective, floored: at a zero objective (nothing binds) only the absolute gap means anything
        "relative_duality_gap": (r.primal_value + penalty - r.dual_value) / max(abs(r.primal_value), 1e-12),
        "kkt_residual": r.kkt_residual,
        "max_violation": r.max_violation,
        "total_excess": excess,
        "budget_residual": r.budget_residual,
        "retention": sum_q,
        "expected_rows": sum_q * n,
        "ess": (sum_q**2 / sum_q2) * n if sum_q2 > 0 else 0.0,
        "largest_weight": float(r.q.max()) if r.q.size else 0.0,
        "signatures": int(p.B.shape[0]),
        "constraints": 2 * K + p.holds + (1 if p.budget is not None else 0),
        "held_masses": p.holds,
        "binding_constraints": int(binding_mask.sum()),
        "binding": [row(j) for j in np.flatnonzero(binding_mask)[:limit]],
        "moments": [row(j) for j in order[:limit]],
        "moments_truncated": max(0, K - limit),
        "solver": r.info,
    }
    return out


@register("m4")
def solve_m4(step: M4Balance, stats: CorpusStats) -> LookupSolution | SampleBaselineSolution:
    problem, keys, coords, notes = build_problem(step, stats)
    try:
        return _solve_m4(step, stats, problem, keys, coords, notes)
    finally:
        if problem.stream is not None:
            problem.stream.close()


def _certified(problem: MomentProblem, result: DualResult, enforcement: float | None) -> DualResult | None:
    """The dual result if it meets FEASIBILITY_TOL, else the primal path's if that meets
    FALLBACK_FEASIBILITY_TOL, else None."""
    if result.max_violation <= FEASIBILITY_TOL:
        return result
    fallback = primal_solve(problem, enforcement)
    if fallback is not None and fallback.max_violation <= FALLBACK_FEASIBILITY_TOL:
        fallback.info["dual_path"] = result.info
        return fallback
    return None


def _unsettled(step: M4Balance, stats: CorpusStats, problem: MomentProblem, result: DualResult):
    """A solve that left a violation: infeasible (say which way out, or solve where it is feasible)
    or not converged (the certified slow path). Every way out is a solution or one ValueError."""
    extra: dict[str, Any] = {}
    scale = max_feasible_retention(problem)
    if problem.budget is None:  # only held masses can make it infeasible
        feasible = scale >= 1 - 1e-7
    else:
        extra["largest_feasible_retention"] = scale
        feasible = scale >= problem.budget * (1 - 1e-9)
    if feasible and step.enforcement is not None:
        return problem, result, "enforcement_bound", extra  # feasible, but the duals needed exceed V
    if feasible:
        certified = _certified(problem, result, None)
        if certified is None:
            raise ValueError(
                f"m4: the solver could not certify a solution (max violation {result.max_violation:.3g} > "
                f"{FEASIBILITY_TOL:g}); loosen balance.tolerance slightly or set balance.enforcement for a best-effort solution")
        return problem, certified, "optimal", extra
    if step.enforcement is not None:
        return problem, result, "infeasible_best_effort", extra
    if problem.budget is None:
        raise ValueError(
            "balance.hold_labels: the held label masses cannot be kept within the association tolerances "
            f"(largest feasible share of them {scale:.6g}); raise balance.tolerance.association, set "
            "balance.hold_labels: false, or set balance.enforcement for a best-effort solution")
    holds = " with balance.hold_labels" if problem.holds else ""
    if scale <= 0:
        raise ValueError(
            f"balance.retention {step.retention} is infeasible for these constraints{holds} at any retention above 0; "
            "raise balance.tolerance, drop pairs from balance.associate"
            + (", set balance.hold_labels: false" if problem.holds else "")
            + ", or set balance.enforcement for a best-effort solution")
    if step.on_infeasible != "max_retention":
        raise ValueError(
            f"balance.retention {step.retention} is infeasible for these constraints{holds} (largest feasible "
            f"retention {scale:.6g}); lower balance.retention, raise balance.max_weight or the tolerances, "
            f"set balance.on_infeasible: max_retention, or balance.enforcement for a best-effort solution")
    used = scale * (1 - 1e-6)  # strictly inside: the LP's own tolerance is ~1e-9
    problem = _with_retention(problem, step, stats, used)
    certified = _certified(problem, solve_moments(problem, None), None)
    if certified is None:
        raise ValueError(
            f"balance.on_infeasible: max_retention: no certified solution at the largest feasible retention {used:.6g}"
            f"{holds} (held masses scale with the retention only while no baseline is clipped at balance.max_weight); "
            "lower balance.retention or loosen balance.tolerance")
    return problem, certified, "solved_at_largest_feasible_retention", extra


def _solve_m4(step: M4Balance, stats: CorpusStats, problem: MomentProblem, keys, coords, notes):
    key_columns = keys.columns
    key_values = {c: keys[c].to_list() for c in key_columns}
    base = {
        "requested_retention": step.retention, "max_weight": step.max_weight, "budget": step.budget,
        "tolerance": step.tolerance.model_dump(), "enforcement": step.enforcement, "pi": notes["pi"],
        **({"pi_by_pair": notes["pi_by_pair"]} if "pi_by_pair" in notes else {}),
        **{key: notes[key] for key in ("per_label", "embedding") if key in notes},
        "utility": notes["utility"], "rows": problem.rows,
    }
    if problem.rows == 0:
        return LookupSolution("m4", key_columns, key_values, [], None, {**base, "note": "no rows"})
    result = solve_moments(problem, step.enforcement)
    status = "optimal"
    extra: dict[str, Any] = {}
    if result.max_violation > FEASIBILITY_TOL:
        problem, result, status, extra = _unsettled(step, stats, problem, result)
    diagnostics = {**base, "status": status, "feasible": status in ("optimal", "solved_at_largest_feasible_retention"), **extra}
    diagnostics.update(_diagnostics(problem, result, coords, step, step.enforcement))
    if problem.embedding is not None:  # a weight per row from the duals and the row's embedding
        from mmbalance.operators.solve.m4_embedding import row_solution

        return row_solution(problem, result, key_columns, key_values, diagnostics)
    if problem.stream is not None:  # the weight is per row: keep the dual shifts, apply per row
        from mmbalance.schemas.contract import UTILITY_COLUMN

        dual = _Dual(problem)
        t = dual.N @ (dual.T @ result.x)
        return SampleBaselineSolution(
            "m4", key_columns, key_values, t.tolist(), problem.stream.retention, problem.stream.mean_u,
            problem.max_weight, problem.objective, UTILITY_COLUMN, diagnostics,
        )
    return LookupSolution("m4", key_columns, key_values, result.q.tolist(), None, diagnostics)
