"""Per-label (conditional) parity (docs/algorithms.md section 8) against an independent cvxpy
formulation: k = 3,000 concepts, two attributes, with and without the global bound, label values
under ``min_support`` pooled; infeasible and largest-retention outcomes."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
from operators.solve.m4_reference import AGES, CONCEPT_BALANCE, GENDERS, concept_stats

from mmbalance.operators.solve import CorpusStats, solve
from mmbalance.operators.solve.m4 import build_problem, max_feasible_retention

TAGS = ["tag.gender", "tag.age", "tag.concept", "tag.occupation"]
ATTRS = {"gender": GENDERS, "age": AGES}


def _codes(stats: CorpusStats, name: str, values: list[str]) -> np.ndarray:
    index = {v: i for i, v in enumerate(values)}
    return np.array([-1 if v is None else index[v] for v in stats.signatures.column(f"tag.{name}").to_pylist()])


def reference_problem(stats: CorpusStats, retention: float):
    """The primal from algorithms.md sections 1 and 8, written row by row with sparse matrices:
    a label value with at least min_support attribute-carrying rows gets |sum_w (s_v - pi_v) y_j|
    <= eps_P sum_w a y_j; the smaller ones of a label are pooled into one indicator."""
    step = stats.recipe.balance
    tol = step.tolerance
    w = np.asarray(stats.signatures.column("count"), np.float64)
    S = len(w)
    w *= S / w.sum()  # mean weight 1: interior-point tolerances are absolute
    n_rows = np.asarray(stats.signatures.column("count"), np.float64)
    codes = {a: _codes(stats, a, v) for a, v in ATTRS.items()}
    labels = {lab: _codes(stats, lab, stats.vocab[lab]) for lab in ("concept", "occupation")}
    q = cp.Variable(S)
    eta = np.full(S, min(retention, step.max_weight))
    cons = [q >= 0, q <= step.max_weight]
    if step.budget:
        cons.append(w @ q == retention * S)
    moment, which, eps = [], [], []  # sparse moment rows, the scale each is bounded by, its tolerance
    scales: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # a variable per scale: W = sum w q over rows

    def bound(rows: np.ndarray, centred_k: np.ndarray, scale_key: tuple, scale_rows: np.ndarray, tolerance: float) -> None:
        """|sum_{s in rows} w_s c_s q_s| <= tolerance * sum_{s in scale_rows} w_s q_s."""
        moment.append((rows, w[rows] * centred_k[rows]))
        scales.setdefault(scale_key, (scale_rows, w[scale_rows]))
        which.append(list(scales).index(scale_key))
        eps.append(tolerance)

    pooled: dict[str, list[str]] = {}
    for a, values in ATTRS.items():
        carry = codes[a] >= 0
        if a in step.targets:
            pi = np.array([step.targets[a][v] for v in values])
        else:
            pi = np.bincount(codes[a][carry], weights=w[carry], minlength=len(values)) / w[carry].sum()
        onehot = np.zeros((S, len(values)))
        onehot[np.flatnonzero(carry), codes[a][carry]] = 1.0
        centred = (onehot - pi) * carry[:, None]
        if a in step.targets:
            for k in range(len(values)):
                bound(np.flatnonzero(carry), centred[:, k], (a,), np.flatnonzero(carry), tol.representation)
        for pa_, lab in step.associate:
            if pa_ != a:
                continue
            y = labels[lab]
            names = stats.vocab[lab]
            support = np.bincount(y[carry & (y >= 0)], weights=n_rows[carry & (y >= 0)], minlength=len(names))
            small = [r for r in range(len(names)) if 0 < support[r] < step.min_support]
            pooled[f"{a} x {lab}"] = [names[r] for r in small]
            for r in range(len(names)):
                rows = np.flatnonzero(carry & (y == r))
                if not len(rows):
                    continue
                for k in range(len(values)):
                    if tol.association is not None:
                        bound(rows, centred[:, k], (a,), np.flatnonzero(carry), tol.association)
                    if tol.association_per_label is not None and support[r] >= step.min_support:
                        bound(rows, centred[:, k], (a, lab, r), rows, tol.association_per_label)
            if tol.association_per_label is not None and small:
                rows = np.flatnonzero(carry & np.isin(y, small))
                for k in range(len(values)):
                    bound(rows, centred[:, k], (a, lab, "pooled"), rows, tol.association_per_label)

    def stack(parts):
        r = np.concatenate([np.full(len(c), i) for i, (c, _) in enumerate(parts)])
        return sp.csr_matrix((np.concatenate([v for _, v in parts]), (r, np.concatenate([c for c, _ in parts]))),
                             shape=(len(parts), S))

    M = stack(moment)
    W = cp.Variable(len(scales))
    cons.append(W == stack(list(scales.values())) @ q)
    E = sp.csr_matrix((eps, (np.arange(len(eps)), which)), shape=(len(eps), len(scales)))
    cons += [M @ q - E @ W <= 0, -(M @ q) - E @ W <= 0]
    if step.objective == "l2":
        obj = 0.5 * cp.sum(cp.multiply(w, cp.square(q - eta))) / S
    else:
        obj = cp.sum(cp.multiply(w, cp.kl_div(q, eta))) / S
    return q, obj, cons, pooled


def reference_solve(stats: CorpusStats, retention: float):
    q, obj, cons, pooled = reference_problem(stats, retention)
    prob = cp.Problem(cp.Minimize(obj), cons)
    tol = 1e-11 if stats.recipe.balance.objective == "l2" else 1e-8
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol)
    return prob.status, np.asarray(q.value), prob.value, pooled


def reference_feasible(stats: CorpusStats, retention: float) -> bool:
    _, _, cons, _ = reference_problem(stats, retention)
    prob = cp.Problem(cp.Minimize(0), cons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prob.solve(solver=cp.CLARABEL)
    assert prob.status in ("optimal", "optimal_inaccurate", "infeasible", "infeasible_inaccurate"), prob.status
    return prob.status.startswith("optimal")


def _balance(association, per_label, **extra):
    return {**CONCEPT_BALANCE, "tolerance": {"representation": 0.01, "association": association,
                                             "association_per_label": per_label}, "min_support": 50, **extra}


@pytest.mark.parametrize("association, objective, concepts, rows", [
    (None, "l2", 3000, 30000),     # per-label parity only
    (0.002, "l2", 3000, 30000),    # beside the global bound (shared moment columns)
    (0.002, "kl", 800, 8000),      # exponential cones: cvxpy's KL form is slow at k = 3,000
])
def test_per_label_parity_matches_cvxpy(association, objective, concepts, rows):
    stats = concept_stats(11, concepts, rows, _balance(association, 0.05, objective=objective), occupations=30)
    solution = solve(stats)
    d = solution.diagnostics
    assert d["status"] == "optimal" and d["max_violation"] <= 1e-9
    assert d["kkt_residual"] <= 1e-9 and abs(d["relative_duality_gap"]) <= 1e-8
    kinds = {b["kind"] for b in d["binding"]}
    assert "association_per_label" in kinds  # the conditional bounds bind
    assert ("association" in kinds) == (association is not None)
    status, q_ref, ref, pooled = reference_solve(stats, 0.6)
    assert status == "optimal"
    assert d["objective_per_row"] == pytest.approx(ref, rel=1e-6 if objective == "l2" else 1e-5)
    q = solution.weights(stats.signatures.select(TAGS))
    np.testing.assert_allclose(q, q_ref, atol=2e-5 if objective == "l2" else 2e-4)
    # the values under min_support are the ones the report names as pooled
    for family, names in pooled.items():
        if family in d["per_label"]:
            assert d["per_label"][family]["pooled_values"] == names
    assert sum(len(v) for v in pooled.values()) > 100


def test_per_label_conditional_shares_hold_on_the_weights():
    """|P_w(s = v | y = j) - pi_v| <= eps for every label value with enough support, recomputed
    from the signature weights; and the global bound alone leaves them far outside."""
    stats = concept_stats(4, 1000, 20000, _balance(None, 0.03), occupations=20)
    q = solve(stats).weights(stats.signatures.select(TAGS))
    t = stats.signatures.to_pydict()
    n = np.asarray(t["count"], np.float64)
    worst = _worst_conditional(t, n * q, n, 50)
    assert worst <= 0.03 + 1e-7
    globally = concept_stats(4, 1000, 20000, _balance(0.002, None), occupations=20)
    q_global = solve(globally).weights(stats.signatures.select(TAGS))
    assert _worst_conditional(t, n * q_global, n, 50) > 0.1


def _worst_conditional(t: dict, weight: np.ndarray, count: np.ndarray, min_support: int) -> float:
    gender, concept = np.array(t["tag.gender"], dtype=object), np.array(t["tag.concept"], dtype=object)
    carrying = np.array([g is not None for g in gender])
    worst = 0.0
    for c in set(concept[carrying]) - {None}:
        rows = carrying & (concept == c)
        if count[rows].sum() < min_support or weight[rows].sum() == 0:
            continue
        share = weight[rows & (gender == "woman")].sum() / weight[rows].sum()
        worst = max(worst, abs(share - 0.5))
    return worst


def test_infeasible_per_label_parity_names_the_largest_feasible_retention():
    stats = concept_stats(5, 400, 8000, _balance(None, 0.0, retention=0.9), occupations=10)
    with pytest.raises(ValueError, match=r"balance.retention 0.9 is infeasible .*largest feasible retention") as err:
        solve(stats)
    assert "\n" not in str(err.value)
    largest = float(str(err.value).split("largest feasible retention ")[1].split(")")[0])
    assert 0 < largest < 0.9
    assert reference_feasible(stats, largest * (1 - 1e-4))
    assert not reference_feasible(stats, largest * (1 + 1e-3))


def test_max_retention_with_per_label_parity_solves_at_the_largest_feasible_retention():
    stats = concept_stats(5, 400, 8000, _balance(None, 0.0, retention=0.9, on_infeasible="max_retention"), occupations=10)
    d = solve(stats).diagnostics
    assert d["status"] == "solved_at_largest_feasible_retention"
    assert d["max_violation"] <= 1e-9
    assert d["retention"] == pytest.approx(d["largest_feasible_retention"], rel=1e-5)
    # the LP agrees with an independent feasibility check just below and above its value
    assert reference_feasible(stats, d["largest_feasible_retention"] * (1 - 1e-4))


def test_per_label_parity_costs_retention_and_uses_the_lp():
    tight = concept_stats(5, 400, 8000, _balance(0.002, 0.01), occupations=10)
    loose = concept_stats(5, 400, 8000, _balance(0.002, None), occupations=10)
    r_tight = max_feasible_retention(build_problem(tight.recipe.balance, tight)[0])
    r_loose = max_feasible_retention(build_problem(loose.recipe.balance, loose)[0])
    assert r_tight < r_loose


def test_clarabel_fallback_and_hold_labels_keep_working_with_per_label(monkeypatch):
    from mmbalance.operators.solve import m4

    balance = _balance(None, 0.05, hold_labels=True, associate=[["gender", "concept"]], targets={}, retention=0.5)
    stats = concept_stats(3, 600, 6000, balance, occupations=10)
    expected = solve(stats).diagnostics
    assert expected["status"] == "optimal" and expected["held_masses"] > 0
    real = m4.newton_solve
    calls = {"n": 0}

    def stops_short_once(dual, x, lo, hi, tol, bound, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            return np.clip(x, lo, hi), {"certificate": False, "converged": False}
        return real(dual, x, lo, hi, tol, bound, **kw)

    monkeypatch.setattr(m4, "newton_solve", stops_short_once)
    monkeypatch.setattr(m4, "MAX_POLISH_VARIABLES", 0)  # the sparse Newton first, as at scale
    d = solve(stats).diagnostics
    assert d["status"] == "optimal" and d["solver"]["method"].startswith("clarabel")
    assert d["max_violation"] <= 1e-9
    assert d["objective_per_row"] == pytest.approx(expected["objective_per_row"], rel=1e-7)
