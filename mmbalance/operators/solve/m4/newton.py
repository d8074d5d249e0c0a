"""Sparse projected semismooth Newton for the M4 dual (any number of labels).

The dual is maximised over a box (mu >= 0 or [0, V]; held masses and the budget free). Its
generalised Hessian is ``T' Z T`` with ``Z = N' diag(w dq/dt) N`` over the dual's shift space: N has
one row per signature and only the signature's own coordinates as nonzeros, so Z is sparse (a
coordinate of label value r meets only coordinates that share rows with r). T maps the duals to
shifts and is sparse except for the carrying-weight rows (each attribute group's tolerance couples
all its duals): those stay low rank inside the matrix-free product ``T' (Z (T v))``.

Each iteration: the free set (Bertsekas' projected Newton, with an epsilon-active set), a
Levenberg-Marquardt regularised Newton system on it solved by preconditioned CG (Jacobi), and an
Armijo search along the projection arc. The LM weight on the diagonal adapts: it grows while the
search cuts steps short (far from the solution, where the line crosses many kinks of the
piecewise-quadratic dual) and fades near the solution, where the plain Newton step converges. The Hessian product never touches the signatures, so CG
iterations are cheap next to one dual evaluation (one pass over the signatures or the rows).
MMBALANCE_M4_TRACE=1 prints one line per iteration (residual, value, step, free duals).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, cg

_TRACE = bool(os.environ.get("MMBALANCE_M4_TRACE"))


def projected_residual(x: np.ndarray, grad: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Natural KKT residual of max phi over [lo, hi]: |x - P(x + grad)|_inf (grad = ascent)."""
    return float(np.max(np.abs(x - np.clip(x + grad, lo, hi)))) if x.size else 0.0


def _diagonal(Z: sp.csr_matrix, Tf: sp.csc_matrix) -> np.ndarray:
    """diag(Tf' Z Tf) for a T whose columns have at most two nonzeros (a shift and a tolerance row),
    without forming Z Tf (the tolerance rows are dense)."""
    counts = np.diff(Tf.indptr)
    if counts.size and counts.max() > 2:
        raise AssertionError("m4 newton: a dual touches more than two shift rows")
    n = Tf.shape[1]
    first = Tf.indptr[:-1]
    has = counts > 0
    r1 = np.where(has, Tf.indices[np.minimum(first, max(len(Tf.indices) - 1, 0))] if len(Tf.indices) else 0, 0)
    v1 = np.where(has, Tf.data[np.minimum(first, max(len(Tf.data) - 1, 0))] if len(Tf.data) else 0.0, 0.0)
    two = counts == 2
    r2 = np.where(two, Tf.indices[np.minimum(first + 1, max(len(Tf.indices) - 1, 0))] if len(Tf.indices) else 0, 0)
    v2 = np.where(two, Tf.data[np.minimum(first + 1, max(len(Tf.data) - 1, 0))] if len(Tf.data) else 0.0, 0.0)
    z11 = np.asarray(Z[r1, r1]).ravel() if n else np.zeros(0)
    z12 = np.asarray(Z[r1, r2]).ravel() if n else np.zeros(0)
    z22 = np.asarray(Z[r2, r2]).ravel() if n else np.zeros(0)
    return v1 * v1 * z11 + 2 * v1 * v2 * z12 + v2 * v2 * z22


def newton_solve(dual, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, tol: float, bound: float,
                 max_iter: int = 200, deadline: float | None = None, adaptive: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Maximise the dual from ``x`` until the KKT residual is <= ``tol``.

    ``dual`` is an ``m4._Dual``: ``value_grad(x)`` (value, ascent gradient, q) and ``curvature(x)``
    (Z as a sparse matrix). Stops early, flagging ``certificate``, once the value exceeds ``bound``
    (the largest primal objective: weak duality then proves the constraints infeasible).
    ``adaptive``: the damping of the module docstring (off where the problem is nearly degenerate,
    e.g. at the largest feasible retention, and damped steps crawl).
    """
    start = time.perf_counter()
    x = np.clip(x, lo, hi)
    value, grad, _ = dual.value_grad(x)
    residual = projected_residual(x, grad, lo, hi)
    info: dict[str, Any] = {"newton_iterations": 0, "cg_iterations": 0, "certificate": False, "converged": False}
    T = dual.Ts
    stalls = 0
    damping = 0.0  # adaptive Levenberg-Marquardt weight on the diagonal: grows while steps are cut short
    for it in range(1, max_iter + 1):
        if residual <= tol:
            info["converged"] = True
            break
        if value > bound * (1 + 1e-9) + 1e-12:
            info["certificate"] = True
            break
        if deadline is not None and time.perf_counter() > deadline:
            break
        info["newton_iterations"] = it
        # epsilon-active set: variables at (or within eps of) a bound whose gradient pushes outward
        eps_active = min(1e-3, residual)
        fixed = ((x <= lo + eps_active) & (grad < 0)) | ((x >= hi - eps_active) & (grad > 0))
        free = np.flatnonzero(~fixed)
        Tf = T[:, free].tocsc()
        # Z only where the free duals shift: a few hundred rows when few constraints bind
        shift_rows = np.unique(Tf.indices)
        last = np.isin(shift_rows, getattr(dual, "dense_rows", ()))  # dense rows last: Z needs no permutation
        shift_rows = np.concatenate([shift_rows[~last], shift_rows[last]])
        Tf = Tf[shift_rows, :].tocsc()
        TfT = Tf.T.tocsr()
        Z = dual.curvature(x, shift_rows)
        diag = _diagonal(Z, Tf)
        scale = float(diag.max()) if diag.size and diag.max() > 0 else 1.0
        # LM regularisation: the duals of one attribute's values are dependent (the centred moments
        # sum to zero) and rows clipped at 0 or Q carry no curvature
        tau = min(1e-6, max(residual, 1e-12)) * scale + 1e-14 * scale
        # the adaptive damping fades near the solution, where the Newton step is the right one
        reg = diag * (1e-10 + damping * min(1.0, residual / 1e-6)) + tau

        def matvec(v, Tf=Tf, TfT=TfT, Z=Z, reg=reg):
            return TfT @ (Z @ (Tf @ v)) + reg * v

        op = LinearOperator((len(free), len(free)), matvec=matvec, dtype=np.float64)
        precond = LinearOperator((len(free), len(free)), matvec=lambda v, d=diag + reg: v / d, dtype=np.float64)
        counter = {"n": 0}

        def count(_):
            counter["n"] += 1

        g_free = grad[free]
        rtol = min(0.1, max(1e-10, residual ** 0.5 * 1e-2))
        step_free, _ = cg(op, g_free, rtol=rtol, maxiter=max(50, min(2000, len(free))), M=precond, callback=count)
        info["cg_iterations"] += counter["n"]
        direction = np.zeros_like(x)
        direction[free] = step_free
        # fixed variables sit at their bound (Bertsekas: their gradient step is projected away)
        base = x.copy()
        base[fixed & (x <= lo + eps_active)] = lo[fixed & (x <= lo + eps_active)]
        base[fixed & (x >= hi - eps_active)] = hi[fixed & (x >= hi - eps_active)]
        alpha, accepted = 1.0, False
        while alpha > 1e-10:
            trial = np.clip(base + alpha * direction, lo, hi)
            v_new, g_new, _ = dual.value_grad(trial)
            gain = float(grad @ (trial - x))
            if v_new >= value + 1e-4 * max(gain, 0.0) and v_new > value - 1e-15 * max(1.0, abs(value)):
                accepted = True
                break
            # the maximiser of the quadratic through value, slope and the trial (safeguarded)
            curv_fit = (v_new - value - gain) / alpha**2 if gain > 0 else 0.0
            guess = gain / alpha / (-2 * curv_fit) if curv_fit < 0 else 0.5 * alpha
            alpha = min(0.5 * alpha, max(0.05 * alpha, guess))
        if not accepted:  # a projected-gradient step keeps progress when the model is poor
            step = 1.0 / scale
            while step * scale > 1e-12:
                trial = np.clip(x + step * grad, lo, hi)
                v_new, g_new, _ = dual.value_grad(trial)
                if v_new > value:
                    accepted = True
                    break
                step *= 0.25
        if not accepted:
            stalls += 1
            if stalls >= 2:
                break
            continue
        # a step cut far short (the line crosses many kinks: thousands of per-label bounds binding at
        # once): the quadratic model is poor here, so lean towards diagonally scaled gradient steps
        if adaptive:
            damping = min(1e3, max(damping * 4, 0.1)) if alpha < 0.1 else damping * (0.1 if alpha >= 0.5 else 0.5)
        r_new = projected_residual(trial, g_new, lo, hi)
        # at the floor of rounding (sums over millions of signatures): no gain, no smaller residual
        if v_new - value <= 1e-12 * abs(value) and r_new >= 0.5 * residual:
            stalls += 1
        else:
            stalls = 0
        if _TRACE:
            print(f"newton {it}: residual {r_new:.3g} value {v_new:.15g} alpha {alpha:.3g} free {len(free)} cg {counter['n']} "
                  f"evals {dual.evaluations} t {time.perf_counter() - start:.2f}", flush=True)
        x, value, grad, residual = trial, v_new, g_new, r_new
        if stalls >= 3 or (stalls and residual <= 100 * tol):  # near the target, one stalled step is enough
            info["stalled"] = True
            break
    info["kkt_residual"] = residual
    info["newton_seconds"] = round(time.perf_counter() - start, 6)
    return x, info
