"""M4 with embedding moments, the primal side and the solution (docs/algorithms.md section 8).

The largest feasible retention is the LP of ``primal`` over rows (exact) while the rows fit
ROW_LP_NONZEROS; above that, bisection on the retention to BISECTION_RTOL: a probe counts as
feasible only when its dual solve settles (every moment within 1e-7), so the answer errs low
(3e-4 below the LP in the test); the solve at that retention is then certified as usual. The
passes start from a warm start: the optimum on a subsample of the rows, or of the compressed
problem. The solution carries t per signature, C per class and the principal components.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from mmbalance.operators.solve.m4.embedding import RowMomentStream
from mmbalance.operators.solve.m4.primal import retention_lp
from mmbalance.operators.solve.m4.problem import MomentProblem
from mmbalance.operators.solve.m4.row_dual import RowDual
from mmbalance.operators.solve.m4.solve import FALLBACK_FEASIBILITY_TOL, FEASIBILITY_TOL, solve_moments
from mmbalance.operators.solve.m4.stream import row_baselines

ROW_LP_NONZEROS = 30_000_000  # the exact row LP (and Clarabel fallback) up to this many nonzeros
BISECTION_RTOL = 1e-4  # relative width of the retention interval bisection stops at
PROBE_NEWTON_ITERATIONS = 40  # a probe that has not settled by then counts as infeasible
SUBSAMPLE_ROWS = 100_000  # above this many rows the passes start from the optimum on a subsample


def row_matrices(p: MomentProblem):
    """(M, E, H, w, eta) over rows, as ``primal.signature_matrices`` over signatures: every moment,
    scale and held mass as a weighted row sum. None when the rows would not fit ROW_LP_NONZEROS."""
    stream: RowMomentStream = p.stream
    if stream.rows * (p.Kz + 4) > ROW_LP_NONZEROS:
        return None
    blocks = list(stream.blocks.iter_blocks())
    sig = np.concatenate([b["sig"] for b in blocks]).astype(np.int64)
    z = np.concatenate([b["z"] for b in blocks]).astype(np.float64)
    cls = np.concatenate([b["cls"] for b in blocks]).astype(np.int64)
    omega = np.concatenate([b["omega"] for b in blocks])
    eta = row_baselines(np.concatenate([b["u"] for b in blocks]), stream.params(p.objective))
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
    """Largest retention found feasible, to BISECTION_RTOL: a probe is feasible when its dual solve
    meets FALLBACK_FEASIBILITY_TOL (1e-7: near the limit the solve stalls at ~1e-9) within
    PROBE_NEWTON_ITERATIONS, else (the weak-duality certificate, or not settled) infeasible, so the
    answer errs low. Without a budget: 1 or 0."""
    if p.budget is None:
        return 1.0 if solve_moments(p).max_violation <= FEASIBILITY_TOL else 0.0

    def feasible(r: float) -> bool:
        scaled = replace(p, budget=r, stream=p.stream.with_retention(r),
                         hold_target=None if p.hold_target is None else p.hold_target * r / p.budget)
        scaled.eta = scaled.stream.mean_eta()
        # no adaptive damping: near the limit the problem is nearly degenerate and damped steps crawl
        result = solve_moments(scaled, newton_iterations=PROBE_NEWTON_ITERATIONS, adaptive=False)
        return result.max_violation <= FALLBACK_FEASIBILITY_TOL  # a probe stalls at ~1e-9 near the limit

    lo, hi = 0.0, min(p.budget, p.max_weight)
    if feasible(hi):
        return hi
    while hi - lo > BISECTION_RTOL * max(hi, 1e-12):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def row_solution(p: MomentProblem, result, key_columns: list[str], key_values: dict[str, list], diagnostics: dict[str, Any]):
    """The per-row solution: t per signature and C per class from the duals, the bases, the prior."""
    from mmbalance.operators.solve.m4.solution import RowMomentSolution
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
    """Duals to start the row passes from (only a starting point: the row solve certifies the
    result). Over many rows: the optimum of the same problem on every k-th row (SUBSAMPLE_ROWS, in
    memory), whose duals are close to the full problem's; else the signature coordinates' optimum
    of the compressed problem (each signature at its mean baseline, no embedding moments; no pass
    over the rows), embedding duals at 0."""
    stream: RowMomentStream = p.stream
    if stream.rows > SUBSAMPLE_ROWS:
        sub_stream = stream.subsample(SUBSAMPLE_ROWS)
        n = int(sub_stream.counts.sum())
        weight = sub_stream.counts / n if n else sub_stream.counts
        eta = sub_stream.mean_eta()
        sub = replace(p, stream=sub_stream, weight=weight, rows=n, eta=eta,
                      hold_target=None if p.H is None else p.H.T @ (weight * eta))
        result = solve_moments(sub, enforcement)
        return x if result.infeasible_certificate else result.x
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
