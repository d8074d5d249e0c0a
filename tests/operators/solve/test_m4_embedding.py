"""M4 embedding moments (docs/algorithms.md section 8) against a row-level cvxpy solve written from
the spec: small n, d = 16, the principal components recomputed in numpy; infeasible and
largest-retention outcomes; a composition whose last step bounds embedding moments."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pyarrow as pa
import pytest

from mmbalance.operators.pca import fit_pca
from mmbalance.operators.solve import CorpusStats, solution_from_dict, solve
from mmbalance.operators.stats import summarise
from mmbalance.schemas.contract import UTILITY_COLUMN
from mmbalance.schemas.recipe import parse_recipe

DIM = 16


class ListStream:
    def __init__(self, tables):
        self.parts = tables
        self.passes = 0

    def tables(self, columns):
        self.passes += 1
        for t in self.parts:
            yield t.select(columns)


def _rows(n: int, seed: int, utility: bool = False) -> pa.Table:
    """Gender skews occupation and, separately, a direction of the embedding (a latent scene)."""
    rng = np.random.default_rng(seed)
    occ = rng.choice(["a", "b", "c"], size=n)
    p_w = np.select([occ == "a", occ == "b"], [0.7, 0.35], 0.5)
    woman = rng.random(n) < p_w
    g = np.where(rng.random(n) < 0.15, None, np.where(woman, "w", "m"))
    scene = rng.normal(size=(4, DIM))
    pick = np.where(woman, rng.choice(4, n, p=[0.4, 0.3, 0.2, 0.1]), rng.choice(4, n, p=[0.1, 0.2, 0.3, 0.4]))
    emb = scene[pick] + rng.normal(0, 0.8, (n, DIM))
    cols = {"tag.g": pa.array(g.tolist(), pa.string()), "tag.occ": occ.tolist(),
            "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float32).ravel()), DIM)}
    if utility:
        cols[UTILITY_COLUMN] = rng.gamma(2.0, 0.5, n)
    return pa.table(cols)


def _recipe(tolerance: dict, **balance) -> dict:
    return {
        "input": {"columns": {"image_embedding": "emb", **({"utility": "score"} if balance.pop("utility", False) else {})}},
        "attributes": [{"name": "g", "values": ["w", "m"]}], "labels": [{"name": "occ"}],
        "balance": {"method": "m4", "targets": {"g": {"w": 0.5, "m": 0.5}},
                    "associate": [["g", "occ"], ["g", "embedding.image"]],
                    "tolerance": {"representation": 0.01, "association": 0.02, **tolerance}, "retention": 0.7,
                    "max_weight": 1.5, **balance},
    }


def _stats(rows: pa.Table, recipe: dict, splits=(250, 100)) -> tuple[CorpusStats, ListStream]:
    parsed = parse_recipe(recipe)
    tags = [c for c in rows.column_names if c.startswith("tag.")]
    table = rows.select(tags + ([UTILITY_COLUMN] if UTILITY_COLUMN in rows.column_names else []))
    sig = summarise(table, tags)
    parts, start = [], 0
    for size in splits:
        parts.append(rows.slice(start, size))
        start += size
    parts.append(rows.slice(start))
    stream = ListStream(parts)
    from mmbalance.operators.arrays import embedding_matrix

    matrix, valid = embedding_matrix(rows.column("image_emb"))
    basis = fit_pca(matrix, valid, parsed.balance_steps()[-1].embedding_components, "image")
    stats = CorpusStats(parsed, sig, {"g": ["w", "m"], "occ": ["a", "b", "c"]}, rows.num_rows, rows=stream,
                        embedding_bases={"image": basis})
    return stats, stream


def _z(rows: pa.Table, stats: CorpusStats) -> np.ndarray:
    """z recomputed in numpy float64 from the basis: (x / |x| - mean) V'."""
    basis = stats.embedding_bases["image"]
    x = np.asarray(rows.column("image_emb").combine_chunks().values.to_numpy(), np.float64).reshape(-1, DIM)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x - basis.mean.astype(np.float64)) @ basis.components.astype(np.float64).T


def _reference(rows: pa.Table, stats: CorpusStats, retention: float, objective: bool = True):
    step = stats.recipe.balance
    tol = step.tolerance
    g = np.array(rows.column("tag.g").to_pylist(), dtype=object)
    occ = np.array(rows.column("tag.occ").to_pylist())
    n = rows.num_rows
    u = rows.column(UTILITY_COLUMN).to_numpy() if UTILITY_COLUMN in rows.column_names else np.ones(n)
    eta = np.clip(retention * u / u.mean(), 0, step.max_weight)
    carry = np.array([x is not None for x in g], float)
    z = _z(rows, stats)
    sd = stats.embedding_bases["image"].sd[: step.embedding_components]
    q = cp.Variable(n)
    W = carry @ q
    cons = [q >= 0, q <= step.max_weight, cp.sum(q) == retention * n]
    for v in ("w", "m"):
        b = carry * ((g == v).astype(float) - 0.5)
        cons += [cp.abs(b @ q) <= tol.representation * W]
        for r in ("a", "b", "c"):
            cons += [cp.abs((b * (occ == r)) @ q) <= tol.association * W]
        for k in range(z.shape[1]):
            cons += [cp.abs((b * z[:, k]) @ q) <= tol.association_embedding * sd[k] * W]
    obj = 0.5 * cp.sum_squares(q - eta) / n if step.objective == "l2" else cp.sum(cp.kl_div(q, eta)) / n
    prob = cp.Problem(cp.Minimize(obj if objective else 0), cons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tol_ = 1e-10 if step.objective == "l2" else 1e-8
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=tol_, tol_gap_rel=tol_, tol_feas=tol_)
    return prob.status, (None if q.value is None else np.asarray(q.value)), prob.value


@pytest.mark.parametrize("objective, utility, seed", [("l2", False, 0), ("l2", True, 1), ("kl", True, 2)])
def test_embedding_moments_match_row_level_cvxpy(objective, utility, seed):
    rows = _rows(600, seed, utility=utility)
    stats, stream = _stats(rows, _recipe({"association_embedding": 0.01}, objective=objective, utility=utility))
    solution = solve(stats)
    d = solution.diagnostics
    assert d["status"] == "optimal" and d["max_violation"] <= 1e-9, d["status"]
    assert d["kkt_residual"] <= 1e-9 and abs(d["relative_duality_gap"]) <= 1e-7
    assert any(b["kind"] == "embedding" for b in d["binding"])
    q = solution_from_dict(solution.to_dict()).weights(rows)
    status, q_ref, ref = _reference(rows, stats, 0.7)
    assert status == "optimal"
    assert d["objective_per_row"] == pytest.approx(ref, rel=1e-6 if objective == "l2" else 1e-5)
    np.testing.assert_allclose(q, q_ref, atol=1e-5 if objective == "l2" else 1e-4)
    # every embedding moment within its bound on the applied weights (z recomputed in numpy)
    z = _z(rows, stats)
    g = np.array(rows.column("tag.g").to_pylist(), dtype=object)
    carry = np.array([x is not None for x in g])
    W = q[carry].sum()
    sd = stats.embedding_bases["image"].sd
    for v in ("w", "m"):
        moment = ((g[carry] == v) - 0.5) * q[carry] @ z[carry]
        assert np.all(np.abs(moment) <= 0.01 * sd * W * (1 + 1e-6) + 1e-9)
    # rows read once into blocks, then one pass per dual evaluation
    assert stream.passes == 1


def test_equal_weighted_mean_embeddings_at_eps_zero():
    """eps = 0 with all d components and exact representation: the weighted mean embeddings of
    women and men coincide (the moment is E_w[(s - pi) z], a covariance once the shares are pi)."""
    rows = _rows(800, 5)
    stats, _ = _stats(rows, _recipe({"association_embedding": 0.0, "association": 0.05, "representation": 0.0},
                                    retention=0.6, max_weight=2.0))
    solution = solve(stats)
    assert solution.diagnostics["status"] == "optimal"
    q = solution.weights(rows)
    x = np.asarray(rows.column("image_emb").combine_chunks().values.to_numpy(), np.float64).reshape(-1, DIM)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    g = np.array(rows.column("tag.g").to_pylist(), dtype=object)
    means = {v: (q[g == v] @ x[g == v]) / q[g == v].sum() for v in ("w", "m")}
    before = {v: x[g == v].mean(axis=0) for v in ("w", "m")}
    assert np.abs(before["w"] - before["m"]).max() > 0.1
    assert np.abs(means["w"] - means["m"]).max() < 1e-6


def test_infeasible_embedding_moments_name_the_largest_feasible_retention():
    rows = _rows(500, 3)
    stats, _ = _stats(rows, _recipe({"association_embedding": 0.0, "association": 0.0}, retention=0.95, max_weight=1.0))
    with pytest.raises(ValueError, match=r"balance.retention 0.95 is infeasible .*largest feasible retention") as err:
        solve(stats)
    assert "\n" not in str(err.value)
    largest = float(str(err.value).split("largest feasible retention ")[1].split(")")[0])
    assert 0 < largest < 0.95
    assert _reference(rows, stats, largest * (1 - 1e-4), objective=False)[0] == "optimal"
    assert _reference(rows, stats, largest * (1 + 1e-3), objective=False)[0].startswith("infeasible")


def test_max_retention_with_embedding_moments():
    rows = _rows(500, 3)
    recipe = _recipe({"association_embedding": 0.0, "association": 0.0}, retention=0.95, max_weight=1.0,
                     on_infeasible="max_retention")
    stats, _ = _stats(rows, recipe)
    d = solve(stats).diagnostics
    assert d["status"] == "solved_at_largest_feasible_retention" and d["max_violation"] <= 1e-9
    assert d["retention"] == pytest.approx(d["largest_feasible_retention"], rel=1e-5)


def test_bisection_agrees_with_the_row_lp(monkeypatch):
    from mmbalance.operators.solve import m4_embedding
    from mmbalance.operators.solve.m4 import build_problem, max_feasible_retention

    rows = _rows(400, 4)
    stats, _ = _stats(rows, _recipe({"association_embedding": 0.0, "association": 0.0}, retention=0.95, max_weight=1.0))
    problem = build_problem(stats.recipe.balance, stats)[0]
    exact = max_feasible_retention(problem)
    monkeypatch.setattr(m4_embedding, "ROW_LP_NONZEROS", 0)
    bisected = max_feasible_retention(problem)
    assert exact * (1 - 1e-3) <= bisected <= exact * (1 + 1e-9)  # certified probes only: it errs low
    problem.stream.close()


def test_a_composition_ending_in_embedding_moments_weighs_rows_by_the_earlier_steps():
    rows = _rows(600, 6)
    recipe = _recipe({"association_embedding": 0.01})
    step = recipe.pop("balance")
    recipe["balance"] = [{"method": "cap", "by": "occ", "cap": 150}, step]
    stats, _ = _stats(rows, recipe)
    solution = solve(stats)
    d = solution.diagnostics["steps"][-1]
    assert d["status"] == "optimal" and d["max_violation"] <= 1e-9
    q = solution_from_dict(solution.to_dict()).weights(rows)
    cap = solve(CorpusStats(parse_recipe({**recipe, "balance": recipe["balance"][0]}), stats.signatures, stats.vocab,
                            rows.num_rows)).weights(rows)
    assert np.all(q <= 1.5 * cap + 1e-12) and np.any(cap < 1)
    z = _z(rows, stats)
    g = np.array(rows.column("tag.g").to_pylist(), dtype=object)
    carry = np.array([x is not None for x in g])
    W = q[carry].sum()
    sd = stats.embedding_bases["image"].sd
    for v in ("w", "m"):
        moment = ((g[carry] == v) - 0.5) * q[carry] @ z[carry]
        assert np.all(np.abs(moment) <= 0.01 * sd * W * (1 + 1e-6) + 1e-9)


def test_an_embedding_step_before_another_is_a_recipe_error():
    from mmbalance.schemas.recipe import RecipeError

    recipe = _recipe({})
    recipe["balance"] = [recipe["balance"], {"method": "cap", "by": "occ", "cap": 10}]
    with pytest.raises(RecipeError, match="must be the last balance step"):
        parse_recipe(recipe, "r.yaml")
