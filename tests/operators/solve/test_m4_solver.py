"""M4 against an independent convex solver (cvxpy/CLARABEL), infeasibility, and the KL/reweigh link."""

from __future__ import annotations

import json
import warnings

import cvxpy as cp
import numpy as np
import pyarrow as pa
import pytest
from operators.solve.m4_reference import cvxpy_m4, random_stats

from mmbalance.operators.solve import CorpusStats, solution_from_dict, solve
from mmbalance.operators.solve.reweigh import reweigh_cells
from mmbalance.schemas.recipe import parse_recipe

TAGS = ["tag.g", "tag.occ"]


def moments(stats: CorpusStats, q: np.ndarray, pi: dict[str, float]) -> tuple[float, float]:
    """Largest representation and association moment (share of carrying weight), from the raw table."""
    t = stats.signatures.to_pydict()
    n = np.array(t["count"], dtype=np.float64)
    carrying = np.array([s is not None for s in t["tag.g"]])
    W = float((n * q)[carrying].sum())
    rep, assoc = 0.0, 0.0
    for v, p in pi.items():
        s = np.array([x == v for x in t["tag.g"]], dtype=np.float64)
        centred = (s - p) * carrying
        rep = max(rep, abs(float((n * q * centred).sum())) / W)
        for r in stats.vocab["occ"]:
            y = np.array([x == r for x in t["tag.occ"]], dtype=np.float64)
            assoc = max(assoc, abs(float((n * q * centred * y).sum())) / W)
    return rep, assoc


CASES = [  # (objective, m, R, eps_R, eps_A, retention, Q, budget, targets?)
    ("l2", 2, 3, 0.01, 0.01, 0.5, 1.0, True, True),
    ("l2", 2, 5, 0.0, 0.0, 0.4, 1.0, True, True),
    ("l2", 3, 4, 0.02, 0.005, 0.8, 2.5, True, True),
    ("l2", 2, 6, 0.01, 0.0, 0.9, 1.0, False, True),
    ("l2", 3, 3, 0.0, 0.01, 0.6, 1.0, True, False),
    ("kl", 2, 4, 0.01, 0.01, 0.5, 1.0, True, True),
    ("kl", 3, 3, 0.0, 0.0, 0.7, 3.0, True, True),
    ("kl", 2, 5, 0.01, 0.002, 0.9, 2.0, False, False),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_cvxpy_on_random_instances(case, seed):
    objective, m, R, eps_r, eps_a, retention, Q, budget, with_targets = case
    rng = np.random.default_rng(seed + 10)
    pi = rng.dirichlet(np.full(m, 5.0))
    values = [f"v{k}" for k in range(m)]
    balance = {
        "method": "m4", "associate": [["g", "occ"]], "objective": objective, "retention": retention,
        "max_weight": Q, "budget": budget, "tolerance": {"representation": eps_r, "association": eps_a},
    }
    if with_targets:
        balance["targets"] = {"g": dict(zip(values, (pi / pi.sum()).tolist()))}
    stats = random_stats(seed, m=m, R=R, balance=balance, skew=0.7)
    status, q_ref, ref = cvxpy_m4(stats)
    assert status == "optimal"
    sol = solve(stats)
    d = sol.diagnostics
    assert d["status"] == "optimal"
    ours = d["objective_per_row"]
    assert abs(ours - ref) <= 1e-4 * abs(ref) + 1e-12
    q = sol.weights(stats.signatures.select(TAGS))
    assert np.all(q >= 0) and np.all(q <= Q + 1e-12)
    used_pi = d["pi"]["g"]
    rep, assoc = moments(stats, q, used_pi)
    if with_targets:
        assert rep <= eps_r + 1e-6
    assert assoc <= eps_a + 1e-6
    assert d["max_violation"] <= 1e-6
    if budget:
        n = np.array(stats.signatures.column("count").to_pylist(), dtype=np.float64)
        assert abs((n * q).sum() / n.sum() - retention) <= 1e-6
    assert d["relative_duality_gap"] <= 1e-6
    # the optimum is unique (strictly convex objective): the weights agree too
    np.testing.assert_allclose(q, q_ref, atol=1e-4)


def test_binding_constraints_carry_their_duals_and_solution_round_trips():
    balance = {"method": "m4", "targets": {"g": {"v0": 0.5, "v1": 0.5}}, "associate": [["g", "occ"]], "retention": 0.3}
    stats = random_stats(3, balance=balance, skew=2.0)
    sol = solve(stats)
    d = sol.diagnostics
    assert d["binding"], "a skewed corpus must bind some constraint"
    for row in d["binding"]:
        assert row["dual"] != 0.0
        assert abs(abs(row["moment"]) - row["tolerance"]) <= 1e-9  # binding = at its bound
    again = solution_from_dict(json.loads(json.dumps(sol.to_dict())))
    tags = stats.signatures.select(TAGS)
    np.testing.assert_array_equal(again.weights(tags), sol.weights(tags))
    assert 0 < d["ess"] <= stats.total_rows


def cvxpy_feasible(stats: CorpusStats, retention: float) -> bool:
    """Pure feasibility of the constraints at a retention, as an LP in cvxpy."""
    step = stats.recipe.balance
    t = stats.signatures.to_pydict()
    w = np.array(t["count"], dtype=np.float64)
    w /= w.sum()
    carrying = np.array([s is not None for s in t["tag.g"]], dtype=np.float64)
    q = cp.Variable(len(w))
    W = (w * carrying) @ q
    cons = [q >= 0, q <= step.max_weight, w @ q == retention]
    for v, p in step.targets["g"].items():
        c = (np.array([s == v for s in t["tag.g"]]) - p) * carrying
        cons += [cp.abs((w * c) @ q) <= step.tolerance.representation * W]
        for r in stats.vocab["occ"]:
            y = np.array([x == r for x in t["tag.occ"]], dtype=np.float64)
            cons += [cp.abs((w * c * y) @ q) <= step.tolerance.association * W]
    prob = cp.Problem(cp.Minimize(0), cons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "inaccurate" near the boundary: the status still says which side
        prob.solve(solver=cp.CLARABEL)
    assert prob.status in ("optimal", "optimal_inaccurate", "infeasible", "infeasible_inaccurate"), prob.status
    return prob.status.startswith("optimal")


INFEASIBLE = {
    "method": "m4", "targets": {"g": {"v0": 0.5, "v1": 0.5}}, "associate": [["g", "occ"]],
    "tolerance": {"representation": 0.01, "association": 0.01}, "retention": 0.9, "max_weight": 1.0,
}


def test_infeasible_request_is_reported_with_the_largest_feasible_retention():
    stats = random_stats(0, R=4, balance=INFEASIBLE, skew=3.0)
    with pytest.raises(ValueError, match=r"balance.retention 0.9 is infeasible .*largest feasible retention") as err:
        solve(stats)
    largest = float(str(err.value).split("largest feasible retention ")[1].split(")")[0])
    assert 0 < largest < 0.9
    assert cvxpy_feasible(stats, largest * (1 - 1e-4))
    assert not cvxpy_feasible(stats, largest * (1 + 1e-3))


def test_on_infeasible_max_retention_solves_at_the_largest_feasible_retention():
    stats = random_stats(0, R=4, balance={**INFEASIBLE, "on_infeasible": "max_retention"}, skew=3.0)
    d = solve(stats).diagnostics
    assert d["status"] == "solved_at_largest_feasible_retention" and d["feasible"]
    assert abs(d["retention"] - d["largest_feasible_retention"]) <= 1e-5 * d["largest_feasible_retention"]
    assert d["max_violation"] <= 1e-6
    assert d["retention"] < 0.9


def test_bounded_duals_give_a_best_effort_solution_and_report_the_violation():
    stats = random_stats(0, R=4, balance={**INFEASIBLE, "enforcement": 0.5}, skew=3.0)
    d = solve(stats).diagnostics
    assert d["status"] == "infeasible_best_effort" and not d["feasible"]
    assert d["max_violation"] > 0.01
    assert abs(d["retention"] - 0.9) <= 1e-9  # the budget still holds exactly
    assert 0 < d["largest_feasible_retention"] < 0.9
    assert all(abs(row["dual"]) <= 0.5 + 1e-12 for row in d["moments"])
    # exact-penalty view: a larger V never increases the summed excess over the tolerances
    d_big = solve(random_stats(0, R=4, balance={**INFEASIBLE, "enforcement": 5.0}, skew=3.0)).diagnostics
    assert d_big["total_excess"] <= d["total_excess"] + 1e-12


def test_kl_with_association_only_at_observed_prevalence_is_reweighing_up_to_a_factor_per_label():
    """KL-M4 (association constraints, pi = observed prevalence, eps = 0) gives each label value the
    same conditional shares of s as reweighing: q / reweigh is one constant per label value. The
    constant is not 1 in general (M4 does not hold the label marginals), so equality is per label."""
    balance = {
        "method": "m4", "associate": [["g", "occ"]], "objective": "kl", "budget": False, "retention": 1.0,
        "max_weight": 1000.0, "tolerance": {"representation": 0.0, "association": 0.0},
    }
    stats = random_stats(4, m=3, R=4, balance=balance, skew=2.0, null_labels=False)
    q = solve(stats).weights(stats.signatures.select(TAGS))
    t = stats.signatures.to_pydict()
    cells = {(s, y): c for s, y, c in zip(t["tag.g"], t["tag.occ"], t["count"]) if s is not None}
    rw = reweigh_cells(cells)
    by_label: dict[str, list[float]] = {}
    for s, y, w in zip(t["tag.g"], t["tag.occ"], q):
        if s is None:
            assert w == pytest.approx(1.0, abs=1e-12)  # no attribute, no constraint: the baseline
        else:
            by_label.setdefault(y, []).append(w / rw[(s, y)])
    for ratios in by_label.values():
        assert max(ratios) - min(ratios) <= 1e-9 * max(ratios)


def test_kl_with_association_and_held_label_masses_is_reweighing_exactly():
    """Holding each label value's mass among the carrying rows (hold_labels) fixes the per-label factor
    of the test above: KL-M4 at pi = observed prevalence is then Kamiran-Calders reweighing itself."""
    balance = {
        "method": "m4", "associate": [["g", "occ"]], "objective": "kl", "budget": False, "retention": 1.0,
        "max_weight": 1000.0, "tolerance": {"representation": 0.0, "association": 0.0}, "hold_labels": True,
    }
    stats = random_stats(4, m=3, R=4, balance=balance, skew=2.0, null_labels=False)
    solution = solve(stats)
    q = solution.weights(stats.signatures.select(TAGS))
    t = stats.signatures.to_pydict()
    cells = {(s, y): c for s, y, c in zip(t["tag.g"], t["tag.occ"], t["count"]) if s is not None}
    rw = reweigh_cells(cells)
    for s, y, w in zip(t["tag.g"], t["tag.occ"], q):
        assert w == pytest.approx(1.0 if s is None else rw[(s, y)], rel=1e-8)
    assert solution.diagnostics["held_masses"] == 4 and solution.diagnostics["max_violation"] <= 1e-9


def test_held_label_masses_with_l2_match_cvxpy():
    import cvxpy as cp

    balance = {"method": "m4", "targets": {"g": {"v0": 0.5, "v1": 0.5}}, "associate": [["g", "occ"]],
               "retention": 0.8, "max_weight": 2.0, "hold_labels": True,
               "tolerance": {"representation": 0.01, "association": 0.01}}
    stats = random_stats(7, R=3, balance=balance, skew=1.0)
    solution = solve(stats)
    t = stats.signatures.to_pydict()
    counts = np.array(t["count"], float)
    w = counts / counts.sum()
    q = cp.Variable(len(w))
    carrying = np.array([s is not None for s in t["tag.g"]], float)
    W = (w * carrying) @ q
    cons = [q >= 0, q <= 2.0, w @ q == 0.8]
    for v in ("v0", "v1"):
        b = carrying * (np.array([s == v for s in t["tag.g"]], float) - 0.5)
        cons += [(w * b) @ q <= 0.01 * W, -((w * b) @ q) <= 0.01 * W]
        for r in ("l0", "l1", "l2"):
            br = b * np.array([y == r for y in t["tag.occ"]], float)
            cons += [(w * br) @ q <= 0.01 * W, -((w * br) @ q) <= 0.01 * W]
    for r in ("l0", "l1", "l2"):
        h = carrying * np.array([y == r for y in t["tag.occ"]], float)
        cons.append((w * h) @ q == 0.8 * (w @ h))
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum(cp.multiply(w, cp.square(q - 0.8)))), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert solution.diagnostics["objective_per_row"] == pytest.approx(prob.value, rel=1e-4)
    mine = solution.weights(stats.signatures.select(TAGS))
    np.testing.assert_allclose(mine, q.value, atol=1e-5)


def test_utility_scales_the_baseline_per_signature():
    balance = {"method": "m4", "associate": [["g", "occ"]], "retention": 0.5, "max_weight": 1.0,
               "tolerance": {"representation": 1.0, "association": 1.0}}  # nothing binds
    stats = random_stats(5, balance=balance)
    n = np.array(stats.signatures.column("count").to_pylist(), dtype=np.float64)
    u = np.linspace(0.5, 1.5, len(n))
    stats.signatures = stats.signatures.append_column("utility_sum", pa.array(u * n))
    sol = solve(stats)
    q = sol.weights(stats.signatures.select(TAGS))
    eta = np.clip(0.5 * u / ((u * n).sum() / n.sum()), 0, 1)
    np.testing.assert_allclose(q, eta - (eta @ n - 0.5 * n.sum()) / n.sum(), atol=1e-9)  # budget shift only
    assert "utility" in sol.diagnostics and sol.diagnostics["utility"]


@pytest.mark.parametrize("balance, message", [
    # names are checked when the recipe is parsed, before any shard is read
    ({"method": "m4", "associate": [["occ", "g"]]}, "balance.associate.0 names 'occ', which is not an attribute"),
    ({"method": "m4", "associate": [["g", "job"]]}, "balance.associate.0 names 'job', which is not a label"),
    ({"method": "m4", "targets": {"g": {"v0": 0.3, "v1": 0.7}}, "tolerance": {"representation": 0.01}},
     "balance.targets.g.v0 is 0.3 but no row has g=v0"),
])
def test_user_errors_name_the_recipe_key(balance, message):
    table = pa.table({"tag.g": ["v1", None], "tag.occ": ["a", "a"], "count": pa.array([5, 5], pa.int64())})
    with pytest.raises(ValueError, match=message) as err:
        recipe = parse_recipe({"attributes": [{"name": "g", "values": ["v0", "v1"]}], "labels": [{"name": "occ"}], "balance": balance})
        solve(CorpusStats(recipe, table, {"g": ["v0", "v1"], "occ": ["a"]}, 10))
    assert "\n" not in str(err.value)
