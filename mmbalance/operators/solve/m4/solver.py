"""M4 moment matching as a balance method (``balance.method: m4``): build the problem, maximise the
dual, and settle what is left: an infeasible request (say which way out, or solve at the largest
feasible retention) or an uncertified one (the primal path). Every way out is a solution or one
ValueError naming the recipe keys to change.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmbalance.operators.solve import CorpusStats, LookupSolution, register
from mmbalance.operators.solve.m4.diagnostics import solve_diagnostics
from mmbalance.operators.solve.m4.dual import DualResult, SignatureDual
from mmbalance.operators.solve.m4.primal import max_feasible_retention, primal_solve
from mmbalance.operators.solve.m4.problem import MomentProblem, build_problem
from mmbalance.operators.solve.m4.solution import SampleBaselineSolution
from mmbalance.operators.solve.m4.solve import FALLBACK_FEASIBILITY_TOL, FEASIBILITY_TOL, solve_moments
from mmbalance.schemas.balance import M4Balance


def with_retention(p: MomentProblem, step: M4Balance, stats: CorpusStats, retention: float) -> MomentProblem:
    rebuilt, _, _, _ = build_problem(step, stats, retention=retention, stream=p.stream)
    return replace(p, eta=rebuilt.eta, budget=rebuilt.budget, stream=rebuilt.stream, hold_target=rebuilt.hold_target)


@register("m4")
def solve_m4(step: M4Balance, stats: CorpusStats) -> LookupSolution | SampleBaselineSolution:
    problem, keys, coords, notes = build_problem(step, stats)
    try:
        return _solve_m4(step, stats, problem, keys, coords, notes)
    finally:
        if problem.stream is not None:
            problem.stream.close()


def certify(problem: MomentProblem, result: DualResult, enforcement: float | None) -> DualResult | None:
    """The dual result if it meets FEASIBILITY_TOL, else the primal path's if that meets
    FALLBACK_FEASIBILITY_TOL, else None."""
    if result.max_violation <= FEASIBILITY_TOL:
        return result
    fallback = primal_solve(problem, enforcement)
    if fallback is not None and fallback.max_violation <= FALLBACK_FEASIBILITY_TOL:
        fallback.info["dual_path"] = result.info
        return fallback
    return None


def unsettled(step: M4Balance, stats: CorpusStats, problem: MomentProblem, result: DualResult):
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
        certified = certify(problem, result, None)
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
    # strictly inside: the LP's own tolerance is ~1e-9 (over rows without the LP, bisection errs low
    # but a solve just under a limit may stall: step back further before giving up)
    for margin in (1e-6,) if problem.embedding is None else (1e-6, 1e-4, 1e-2):
        used = scale * (1 - margin)
        problem = with_retention(problem, step, stats, used)
        certified = certify(problem, solve_moments(problem, None), None)
        if certified is not None:
            break
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
        problem, result, status, extra = unsettled(step, stats, problem, result)
    diagnostics = {**base, "status": status, "feasible": status in ("optimal", "solved_at_largest_feasible_retention"), **extra}
    diagnostics.update(solve_diagnostics(problem, result, coords, step, step.enforcement))
    if problem.embedding is not None:  # a weight per row from the duals and the row's embedding
        from mmbalance.operators.solve.m4.row_primal import row_solution

        return row_solution(problem, result, key_columns, key_values, diagnostics)
    if problem.stream is not None:  # the weight is per row: keep the dual shifts, apply per row
        from mmbalance.schemas.contract import UTILITY_COLUMN

        dual = SignatureDual(problem)
        t = dual.N @ (dual.T @ result.x)
        return SampleBaselineSolution(
            "m4", key_columns, key_values, t.tolist(), problem.stream.retention, problem.stream.mean_u,
            problem.max_weight, problem.objective, UTILITY_COLUMN, diagnostics,
        )
    return LookupSolution("m4", key_columns, key_values, result.q.tolist(), None, diagnostics)
