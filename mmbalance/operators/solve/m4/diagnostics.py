"""What an M4 solve reports (report.json's solution): objective and dual values, the gap, KKT
residual, retention, ESS, and every moment against its tolerance, binding ones first."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmbalance.operators.solve.m4.dual import DualResult
from mmbalance.operators.solve.m4.problem import Coordinates, MomentProblem
from mmbalance.schemas.balance import M4Balance


def solve_diagnostics(p: MomentProblem, r: DualResult, coords: Coordinates, step: M4Balance, enforcement: float | None) -> dict[str, Any]:
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
