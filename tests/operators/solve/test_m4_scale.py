"""M4 at concept scale (issue 12): thousands of cluster labels against an independent solver
(cvxpy with sparse matrices, Clarabel), infeasible outcomes as one-line errors, undeclared label
values, and Kamiran-Calders reweighing with null labels."""

from __future__ import annotations


import cvxpy as cp
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from operators.solve.m4_reference import (
    AGES, CONCEPT_BALANCE, GENDERS, centred_attribute, concept_stats, feasible, signature_codes, stop_first_newton_short)

from mmbalance.operators.solve import CorpusStats, solve
from mmbalance.operators.solve.m4.primal import max_feasible_retention
from mmbalance.operators.solve.m4.problem import build_problem
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.recipe import parse_recipe

TAGS = ["tag.gender", "tag.age", "tag.concept", "tag.occupation"]


def reference_problem(stats: CorpusStats, retention: float, hold: bool = False):
    """The primal written from algorithms.md section 1 with sparse matrices, independent of
    ``build_problem``: returns (q variable, objective, constraints). Moment rows are stacked into
    one sparse matrix and the carrying weights are variables, so cvxpy compiles in seconds."""
    step = stats.recipe.balance
    w = np.asarray(stats.signatures.column("count"), np.float64)
    S = len(w)
    w *= S / w.sum()  # mean weight 1 (shares times S): interior-point tolerances are absolute
    attrs = {"gender": GENDERS, "age": AGES}
    codes = {a: signature_codes(stats, a, v) for a, v in attrs.items()}
    labels = {lab: signature_codes(stats, lab, stats.vocab[lab]) for lab in ("concept", "occupation")}
    q = cp.Variable(S)
    W = cp.Variable(len(attrs))
    eta = np.full(S, min(retention, step.max_weight))
    cons = [q >= 0, q <= step.max_weight]
    if step.budget:
        cons.append(w @ q == retention * S)
    moment_rows, tolerance_rows, held = [], [], []
    for g, (a, values) in enumerate(attrs.items()):
        carry, centred = centred_attribute(step, a, values, codes[a], w)
        cons.append(W[g] == (w * carry) @ q)
        if a in step.targets:
            moment_rows.append(sp.csr_matrix((centred * w[:, None]).T))
            tolerance_rows += [(g, step.tolerance.representation)] * len(values)
        for pa_, lab in step.associate:
            if pa_ != a:
                continue
            y = labels[lab]
            R = len(stats.vocab[lab])
            rows = np.flatnonzero(carry & (y >= 0))
            for k in range(len(values)):
                moment_rows.append(sp.csr_matrix((w[rows] * centred[rows, k], (y[rows], rows)), shape=(R, S)))
                tolerance_rows += [(g, step.tolerance.association)] * R
            if hold:
                Hm = sp.csr_matrix((w[rows], (y[rows], rows)), shape=(R, S))
                held.append(Hm[np.unique(y[rows])])
    M = sp.vstack(moment_rows, format="csr")
    E = sp.csr_matrix(([e for _, e in tolerance_rows], (np.arange(len(tolerance_rows)), [g for g, _ in tolerance_rows])),
                      shape=(len(tolerance_rows), len(attrs)))
    cons += [M @ q - E @ W <= 0, -(M @ q) - E @ W <= 0]
    if held:
        Hs = sp.vstack(held, format="csr")
        cons.append(Hs @ q == Hs @ eta)
    if step.objective == "l2":
        obj = 0.5 * cp.sum(cp.multiply(w, cp.square(q - eta))) / S
    else:
        obj = cp.sum(cp.multiply(w, cp.kl_div(q, eta))) / S
    return q, obj, cons


def reference_solve(stats: CorpusStats, retention: float):
    q, obj, cons = reference_problem(stats, retention)
    prob = cp.Problem(cp.Minimize(obj), cons)
    tol = 1e-11 if stats.recipe.balance.objective == "l2" else 1e-8  # exponential cones stall below ~1e-9
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol)
    return prob.status, np.asarray(q.value), prob.value


def reference_feasible(stats: CorpusStats, retention: float, hold: bool) -> bool:
    return feasible(reference_problem(stats, retention, hold=hold)[2])


# KL at 800 concepts: cvxpy's exponential-cone form of k = 3000 fails in Clarabel (still > 4,000 duals)
@pytest.mark.parametrize("objective, concepts, rows", [("l2", 3000, 12000), ("kl", 800, 4000)])
def test_three_thousand_clusters_two_attributes_match_clarabel(objective, concepts, rows):
    """k = 3,000 concepts, association tolerance 0.002, gender x {occupation, concept} and age x
    concept: over 4,000 duals, where the dense polish used to be off and the solve failed."""
    balance = {**CONCEPT_BALANCE, "objective": objective, "retention": 0.6}
    stats = concept_stats(11, concepts, rows, balance, occupations=30)
    problem, *_ = build_problem(stats.recipe.balance, stats)
    assert 2 * problem.K > 4000
    solution = solve(stats)
    d = solution.diagnostics
    assert d["status"] == "optimal"
    assert d["solver"]["method"] == "sparse-newton"
    assert d["max_violation"] <= 1e-9 and d["binding_constraints"] > 0
    assert d["kkt_residual"] <= 1e-9
    assert abs(d["relative_duality_gap"]) <= 1e-8
    status, q_ref, ref = reference_solve(stats, 0.6)
    assert status == "optimal"
    assert d["objective_per_row"] == pytest.approx(ref, rel=1e-6 if objective == "l2" else 1e-5)
    q = solution.weights(stats.signatures.select(TAGS))
    np.testing.assert_allclose(q, q_ref, atol=2e-5 if objective == "l2" else 2e-4)


HOLD = {**CONCEPT_BALANCE, "associate": [["gender", "concept"]], "hold_labels": True, "retention": 0.8}


def test_infeasible_with_held_labels_names_the_largest_feasible_retention():
    stats = concept_stats(5, 200, 6000, HOLD, occupations=10)
    with pytest.raises(ValueError, match=r"balance.retention 0.8 is infeasible .*hold_labels.*largest feasible retention") as err:
        solve(stats)
    assert "\n" not in str(err.value)
    largest = float(str(err.value).split("largest feasible retention ")[1].split(")")[0])
    assert 0 < largest < 0.8
    assert reference_feasible(stats, largest * (1 - 1e-4), hold=True)
    assert not reference_feasible(stats, largest * (1 + 1e-3), hold=True)


def test_max_retention_with_held_labels_solves_there_and_holds_the_masses():
    stats = concept_stats(5, 200, 6000, {**HOLD, "on_infeasible": "max_retention"}, occupations=10)
    d = solve(stats).diagnostics
    assert d["status"] == "solved_at_largest_feasible_retention"
    assert d["max_violation"] <= 1e-7  # held masses within 1e-7 of their targets, moments within tolerance
    assert d["retention"] == pytest.approx(d["largest_feasible_retention"], rel=1e-5)
    assert d["held_masses"] > 0


def test_budget_false_infeasible_is_one_line():
    """Without a budget only held masses can be infeasible; the message used to format None."""
    stats = concept_stats(5, 200, 6000, {**HOLD, "budget": False, "tolerance": {"association": 0.0}}, occupations=10)
    with pytest.raises(ValueError, match=r"balance.hold_labels: the held label masses cannot be kept") as err:
        solve(stats)
    assert "None" not in str(err.value) and "\n" not in str(err.value)


def test_largest_feasible_retention_lp_respects_held_masses():
    stats = concept_stats(5, 200, 6000, HOLD, occupations=10)
    with_holds = max_feasible_retention(build_problem(stats.recipe.balance, stats)[0])
    free = concept_stats(5, 200, 6000, {**HOLD, "hold_labels": False}, occupations=10)
    without = max_feasible_retention(build_problem(free.recipe.balance, free)[0])
    assert with_holds < without  # holding the label masses costs retention


def _null_label_stats(balance: dict) -> CorpusStats:
    rng = np.random.default_rng(8)
    g = ["w", "m", None]
    occ = ["a", "b", "c", None]
    rows = [(s, y) for s in g for y in occ]
    counts = rng.integers(5, 300, len(rows))
    recipe = parse_recipe({"attributes": [{"name": "g", "values": ["w", "m"]}], "labels": [{"name": "occ"}], "balance": balance})
    table = pa.table({"tag.g": pa.array([s for s, _ in rows], pa.string()), "tag.occ": pa.array([y for _, y in rows], pa.string()),
                      "count": pa.array(counts, pa.int64())})
    return CorpusStats(recipe, table, {"g": ["w", "m"], "occ": ["a", "b", "c"]}, int(counts.sum()))


def test_kl_with_held_labels_is_kamiran_calders_with_null_labels():
    """pi over rows carrying both the attribute and the label: each (s, y) cell gets
    n_s n_y / (n n_sy) counted over those rows, even with null labels and null attributes."""
    balance = {"method": "m4", "associate": [["g", "occ"]], "objective": "kl", "budget": False, "retention": 1.0,
               "max_weight": 1000.0, "tolerance": {"representation": 0.0, "association": 0.0}, "hold_labels": True}
    stats = _null_label_stats(balance)
    solution = solve(stats)
    q = solution.weights(stats.signatures.select(["tag.g", "tag.occ"]))
    t = stats.signatures.to_pydict()
    both = [(s, y, c) for s, y, c in zip(t["tag.g"], t["tag.occ"], t["count"]) if s is not None and y is not None]
    n = sum(c for *_, c in both)
    n_s = {s: sum(c for s2, _, c in both if s2 == s) for s in ("w", "m")}
    n_y = {y: sum(c for _, y2, c in both if y2 == y) for y in ("a", "b", "c")}
    for s, y, c, w in zip(t["tag.g"], t["tag.occ"], t["count"], q):
        expected = 1.0 if s is None or y is None else n_s[s] * n_y[y] / (n * c)
        assert w == pytest.approx(expected, rel=1e-8)
    assert solution.diagnostics["pi_by_pair"]["g x occ"]["w"] == pytest.approx(n_s["w"] / n, rel=1e-12)


def test_label_value_outside_its_declared_values_is_an_error():
    recipe = parse_recipe({"attributes": [{"name": "g", "values": ["w", "m"]}], "labels": [{"name": "occ", "values": ["a", "b"]}],
                           "balance": {"method": "m4", "associate": [["g", "occ"]]}})
    table = pa.table({"tag.g": ["w", "m", "w"], "tag.occ": ["a", "b", "pilot"], "count": pa.array([5, 5, 5], pa.int64())})
    with pytest.raises(ValueError, match=r"label 'occ' has value 'pilot', which is not one of its declared values") as err:
        solve(CorpusStats(recipe, table, {"g": ["w", "m"], "occ": ["a", "b"]}, 15))
    assert "\n" not in str(err.value)


def _concept_corpus(directory, rows: int, concepts: int, seed: int, extra_value: str | None = None):
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, concepts + 1) ** 0.7
    concept = rng.choice(concepts, size=rows, p=zipf / zipf.sum())
    jobs = np.array(["welder", "florist", "judge", "barista", "tailor"])
    occ = rng.integers(0, len(jobs), rows)
    lean = rng.normal(0, 0.3, concepts)[concept] + np.array([0.2, -0.2, 0.0, 0.1, -0.1])[occ]
    gender = np.where(rng.random(rows) < 0.2, None, np.where(rng.random(rows) < 1 / (1 + np.exp(-lean)), "woman", "man"))
    names = np.array([f"k{i}" for i in range(concepts)])[concept].astype(object)
    if extra_value is not None:
        names[0] = extra_value
    directory.mkdir(parents=True)
    half = rows // 2
    for part, sl in enumerate((slice(0, half), slice(half, rows))):
        pq.write_table(pa.table({
            "uid": [f"u{i}" for i in range(rows)][sl], "gender": pa.array(gender[sl].tolist(), pa.string()),
            "occupation": jobs[occ][sl].tolist(), "concept": pa.array(names[sl].tolist(), pa.string()),
        }), directory / f"part-{part}.parquet")
    return directory


def _concept_recipe(**label):
    return parse_recipe({
        "input": {"columns": {"uid": "uid"}},
        "attributes": [{"name": "gender", "source": "column", "column": "gender", "values": ["woman", "man"]}],
        "labels": [{"name": "occupation", "source": "column", "column": "occupation"},
                   {"name": "concept", "source": "column", "column": "concept", **label}],
        "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
                    "associate": [["gender", "occupation"], ["gender", "concept"]],
                    "tolerance": {"representation": 0.01, "association": 0.002}, "retention": 0.6,
                    "on_infeasible": "max_retention"},
    })


def test_run_with_three_thousand_concept_values_is_optimal(tmp_path):
    """The issue's recipe shape (k = 3000 concepts, association tolerance 0.002) end to end: it
    used to end in 'RuntimeError: m4: the dual solve did not converge'."""
    from mmbalance.pipeline.rebalance import RunOptions, rebalance

    corpus = _concept_corpus(tmp_path / "c", 30000, 3000, seed=2)
    result = rebalance(str(corpus), str(tmp_path / "o"), _concept_recipe(),
                       RunOptions(executor="local", show_progress=False, html_report=False))
    solution = result.report["solution"]
    assert solution["status"] == "optimal"
    assert solution["max_violation"] <= 1e-9
    manifest = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "o" / "manifest").glob("*.parquet"))])
    truth = pl.concat([pl.read_parquet(p) for p in sorted(corpus.glob("*.parquet"))])
    rows = manifest.join(truth, on="uid").filter(pl.col("gender").is_not_null())
    W = rows["weight"].sum()
    centred = rows["weight"] * ((rows["gender"] == "woman").cast(pl.Float64) - 0.5)
    worst = rows.with_columns(centred.alias("m")).group_by("concept").agg(pl.col("m").sum().abs())["m"].max()
    assert worst / W <= 0.002 + 1e-7


def test_run_with_an_undeclared_label_value_exits_with_one_line(tmp_path):
    from mmbalance.pipeline.rebalance import RunOptions, rebalance

    corpus = _concept_corpus(tmp_path / "c", 400, 5, seed=3, extra_value="zebra")
    recipe = _concept_recipe(values=[f"k{i}" for i in range(5)])
    with pytest.raises(InputError, match=r"label 'concept' has value 'zebra'"):
        rebalance(str(corpus), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))


@pytest.mark.parametrize("balance, message", [
    ({"retention": 0.99, "max_weight": 1.0, "tolerance": {"representation": 0.0, "association": 0.0},
      "on_infeasible": "error"}, r"solve: balance.retention 0.99 is infeasible for these constraints"),
    ({"budget": False, "hold_labels": True, "retention": 1.0, "max_weight": 2.0,
      "tolerance": {"representation": 0.01, "association": 0.0}}, r"solve: balance.hold_labels: the held label masses cannot be kept"),
])
def test_unsatisfiable_runs_exit_with_one_line(tmp_path, balance, message):
    """What the data cannot give ends the run as one InputError line (exit 2 from the CLI)."""
    from mmbalance.pipeline.rebalance import RunOptions, rebalance

    corpus = _concept_corpus(tmp_path / "c", 3000, 40, seed=4)
    base = _concept_recipe().model_dump(mode="json", exclude_none=True)
    base["balance"] = {**{k: v for k, v in base["balance"].items() if k in ("method", "targets", "associate")}, **balance}
    if balance.get("hold_labels"):
        base["balance"].pop("targets")  # held masses at eps 0: a label with one gender only cannot hold
    with pytest.raises(InputError, match=message) as err:
        rebalance(str(corpus), str(tmp_path / "o"), parse_recipe(base),
                  RunOptions(executor="local", show_progress=False, html_report=False))
    assert "\n" not in str(err.value) and "None" not in str(err.value)


@pytest.mark.parametrize("objective", ["l2", "kl"])
def test_a_dual_path_that_does_not_certify_falls_back_to_the_primal(monkeypatch, objective):
    """A feasible problem never ends in an error: when the Newton solve stops short, Clarabel on
    the primal (then the Newton finish from its duals) gives the same certified optimum."""
    stats = concept_stats(3, 900, 4000, {**CONCEPT_BALANCE, "objective": objective}, occupations=20)
    expected = solve(stats).diagnostics
    stop_first_newton_short(monkeypatch)
    d = solve(stats).diagnostics
    assert d["status"] == "optimal" and d["solver"]["method"].startswith("clarabel")
    assert d["max_violation"] <= 1e-9
    assert d["objective_per_row"] == pytest.approx(expected["objective_per_row"], rel=1e-7)
