"""The primal side of M4 (docs/algorithms.md section 1): the largest feasible retention as one sparse
LP (HiGHS), and the certified slow path, the primal with Clarabel (a QP for L2, exponential cones
for KL) then the sparse Newton from its duals; over signatures, or over rows with embedding
moments while they fit (``row_primal``).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from mmbalance.operators.solve.m4.dual import DualResult, dual_bounds, dual_result, make_dual, primal_upper_bound
from mmbalance.operators.solve.m4.newton import newton_solve
from mmbalance.operators.solve.m4.problem import MomentProblem
from mmbalance.operators.solve.m4.solve import FEASIBILITY_TOL, NEWTON_TOL


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
    With embedding moments the LP is over rows (``row_primal.max_feasible_retention_rows``).
    """
    if p.embedding is not None:
        from mmbalance.operators.solve.m4.row_primal import max_feasible_retention_rows

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
        from mmbalance.operators.solve.m4.row_primal import row_matrices

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
    lo, hi = dual_bounds(p, dual, None)
    x = np.clip(x, lo, hi)
    at_clarabel = x.copy()
    x, newton = newton_solve(dual, x, lo, hi, NEWTON_TOL, primal_upper_bound(p), adaptive=p.embedding is None)
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
