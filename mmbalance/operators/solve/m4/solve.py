"""Maximising the M4 dual (docs/algorithms.md section 1): up to MAX_POLISH_VARIABLES duals L-BFGS-B,
then projected Newton on the active set (dense Hessian); above that (k = 10^3..10^5 cluster labels,
or the streaming paths) the sparse projected semismooth Newton of ``newton``, whose Hessian block
covers only the shift rows of the free duals. The tolerances every path certifies against live here.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy.optimize import minimize

from mmbalance.operators.solve.m4.dual import (DualResult, SignatureDual, dual_bounds, dual_result, make_dual,
                                               primal_upper_bound)
from mmbalance.operators.solve.m4.newton import newton_solve, projected_residual
from mmbalance.operators.solve.m4.problem import MomentProblem

FEASIBILITY_TOL = 1e-9  # largest constraint violation, as a share of the carrying weight, we call feasible
KKT_TOL = 1e-13  # natural-residual target of the Newton polish (duals and moments are O(1))
FALLBACK_FEASIBILITY_TOL = 1e-7  # the interior-point path's guarantee when the Newton finish does not reach 1e-9
NEWTON_TOL = 1e-12  # the sparse Newton's target; it stops earlier at the floor of rounding
MAX_POLISH_VARIABLES = 4000  # the polish forms a dense Hessian over the duals
DENSE_PATH_SIGNATURES = 20_000  # above this many signatures (or streaming) the sparse Newton goes first


def solve_moments(p: MomentProblem, enforcement: float | None = None, polish: bool = True,
                  newton_iterations: int = 200, adaptive: bool = True) -> DualResult:
    """Maximise the dual. Up to MAX_POLISH_VARIABLES duals: L-BFGS-B, then a dense projected-Newton
    polish; above that (or when that does not reach the KKT target): the sparse projected
    semismooth Newton of ``m4_newton``, whose cost grows with the binding constraints, not K."""
    start = time.perf_counter()
    dual = make_dual(p)
    lo, hi = dual_bounds(p, dual, enforcement)
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
        from mmbalance.operators.solve.m4.row_primal import warm_start

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
            x, newton = newton_solve(dual, x, lo, hi, NEWTON_TOL, bound, max_iter=newton_iterations, adaptive=adaptive)
            certificate = certificate or newton.pop("certificate")
            info.update(newton)
    info["method"] = "lbfgsb+dense-newton" if small and "newton_iterations" not in info else "sparse-newton"
    result = dual_result(p, dual, x, lo, hi, certificate, info)
    result.info["seconds"] = round(time.perf_counter() - start, 6)
    return result


def _polish(dual: SignatureDual, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_iter: int = 50) -> tuple[np.ndarray, int]:
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
